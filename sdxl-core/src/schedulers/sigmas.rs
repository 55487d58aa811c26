//! Noise levels (σ) of the sigma-based families: interpolating the training sigmas at the
//! spaced timesteps, respacing them (Karras, exponential, Lu's λ), mapping sigmas back to
//! timesteps, and the k-diffusion input scaling.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::schedule::{f32_round, train_alphas_cumprod, vp_sigmas, TerminalAlpha};
use super::spacing::{np_linspace, spaced_timesteps, TimestepSpacing};
use crate::error::{Error, Result};

/// `final_sigmas_type`: the σ the last step lands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// σ = 0: a fully denoised result.
    Zero,
    /// The smallest training σ.
    SigmaMin,
}

/// Which noise levels a scheduler steps through, chosen by the `use_karras_sigmas`,
/// `use_exponential_sigmas`, `use_lu_lambdas` (DPM-Solver only) and `use_beta_sigmas` /
/// `use_flow_sigmas` (not supported) flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SigmaSpacing {
    /// The training sigmas interpolated at the spaced timesteps.
    Interpolated,
    /// Karras et al. (2022), evenly spaced in `σ^(1/7)`.
    Karras,
    /// Evenly spaced in `log σ`.
    Exponential,
    /// Evenly spaced in `log σ` over the whole training range (Lu et al. 2022's λ spacing).
    LuLambdas,
}

/// The sigma-spacing flags of a config (absent flags are `false`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SigmaFlags {
    /// `use_karras_sigmas`.
    pub karras: bool,
    /// `use_exponential_sigmas`.
    pub exponential: bool,
    /// `use_beta_sigmas`.
    pub beta: bool,
    /// `use_lu_lambdas`.
    pub lu: bool,
    /// `use_flow_sigmas`.
    pub flow: bool,
}

impl SigmaFlags {
    /// The flags of the k-diffusion families, whose configs hold them as optional booleans.
    pub(crate) fn from_options(
        karras: Option<bool>,
        exponential: Option<bool>,
        beta: Option<bool>,
    ) -> Self {
        Self {
            karras: karras.unwrap_or(false),
            exponential: exponential.unwrap_or(false),
            beta: beta.unwrap_or(false),
            ..Self::default()
        }
    }

    /// The spacing these flags select (Karras before Lu before exponential, as diffusers).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when more than one of Karras/exponential/beta is set;
    /// [`Error::Unsupported`] for beta sigmas (they need scipy's inverse incomplete beta
    /// function) and flow sigmas.
    pub(crate) fn spacing(self) -> Result<SigmaSpacing> {
        if [self.karras, self.exponential, self.beta]
            .iter()
            .filter(|&&f| f)
            .count()
            > 1
        {
            return Err(Error::invalid(
                "only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas may be set",
            ));
        }
        if self.beta || self.flow {
            return Err(Error::unsupported(
                "use_beta_sigmas / use_flow_sigmas are not implemented",
            ));
        }
        Ok(if self.karras {
            SigmaSpacing::Karras
        } else if self.lu {
            SigmaSpacing::LuLambdas
        } else if self.exponential {
            SigmaSpacing::Exponential
        } else {
            SigmaSpacing::Interpolated
        })
    }
}

/// Explicit σ range for Karras/exponential sigmas (`sigma_min`/`sigma_max` config keys); `None`
/// takes the end of [`BoundsFrom`]'s sigmas.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct SigmaBounds {
    /// Smallest σ, or `None` for the default.
    pub min: Option<f64>,
    /// Largest σ, or `None` for the default.
    pub max: Option<f64>,
}

/// Where the default σ range of Karras/exponential sigmas comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BoundsFrom {
    /// The ends of the interpolated schedule (the k-diffusion families).
    Schedule,
    /// The ends of the training sigmas (DPM-Solver++, UniPC).
    Training,
}

/// σ of every training timestep for the k-diffusion families, in float32, indexed by timestep;
/// with `rescale_zero_snr` the betas are rescaled to zero terminal SNR and the last σ kept finite.
///
/// # Errors
/// [`Error::InvalidArgument`] when there are fewer than two training timesteps.
pub(crate) fn training_sigmas(betas: &[f64], rescale_zero_snr: bool) -> Result<Vec<f64>> {
    if betas.len() < 2 {
        return Err(Error::invalid(format!(
            "a sigma schedule needs at least 2 training timesteps, got {}",
            betas.len()
        )));
    }
    let ac = train_alphas_cumprod(betas, rescale_zero_snr, TerminalAlpha::Finite)?;
    Ok(vp_sigmas(&ac))
}

/// `np.log` of float32 training sigmas, in float32.
pub(crate) fn log_sigmas(train_sigmas: &[f64]) -> Vec<f64> {
    train_sigmas
        .iter()
        .map(|&s| (s as f32).ln() as f64)
        .collect()
}

/// `np.interp(timesteps, arange(len(sigmas)), sigmas)`: training sigmas at fractional timesteps,
/// clamped to the ends.
pub(crate) fn interp_sigmas(timesteps: &[f64], train_sigmas: &[f64]) -> Vec<f64> {
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

/// The index diffusers' `_sigma_to_t` interpolates from: the last training step whose `log σ`
/// is at most `log_sigma` (`cumsum(dists >= 0).argmax()`), clipped to the second-to-last; `None`
/// with fewer than two training sigmas.
fn low_index(log_sigma: f64, log_sigmas: &[f64]) -> Option<usize> {
    let top = log_sigmas.len().checked_sub(2)?;
    Some(
        log_sigmas
            .iter()
            .rposition(|&l| log_sigma - l >= 0.0)
            .unwrap_or(0)
            .min(top),
    )
}

/// The `log σ` of training steps `i` and `i + 1`.
fn bracket(log_sigmas: &[f64], i: usize) -> Option<(f64, f64)> {
    Some((*log_sigmas.get(i)?, *log_sigmas.get(i + 1)?))
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating linearly
/// in `log σ` between the neighbouring training sigmas (`log_sigmas`, float32 values; their
/// difference is a float32 difference in numpy).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let Some(i) = low_index(log_sigma, log_sigmas) else {
        return 0.0;
    };
    let Some((low, high)) = bracket(log_sigmas, i) else {
        return 0.0;
    };
    let w = ((low - log_sigma) / (low as f32 - high as f32) as f64).clamp(0.0, 1.0);
    (1.0 - w) * i as f64 + w * (i + 1) as f64
}

/// [`sigma_to_t`] in float32 torch arithmetic, as diffusers' KDPM2 evaluates it for its
/// midpoint sigmas.
pub(crate) fn sigma_to_t_f32(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = (sigma as f32).max(1e-10).ln();
    let Some(i) = low_index(f64::from(log_sigma), log_sigmas) else {
        return 0.0;
    };
    let Some((low, high)) = bracket(log_sigmas, i) else {
        return 0.0;
    };
    let (low, high) = (low as f32, high as f32);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    ((1.0 - w) * i as f32 + w * (i + 1) as f32) as f64
}

/// Karras et al. (2022) noise levels: `n` sigmas from `sigma_max` down to `sigma_min` with
/// `rho` = 7, spaced evenly in `sigma^(1/rho)`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
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

/// `n` sigmas from `sigma_max` down to `sigma_min`, evenly spaced in `log σ`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// Lu et al. (2022)'s spacing: `n` sigmas evenly spaced in `log σ` from the last training σ
/// down to the first.
fn lu_sigmas(log_sigmas: &[f64], n: usize) -> Vec<f64> {
    let lambda_min = log_sigmas.first().copied().unwrap_or(0.0);
    let lambda_max = log_sigmas.last().copied().unwrap_or(0.0);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (lambda_max + r * (lambda_min - lambda_max)).exp())
        .collect()
}

/// Inference sigmas (without the final one) and their timesteps, before each family's own
/// dtype handling.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SigmaPlan {
    /// The sigmas, highest first, in f64 (diffusers' numpy values before the float32 cast).
    pub sigmas: Vec<f64>,
    /// The timesteps: the spaced ones, or for respaced sigmas the fractional timesteps mapped
    /// back from the sigmas (f64).
    pub timesteps: Vec<f64>,
}

/// The sigma schedule for the spaced `timesteps`: interpolate the training sigmas, then
/// optionally respace them (`num_inference_steps` values between `bounds`, or the ends that
/// `from` names) and map them back to timesteps.
fn sigma_plan(
    train_sigmas: &[f64],
    timesteps: Vec<f64>,
    spacing: SigmaSpacing,
    num_inference_steps: usize,
    bounds: SigmaBounds,
    from: BoundsFrom,
) -> SigmaPlan {
    let interpolated = interp_sigmas(&timesteps, train_sigmas);
    let (default_min, default_max) = match from {
        BoundsFrom::Schedule => (interpolated.last(), interpolated.first()),
        BoundsFrom::Training => (train_sigmas.first(), train_sigmas.last()),
    };
    let lo = bounds.min.or(default_min.copied()).unwrap_or(0.0);
    let hi = bounds.max.or(default_max.copied()).unwrap_or(0.0);
    let logs = log_sigmas(train_sigmas);
    let sigmas = match spacing {
        SigmaSpacing::Interpolated => {
            return SigmaPlan {
                sigmas: interpolated,
                timesteps,
            }
        }
        SigmaSpacing::Karras => karras_sigmas(lo, hi, num_inference_steps),
        SigmaSpacing::Exponential => exponential_sigmas(lo, hi, num_inference_steps),
        SigmaSpacing::LuLambdas => lu_sigmas(&logs, num_inference_steps),
    };
    let timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs)).collect();
    SigmaPlan { sigmas, timesteps }
}

/// The sigmas of the multistep solvers (DPM-Solver++, UniPC) for their integer `timesteps`:
/// the training sigmas there, or respaced between `bounds` or the training range with the
/// timesteps mapped back, rounded for Karras/Lu sigmas when `round` and otherwise truncated
/// (numpy's `astype(int64)`).
pub(crate) fn multistep_plan(
    train_sigmas: &[f64],
    timesteps: Vec<f64>,
    spacing: SigmaSpacing,
    num_inference_steps: usize,
    bounds: SigmaBounds,
    round: bool,
) -> SigmaPlan {
    let mut plan = sigma_plan(
        train_sigmas,
        timesteps,
        spacing,
        num_inference_steps,
        bounds,
        BoundsFrom::Training,
    );
    let round = round && matches!(spacing, SigmaSpacing::Karras | SigmaSpacing::LuLambdas);
    for t in &mut plan.timesteps {
        *t = if round {
            t.round_ties_even()
        } else {
            t.trunc()
        };
    }
    plan
}

/// How a k-diffusion family (Euler, Euler ancestral, Heun, KDPM2, LMS) turns a step count into
/// its schedule: the training sigmas and the spacing options of its config.
#[derive(Debug, Clone)]
pub(crate) struct KSigmaSource {
    /// σ of every training timestep ([`training_sigmas`]).
    pub train_sigmas: Vec<f64>,
    /// `num_train_timesteps`.
    pub num_train_timesteps: usize,
    /// `timestep_spacing`.
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset`.
    pub steps_offset: usize,
    /// The sigma spacing the flags select.
    pub spacing: SigmaSpacing,
    /// `sigma_min`/`sigma_max`.
    pub bounds: SigmaBounds,
}

impl KSigmaSource {
    /// The plan for `n` steps: float32 spaced timesteps, their interpolated sigmas, optionally
    /// respaced between the bounds or the interpolated ends.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `n` is 0 or exceeds `num_train_timesteps`.
    pub(crate) fn plan(&self, n: usize) -> Result<SigmaPlan> {
        let spaced = spaced_timesteps(
            self.timestep_spacing,
            self.num_train_timesteps,
            n,
            self.steps_offset,
        )?
        .into_iter()
        .map(f32_round)
        .collect();
        Ok(sigma_plan(
            &self.train_sigmas,
            spaced,
            self.spacing,
            n,
            self.bounds,
            BoundsFrom::Schedule,
        ))
    }

    /// The untouched training schedule Euler-type schedulers hold before `set_timesteps`:
    /// timesteps `T-1 … 0` and the flipped training sigmas followed by 0, as float32 values.
    pub(crate) fn training_schedule(&self) -> (Vec<f64>, Vec<f64>) {
        let timesteps = (0..self.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        let sigmas = self
            .train_sigmas
            .iter()
            .rev()
            .copied()
            .chain(std::iter::once(0.0))
            .collect();
        (timesteps, sigmas)
    }
}

/// `init_noise_sigma` of the k-diffusion families for `sigmas`: the largest σ for `linspace` /
/// `trailing` spacing, else `sqrt(σ_max² + 1)` (computed in float32).
pub(crate) fn k_init_noise_sigma(spacing: TimestepSpacing, sigmas: &[f64]) -> f64 {
    let max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max) as f32;
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// The input scaling of the k-diffusion families: `sample / sqrt(σ² + 1)`.
///
/// # Errors
/// Tensor failures.
pub(crate) fn scale_by_sigma(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)?)
}

#[cfg(test)]
mod tests {
    use super::super::schedule::betas;
    use super::*;

    fn sdxl_sigmas() -> Vec<f64> {
        let b = betas("scaled_linear", 0.00085, 0.012, 1000, None).unwrap_or_default();
        training_sigmas(&b, false).unwrap_or_default()
    }

    #[test]
    fn sigma_to_t_inverts_interpolation() {
        let train = sdxl_sigmas();
        let logs = log_sigmas(&train);
        for t in [0.0, 1.0, 250.0, 500.0, 998.0, 999.0] {
            let s = interp_sigmas(&[t], &train);
            let s = s.first().copied().unwrap_or(0.0);
            let back = sigma_to_t(s, &logs);
            assert!((back - t).abs() < 1e-3, "{t} -> {back}");
            let back32 = sigma_to_t_f32(s, &logs);
            assert!((back32 - t).abs() < 1e-2, "{t} -> {back32} (f32)");
        }
        assert_eq!(sigma_to_t(1.0, &[0.5]), 0.0);
    }

    #[test]
    fn flags_select_one_spacing() {
        let flags = |karras, exponential, beta, lu| SigmaFlags {
            karras,
            exponential,
            beta,
            lu,
            flow: false,
        };
        assert_eq!(
            flags(true, false, false, true).spacing().ok(),
            Some(SigmaSpacing::Karras)
        );
        assert_eq!(
            flags(false, true, false, true).spacing().ok(),
            Some(SigmaSpacing::LuLambdas)
        );
        assert!(matches!(
            flags(true, true, false, false).spacing(),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            flags(false, false, true, false).spacing(),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn respaced_sigmas_span_the_bounds() {
        let train = sdxl_sigmas();
        let ts: Vec<f64> = vec![999.0, 500.0, 1.0];
        let bounds = SigmaBounds {
            min: Some(0.1),
            max: Some(10.0),
        };
        for spacing in [SigmaSpacing::Karras, SigmaSpacing::Exponential] {
            let plan = sigma_plan(&train, ts.clone(), spacing, 5, bounds, BoundsFrom::Schedule);
            assert_eq!(plan.sigmas.len(), 5);
            assert!((plan.sigmas[0] - 10.0).abs() < 1e-9 && (plan.sigmas[4] - 0.1).abs() < 1e-9);
            assert!(plan.timesteps.windows(2).all(|w| w[0] > w[1]));
        }
        let lu = sigma_plan(
            &train,
            ts,
            SigmaSpacing::LuLambdas,
            4,
            bounds,
            BoundsFrom::Training,
        );
        let last = train.last().copied().unwrap_or(0.0);
        assert!((lu.sigmas[0] - last).abs() < 1e-4 * last);
    }
}
