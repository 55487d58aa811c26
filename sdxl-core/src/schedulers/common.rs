//! Pieces shared by the scheduler families: the training noise schedule (betas, cumulative
//! alphas, zero-terminal-SNR rescaling) and Karras sigmas, plus the sigma (k-diffusion style)
//! helpers shared by Euler, Euler ancestral, Heun, KDPM2 and LMS.
//!
//! Values are computed in f64 from the same formulas diffusers uses; where diffusers stores a
//! float32 tensor the result is rounded through f32 so that derived quantities match.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Rounds through f32, as a value stored in a float32 torch tensor.
pub fn f32_round(x: f64) -> f64 {
    x as f32 as f64
}

/// `torch.linspace(start, end, n, dtype=float32)`, element by element.
pub fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f64> {
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
pub fn betas(
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
        "squaredcos_cap_v2" => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            let n = num_train_timesteps as f64;
            Ok((0..num_train_timesteps)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
                    f32_round((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999))
                })
                .collect())
        }
        other => Err(Error::unsupported(format!(
            "beta_schedule `{other}` (expected linear, scaled_linear or squaredcos_cap_v2)"
        ))),
    }
}

/// `torch.cumprod(1 - betas)` on a float32 tensor: torch's CPU kernel accumulates in f64 and
/// rounds each output to f32.
pub fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
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
pub fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let alphas_bar_sqrt: Vec<f64> = alphas_cumprod(betas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = match (alphas_bar_sqrt.first(), alphas_bar_sqrt.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return Vec::new(),
    };
    let shifted: Vec<f64> = alphas_bar_sqrt
        .iter()
        .map(|a| (a - last) * first / (first - last))
        .collect();
    let alphas_bar: Vec<f64> = shifted.iter().map(|a| a * a).collect();
    let mut out = Vec::with_capacity(alphas_bar.len());
    let mut prev = 1.0;
    for (i, &ab) in alphas_bar.iter().enumerate() {
        let alpha = if i == 0 { ab } else { ab / prev };
        prev = ab;
        out.push(f32_round(1.0 - alpha));
    }
    out
}

/// Karras et al. (2022) noise levels: `n` sigmas from `sigma_max` down to `sigma_min` with
/// `rho` = 7, spaced evenly in `sigma^(1/rho)`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    (0..n)
        .map(|i| {
            let ramp = if n > 1 {
                i as f64 / (n - 1) as f64
            } else {
                0.0
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Sigma-based (k-diffusion style) families: Euler, Euler ancestral, Heun, KDPM2 and LMS.
// ---------------------------------------------------------------------------------------------

/// `timestep_spacing`: how the inference timesteps are spread over the training range (Table 2
/// of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestepSpacing {
    /// Evenly spaced over `[0, T - 1]`, fractional values included.
    Linspace,
    /// Multiples of `T / n` counted up from 0, plus `steps_offset`.
    Leading,
    /// Multiples of `T / n` counted down from `T`, minus one.
    Trailing,
}

/// `prediction_type`: what the denoising model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    /// The added noise ε.
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The velocity v (Imagen Video, section 2.4).
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The clean sample itself (`original_sample` is diffusers' older name for it).
    #[serde(rename = "sample", alias = "original_sample")]
    Sample,
}

/// Which noise levels a sigma scheduler steps through, chosen by the `use_karras_sigmas`,
/// `use_exponential_sigmas` and `use_beta_sigmas` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSpacing {
    /// The training sigmas interpolated at the spaced timesteps.
    Interpolated,
    /// Karras et al. (2022), evenly spaced in `σ^(1/7)`.
    Karras,
    /// Evenly spaced in `log σ`.
    Exponential,
}

impl SigmaSpacing {
    /// The spacing the three config flags select.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when more than one flag is set; [`Error::Unsupported`] for beta
    /// sigmas (they need scipy's inverse incomplete beta function).
    pub fn from_flags(karras: bool, exponential: bool, beta: bool) -> Result<Self> {
        if [karras, exponential, beta].iter().filter(|&&f| f).count() > 1 {
            return Err(Error::invalid(
                "only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas may be set",
            ));
        }
        if beta {
            return Err(Error::unsupported("use_beta_sigmas"));
        }
        Ok(if karras {
            Self::Karras
        } else if exponential {
            Self::Exponential
        } else {
            Self::Interpolated
        })
    }
}

/// Explicit σ range for Karras/exponential sigmas (`sigma_min`/`sigma_max` config keys); `None`
/// takes the end of the interpolated schedule.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SigmaBounds {
    /// Smallest σ, or `None` for the last interpolated sigma.
    pub min: Option<f64>,
    /// Largest σ, or `None` for the first interpolated sigma.
    pub max: Option<f64>,
}

/// The inference timesteps of the sigma schedulers, highest first, as float32 values.
///
/// Mirrors numpy exactly, including `trailing`'s float `arange` (which can yield one extra
/// timestep for some step counts, as in diffusers) and round-half-to-even.
///
/// # Errors
/// [`Error::InvalidArgument`] when `num_inference_steps` is 0 or exceeds
/// `num_train_timesteps`.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    let (total, n) = (num_train_timesteps, num_inference_steps);
    if n == 0 || n > total {
        return Err(Error::invalid(format!(
            "num_inference_steps must be between 1 and num_train_timesteps ({total}), got {n}"
        )));
    }
    Ok(match spacing {
        TimestepSpacing::Linspace => {
            let stop = (total - 1) as f64;
            let step = if n > 1 { stop / (n - 1) as f64 } else { 0.0 };
            (0..n)
                .rev()
                .map(|i| {
                    f32_round(if n > 1 && i == n - 1 {
                        stop
                    } else {
                        i as f64 * step
                    })
                })
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = total / n;
            (0..n)
                .rev()
                .map(|i| f32_round((i * ratio) as f64 + steps_offset as f64))
                .collect()
        }
        TimestepSpacing::Trailing => {
            let start = total as f64;
            let step = -(total as f64 / n as f64);
            let len = (-start / step).ceil().max(0.0) as usize;
            // numpy fills a float arange as start + i * (second - start).
            let delta = (start + step) - start;
            (0..len)
                .map(|i| {
                    let v = if i == 1 {
                        start + step
                    } else {
                        start + i as f64 * delta
                    };
                    f32_round(v.round_ties_even()) - 1.0
                })
                .collect()
        }
    })
}

/// σ of every training timestep, `sqrt((1 - ᾱ) / ᾱ)` in float32, indexed by timestep.
///
/// With `rescale_zero_snr` the betas are rescaled to zero terminal SNR and the last ᾱ is set to
/// 2⁻²⁴ so that the largest σ stays finite, as diffusers' Euler schedulers do.
///
/// # Errors
/// [`Error::InvalidArgument`] when there are fewer than two training timesteps.
pub fn training_sigmas(betas: &[f64], rescale_zero_snr: bool) -> Result<Vec<f64>> {
    if betas.len() < 2 {
        return Err(Error::invalid(format!(
            "a sigma schedule needs at least 2 training timesteps, got {}",
            betas.len()
        )));
    }
    let mut ac = if rescale_zero_snr {
        alphas_cumprod(&rescale_zero_terminal_snr(betas))
    } else {
        alphas_cumprod(betas)
    };
    if rescale_zero_snr {
        if let Some(last) = ac.last_mut() {
            *last = 2f64.powi(-24);
        }
    }
    Ok(ac
        .iter()
        .map(|&a| {
            let a = a as f32;
            ((1.0 - a) / a).sqrt() as f64
        })
        .collect())
}

/// `np.log` of float32 training sigmas, in float32.
pub fn log_sigmas(train_sigmas: &[f64]) -> Vec<f64> {
    train_sigmas
        .iter()
        .map(|&s| (s as f32).ln() as f64)
        .collect()
}

/// `np.interp(timesteps, arange(len(sigmas)), sigmas)`: training sigmas at fractional timesteps,
/// clamped to the ends.
pub fn interp_sigmas(timesteps: &[f64], train_sigmas: &[f64]) -> Vec<f64> {
    let (first, last) = match (train_sigmas.first(), train_sigmas.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return Vec::new(),
    };
    let top = (train_sigmas.len() - 1) as f64;
    timesteps
        .iter()
        .map(|&x| {
            if x <= 0.0 {
                return first;
            }
            if x >= top {
                return last;
            }
            let j = x.floor();
            let at = |k: f64| train_sigmas.get(k as usize).copied().unwrap_or(last);
            let lo = at(j);
            if x == j {
                lo
            } else {
                (at(j + 1.0) - lo) * (x - j) + lo
            }
        })
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating linearly
/// in `log σ` between the neighbouring training sigmas (`log_sigmas`, float32 values).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    if log_sigmas.len() < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (low, high) = match (log_sigmas.get(low_idx), log_sigmas.get(low_idx + 1)) {
        (Some(&l), Some(&h)) => (l, h),
        _ => return 0.0,
    };
    // `low - high` is a float32 difference in diffusers.
    let w = ((low - log_sigma) / (low as f32 - high as f32) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// `n` sigmas from `sigma_max` down to `sigma_min`, evenly spaced in `log σ`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let (start, stop) = (sigma_max.ln(), sigma_min.ln());
    let step = if n > 1 {
        (stop - start) / (n - 1) as f64
    } else {
        0.0
    };
    (0..n)
        .map(|i| {
            if n > 1 && i == n - 1 {
                stop.exp()
            } else {
                (start + i as f64 * step).exp()
            }
        })
        .collect()
}

/// Inference sigmas (without the final one) and their timesteps, before each family's own
/// dtype handling.
#[derive(Debug, Clone, PartialEq)]
pub struct SigmaPlan {
    /// The sigmas, highest first, in f64 (diffusers' numpy values before the float32 cast).
    pub sigmas: Vec<f64>,
    /// The timesteps: the spaced ones, or for Karras/exponential sigmas the fractional
    /// timesteps mapped back from the sigmas (f64).
    pub timesteps: Vec<f64>,
}

/// The sigma schedule for the spaced `timesteps`, as the k-diffusion family's `set_timesteps`
/// computes it: interpolate the training sigmas, then optionally respace them (Karras or
/// exponential, `num_inference_steps` values between `bounds` or the interpolated ends) and map
/// them back to timesteps.
pub fn sigma_plan(
    train_sigmas: &[f64],
    timesteps: Vec<f64>,
    spacing: SigmaSpacing,
    num_inference_steps: usize,
    bounds: SigmaBounds,
) -> SigmaPlan {
    let interpolated = interp_sigmas(&timesteps, train_sigmas);
    let lo = bounds
        .min
        .or_else(|| interpolated.last().copied())
        .unwrap_or(0.0);
    let hi = bounds
        .max
        .or_else(|| interpolated.first().copied())
        .unwrap_or(0.0);
    let sigmas = match spacing {
        SigmaSpacing::Interpolated => {
            return SigmaPlan {
                sigmas: interpolated,
                timesteps,
            }
        }
        SigmaSpacing::Karras => karras_sigmas(lo, hi, num_inference_steps),
        SigmaSpacing::Exponential => exponential_sigmas(lo, hi, num_inference_steps),
    };
    let logs = log_sigmas(train_sigmas);
    let timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs)).collect();
    SigmaPlan { sigmas, timesteps }
}

/// The untouched training schedule Euler-type schedulers hold before `set_timesteps`:
/// timesteps `T-1 … 0` and the flipped training sigmas followed by 0, as float32 values.
pub fn training_schedule(train_sigmas: &[f64], num_train_timesteps: usize) -> (Vec<f64>, Vec<f64>) {
    let timesteps = (0..num_train_timesteps).rev().map(|t| t as f64).collect();
    let sigmas = train_sigmas
        .iter()
        .rev()
        .copied()
        .chain(std::iter::once(0.0))
        .collect();
    (timesteps, sigmas)
}

/// `init_noise_sigma` of the sigma schedulers: the largest σ for `linspace`/`trailing` spacing,
/// else `sqrt(σ_max² + 1)` (computed in float32).
pub fn init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max) as f32;
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// The input scaling of the sigma schedulers: `sample / sqrt(σ² + 1)`.
///
/// # Errors
/// Tensor failures.
pub fn scale_by_sigma(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)?)
}

/// The denoised estimate x₀ at noise level `sigma` from the model output
/// (`pred_original_sample` of the sigma schedulers).
///
/// # Errors
/// Tensor failures (e.g. mismatched shapes or dtypes).
pub fn predict_original(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => sample.sub(&model_output.affine(sigma, 0.0)?)?,
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            model_output
                .affine(-sigma / s2.sqrt(), 0.0)?
                .add(&sample.affine(1.0 / s2, 0.0)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

/// The dtype a step is computed in: half-precision inputs are upcast to f32 (as diffusers'
/// Euler schedulers do), other dtypes are kept.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// `values[index]`, or an error naming `what` when the schedule has no such entry.
///
/// # Errors
/// [`Error::InvalidArgument`] when `index` is past the end.
pub fn value_at(values: &[f64], index: usize, what: &str) -> Result<f64> {
    values.get(index).copied().ok_or_else(|| {
        Error::invalid(format!(
            "{what} index {index} is outside the schedule ({} entries); was set_timesteps called?",
            values.len()
        ))
    })
}

/// diffusers' `index_for_timestep`: the position of `timestep` in `timesteps`, taking the second
/// match when the value occurs more than once (so that a schedule entered mid-way does not skip a
/// sigma).
///
/// # Errors
/// [`Error::InvalidArgument`] when `timestep` is not in the schedule.
pub fn index_for_timestep(timesteps: &[f64], timestep: f64) -> Result<usize> {
    let hits: Vec<usize> = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i)
        .collect();
    let pos = usize::from(hits.len() > 1);
    hits.get(pos)
        .copied()
        .ok_or_else(|| Error::invalid(format!("timestep {timestep} is not in the schedule")))
}

/// Step-index bookkeeping of the sigma schedulers (diffusers' `_step_index`, `_begin_index`,
/// `_init_step_index`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCursor {
    step: Option<usize>,
    begin: Option<usize>,
}

impl StepCursor {
    /// Forgets the step and begin indices (what `set_timesteps` does).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Sets the index the first step starts from.
    pub fn set_begin(&mut self, begin_index: usize) {
        self.begin = Some(begin_index);
    }

    /// The current step index, initialised on first use from the begin index or, when none was
    /// set, from the position of `timestep` in `timesteps`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `timestep` is not in the schedule or every timestep has
    /// already been stepped.
    pub fn current(&mut self, timesteps: &[f64], timestep: f64) -> Result<usize> {
        let index = match (self.step, self.begin) {
            (Some(s), _) => s,
            (None, Some(b)) => b,
            (None, None) => index_for_timestep(timesteps, timestep)?,
        };
        if index >= timesteps.len() {
            return Err(Error::invalid(format!(
                "step index {index} is past the last of {} timesteps",
                timesteps.len()
            )));
        }
        self.step = Some(index);
        Ok(index)
    }

    /// Moves to the next timestep (after a step).
    pub fn advance(&mut self) {
        if let Some(s) = self.step.as_mut() {
            *s += 1;
        }
    }

    /// The sigma index `add_noise` uses: by timestep when no begin index was set, else the
    /// current step (inpainting, after the first step) or the begin index (img2img, before it).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a lookup by timestep fails.
    pub fn noise_index(&self, timesteps: &[f64], timestep: f64) -> Result<usize> {
        match (self.begin, self.step) {
            (None, _) => index_for_timestep(timesteps, timestep),
            (Some(_), Some(s)) => Ok(s),
            (Some(b), None) => Ok(b),
        }
    }
}

/// `original + noise · σ`, the forward process of the sigma schedulers.
///
/// # Errors
/// Tensor failures (mismatched shapes or dtypes).
pub fn add_sigma_noise(original: &Tensor, noise: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(original.add(&noise.affine(sigma, 0.0)?)?)
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
    fn zero_snr_ends_at_zero() {
        let b = betas("scaled_linear", 0.00085, 0.012, 1000, None).unwrap_or_default();
        let r = rescale_zero_terminal_snr(&b);
        let ac = alphas_cumprod(&r);
        assert!(ac[999].abs() < 1e-6, "terminal alpha_bar {}", ac[999]);
    }

    #[test]
    fn unknown_schedule_is_an_error() {
        assert!(betas("cosine-ish", 0.1, 0.2, 10, None).is_err());
    }
}

#[cfg(test)]
mod sigma_tests {
    use super::*;

    #[test]
    fn leading_and_trailing_match_diffusers() {
        let lead = spaced_timesteps(TimestepSpacing::Leading, 1000, 4, 1).unwrap_or_default();
        assert_eq!(lead, vec![751.0, 501.0, 251.0, 1.0]);
        let trail = spaced_timesteps(TimestepSpacing::Trailing, 1000, 4, 1).unwrap_or_default();
        assert_eq!(trail, vec![999.0, 749.0, 499.0, 249.0]);
        // numpy rounds half to even: 1000 - 62.5 * 3 = 812.5 -> 812.
        let t16 = spaced_timesteps(TimestepSpacing::Trailing, 1000, 16, 0).unwrap_or_default();
        assert_eq!(t16.get(3).copied(), Some(811.0));
        let lin = spaced_timesteps(TimestepSpacing::Linspace, 1000, 1, 0).unwrap_or_default();
        assert_eq!(lin, vec![0.0]);
    }

    #[test]
    fn step_count_is_validated() {
        assert!(spaced_timesteps(TimestepSpacing::Leading, 1000, 0, 0).is_err());
        assert!(spaced_timesteps(TimestepSpacing::Leading, 1000, 1001, 0).is_err());
    }

    #[test]
    fn sigma_to_t_inverts_interpolation() {
        let b = betas("scaled_linear", 0.00085, 0.012, 1000, None).unwrap_or_default();
        let train = training_sigmas(&b, false).unwrap_or_default();
        let logs = log_sigmas(&train);
        for t in [0.0, 1.0, 250.0, 998.0, 999.0] {
            let s = interp_sigmas(&[t], &train);
            let back = sigma_to_t(s.first().copied().unwrap_or(0.0), &logs);
            assert!((back - t).abs() < 1e-3, "{t} -> {back}");
        }
    }

    #[test]
    fn index_lookup_takes_second_duplicate() {
        let ts = [999.0, 500.0, 500.0, 1.0];
        assert_eq!(index_for_timestep(&ts, 500.0).ok(), Some(2));
        assert_eq!(index_for_timestep(&ts, 1.0).ok(), Some(3));
        assert!(index_for_timestep(&ts, 2.0).is_err());
    }
}
