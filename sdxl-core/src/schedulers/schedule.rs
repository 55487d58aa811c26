//! The training noise schedule every family starts from: betas, cumulative alphas (ᾱ),
//! zero-terminal-SNR rescaling and the σ of each training timestep.
//!
//! Values are computed in f64 from the formulas diffusers uses; where diffusers stores a float32
//! tensor the result is rounded through f32 so that derived quantities match.

use candle_core::Tensor;

use super::noising::Vp;
use crate::error::{Error, Result};

/// Rounds through f32, as a value stored in a float32 torch tensor or numpy array.
pub(crate) fn f32_round(x: f64) -> f64 {
    x as f32 as f64
}

/// `torch.linspace(start, end, n, dtype=float32)`, element by element.
pub(crate) fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![f32_round(start)];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            // torch fills the first half from the start and the second half from the end.
            let v = if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            };
            v as f64
        })
        .collect()
}

/// The training betas for `schedule` (`linear`, `scaled_linear` or `squaredcos_cap_v2`), or
/// `trained` when given, as float32 values.
///
/// # Errors
/// [`Error::Unsupported`] for an unknown schedule name.
pub(crate) fn betas(
    schedule: &str,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
    trained: Option<&[f64]>,
) -> Result<Vec<f64>> {
    if let Some(t) = trained {
        return Ok(t.iter().map(|&b| f32_round(b)).collect());
    }
    match schedule {
        "linear" => Ok(linspace_f32(beta_start, beta_end, num_train_timesteps)),
        "scaled_linear" => {
            Ok(
                linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                    .into_iter()
                    .map(|b| f32_round(b * b))
                    .collect(),
            )
        }
        "squaredcos_cap_v2" => Ok(betas_for_alpha_bar(num_train_timesteps, |t| {
            ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                .cos()
                .powi(2)
        })),
        other => Err(Error::unsupported(format!(
            "beta_schedule `{other}` (expected linear, scaled_linear or squaredcos_cap_v2)"
        ))),
    }
}

/// diffusers' `betas_for_alpha_bar`: `β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), 0.999)`, in float32.
fn betas_for_alpha_bar(num_train_timesteps: usize, alpha_bar: impl Fn(f64) -> f64) -> Vec<f64> {
    let n = num_train_timesteps as f64;
    (0..num_train_timesteps)
        .map(|i| {
            let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
            f32_round((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999))
        })
        .collect()
}

/// The `exp` schedule of `betas_for_alpha_bar` (Heun only): `ᾱ(t) = e^{-12 t}`, i.e. a constant
/// beta of `1 - e^{-12/T}` (capped at 0.999), in float32.
pub(crate) fn exp_betas(num_train_timesteps: usize) -> Vec<f64> {
    betas_for_alpha_bar(num_train_timesteps, |t| (-12.0 * t).exp())
}

/// The `sigmoid` schedule (DDPM only): `sigmoid(linspace(-6, 6)) · (beta_end - beta_start) +
/// beta_start` in float32.
pub(crate) fn sigmoid_betas(beta_start: f64, beta_end: f64, n: usize) -> Vec<f64> {
    linspace_f32(-6.0, 6.0, n)
        .into_iter()
        .map(|x| {
            let s = f32_round(1.0 / (1.0 + (-x).exp()));
            f32_round(s * (beta_end - beta_start) + beta_start)
        })
        .collect()
}

/// `torch.cumprod(1 - betas)` on a float32 tensor: torch's CPU kernel accumulates in f64 and
/// rounds each output to f32.
fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0 - b as f32) as f64;
            f32_round(acc)
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), as diffusers'
/// `rescale_zero_terminal_snr`.
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let alphas_bar_sqrt: Vec<f64> = alphas_cumprod(betas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = match (alphas_bar_sqrt.first(), alphas_bar_sqrt.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return Vec::new(),
    };
    let mut prev = 1.0;
    alphas_bar_sqrt
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let shifted = (a - last) * first / (first - last);
            let ab = shifted * shifted;
            let alpha = if i == 0 { ab } else { ab / prev };
            prev = ab;
            f32_round(1.0 - alpha)
        })
        .collect()
}

/// How the terminal ᾱ of a zero-terminal-SNR schedule is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TerminalAlpha {
    /// Exactly 0 (DDIM, DDPM, LCM step on ᾱ directly).
    Zero,
    /// 2⁻²⁴, fp16's smallest subnormal, so that the largest σ stays finite (every family that
    /// converts ᾱ to σ).
    Finite,
}

/// `cumprod(1 - betas)` in float32, after the optional zero-terminal-SNR rescaling, whose last
/// ᾱ is then stored as `terminal` says.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty schedule.
pub(crate) fn train_alphas_cumprod(
    betas: &[f64],
    rescale_zero_snr: bool,
    terminal: TerminalAlpha,
) -> Result<Vec<f64>> {
    if betas.is_empty() {
        return Err(Error::invalid("num_train_timesteps must be at least 1"));
    }
    if !rescale_zero_snr {
        return Ok(alphas_cumprod(betas));
    }
    let mut ac = alphas_cumprod(&rescale_zero_terminal_snr(betas));
    if terminal == TerminalAlpha::Finite {
        if let Some(last) = ac.last_mut() {
            *last = 2f64.powi(-24);
        }
    }
    Ok(ac)
}

/// σ of every training timestep, `sqrt((1 - ᾱ) / ᾱ)` in float32 as diffusers computes it,
/// indexed by timestep.
pub(crate) fn vp_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            f64::from(((1.0 - a) / a).sqrt())
        })
        .collect()
}

/// A timestep as an index into the training schedule: a non-negative integer.
///
/// # Errors
/// [`Error::InvalidArgument`] for a negative, fractional or non-finite timestep.
fn timestep_index(timestep: f64) -> Result<usize> {
    if timestep.is_finite() && timestep >= 0.0 && timestep.fract() == 0.0 {
        Ok(timestep as usize)
    } else {
        Err(Error::invalid(format!(
            "timestep {timestep} is not an integer training timestep"
        )))
    }
}

/// The cumulative alphas of the families that step on ᾱ directly (DDIM, DDPM, LCM), with the ᾱ
/// used past the last step.
#[derive(Debug, Clone)]
pub(crate) struct AlphaSchedule {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
}

impl AlphaSchedule {
    /// The schedule of `betas`; past the last step ᾱ is 1 when `set_alpha_to_one`, else ᾱ of
    /// timestep 0.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty schedule.
    pub(crate) fn new(
        betas: &[f64],
        rescale_zero_snr: bool,
        set_alpha_to_one: bool,
    ) -> Result<Self> {
        let alphas_cumprod = train_alphas_cumprod(betas, rescale_zero_snr, TerminalAlpha::Zero)?;
        let mut this = Self {
            alphas_cumprod,
            final_alpha_cumprod: 1.0,
        };
        if !set_alpha_to_one {
            this.final_alpha_cumprod = this.alpha(0.0)?;
        }
        Ok(this)
    }

    /// ᾱ at an integer training timestep.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `timestep` is not an integer training timestep.
    pub(crate) fn alpha(&self, timestep: f64) -> Result<f64> {
        let t = timestep_index(timestep)?;
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            Error::invalid(format!(
                "timestep {t} is outside the {} training timesteps",
                self.alphas_cumprod.len()
            ))
        })
    }

    /// ᾱ at the previous timestep `timestep`, or the final ᾱ when it is negative (past the
    /// last step).
    ///
    /// # Errors
    /// As [`AlphaSchedule::alpha`].
    pub(crate) fn alpha_prev(&self, timestep: f64) -> Result<f64> {
        if timestep < 0.0 {
            Ok(self.final_alpha_cumprod)
        } else {
            self.alpha(timestep)
        }
    }

    /// `√ᾱ_t·original + √(1 − ᾱ_t)·noise` at an integer training timestep (diffusers'
    /// `add_noise` of DDIM, DDPM and LCM).
    ///
    /// # Errors
    /// As [`AlphaSchedule::alpha`]; tensor failures.
    pub(crate) fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timestep: f64,
    ) -> Result<Tensor> {
        Vp::from_alpha_cumprod(self.alpha(timestep)?).add_noise(original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_linear_endpoints() {
        let b = betas("scaled_linear", 0.00085, 0.012, 1000, None).unwrap_or_default();
        assert_eq!(b.len(), 1000);
        assert!((b[0] - 0.00085).abs() < 1e-9);
        assert!((b[999] - 0.012).abs() < 1e-9);
    }

    #[test]
    fn zero_snr_ends_at_zero_or_near_it() -> Result<()> {
        let b = betas("scaled_linear", 0.00085, 0.012, 1000, None)?;
        let ac = train_alphas_cumprod(&b, true, TerminalAlpha::Zero)?;
        assert!(ac[999].abs() < 1e-6, "terminal alpha_bar {}", ac[999]);
        let ac = train_alphas_cumprod(&b, true, TerminalAlpha::Finite)?;
        assert_eq!(ac[999], 2f64.powi(-24));
        assert!(vp_sigmas(&ac).iter().all(|s| s.is_finite()));
        Ok(())
    }

    #[test]
    fn unknown_schedule_is_an_error() {
        assert!(betas("cosine-ish", 0.1, 0.2, 10, None).is_err());
        assert!(train_alphas_cumprod(&[], false, TerminalAlpha::Zero).is_err());
    }

    #[test]
    fn exp_schedule_is_constant() {
        let b = exp_betas(10);
        let first = b.first().copied().unwrap_or_default();
        assert!(b.iter().all(|&x| (x - first).abs() < 1e-7));
        assert!((first - (1.0 - (-1.2f64).exp())).abs() < 1e-6);
    }

    #[test]
    fn sigmoid_schedule_spans_the_beta_range() {
        let b = sigmoid_betas(0.0001, 0.02, 1000);
        assert!(b.windows(2).all(|w| w[0] <= w[1]));
        assert!((b[0] - 0.0001).abs() < 1e-4 && (b[999] - 0.02).abs() < 1e-4);
    }

    #[test]
    fn alpha_lookup() -> Result<()> {
        let b = betas("linear", 0.0001, 0.02, 10, None)?;
        let s = AlphaSchedule::new(&b, false, false)?;
        assert_eq!(s.alpha_prev(-1.0)?, s.alpha(0.0)?);
        assert!(s.alpha(10.0).is_err() && s.alpha(1.5).is_err());
        assert_eq!(AlphaSchedule::new(&b, false, true)?.alpha_prev(-1.0)?, 1.0);
        Ok(())
    }
}
