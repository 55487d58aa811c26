//! DPM-Solver-2 style sampler (k-diffusion's `sample_dpm_2`), as diffusers'
//! `KDPM2DiscreteScheduler`.
//!
//! Each step takes an Euler half step to the log-midpoint `σ_mid` of two noise levels,
//! evaluates the model there (the interleaved midpoint timestep), and takes the full step with
//! that midpoint slope.

use candle_core::Tensor;
use serde::Deserialize;

use super::arith::compute_dtype;
use super::noising::add_sigma_noise;
use super::prediction::{denoised, PredictionType};
use super::schedule::{betas, f32_round};
use super::sigmas::{
    log_sigmas, scale_by_sigma, sigma_to_t_f32, training_sigmas, KSigmaSource, SigmaBounds,
    SigmaFlags, SigmaSpacing,
};
use super::spacing::TimestepSpacing;
use super::stepping::{repeat_after_first, schedule_accessors, value_at, StepSchedule};
use super::{NoiseSource, Scheduler, SchedulerConfig, StepOutput};
use crate::error::{Error, Result};

/// `KDPM2DiscreteScheduler`'s config, field for field, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct KDpm2DiscreteConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First training beta.
    pub beta_start: f64,
    /// Last training beta.
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    /// Explicit training betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// Karras sigmas (the timesteps are then rounded, float64).
    pub use_karras_sigmas: Option<bool>,
    /// Exponentially spaced sigmas.
    pub use_exponential_sigmas: Option<bool>,
    /// Beta-distribution sigmas (not supported).
    pub use_beta_sigmas: Option<bool>,
    /// What the model predicts (`sample` is not supported by this sampler).
    pub prediction_type: PredictionType,
    /// How timesteps are spread over the training range.
    pub timestep_spacing: TimestepSpacing,
    /// Offset added to `leading` timesteps.
    pub steps_offset: usize,
    /// Not a parameter of this class: diffusers keeps it when the source config has it and then
    /// uses it as the lower bound of Karras/exponential sigmas.
    pub sigma_min: Option<f64>,
    /// Upper counterpart of [`KDpm2DiscreteConfig::sigma_min`].
    pub sigma_max: Option<f64>,
}

impl Default for KDpm2DiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

/// The KDPM2 scheduler (`KDPM2DiscreteScheduler`).
#[derive(Debug, Clone)]
pub struct KDpm2Discrete {
    config: KDpm2DiscreteConfig,
    source: KSigmaSource,
    schedule: StepSchedule,
    sigmas_interpol: Vec<f64>,
    /// The sample before the first half step; `Some` while in the second half.
    first_sample: Option<Tensor>,
}

/// `σ_k` and `σ_{k-1}` interpolated in log space (torch's float32 `lerp` at 0.5), the midpoint
/// noise level of k-diffusion's DPM-2.
fn log_midpoint(sigma: f64, sigma_prev: f64) -> f64 {
    let (a, b) = ((sigma as f32).ln(), (sigma_prev as f32).ln());
    (b - (b - a) * 0.5).exp() as f64
}

/// `[v0, v1, v1, …, vn, vn, vn]`: diffusers' `cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])`.
fn interleave_twice(values: &[f64]) -> Vec<f64> {
    repeat_after_first(values)
        .chain(values.last().copied())
        .collect()
}

impl KDpm2Discrete {
    /// Builds the scheduler from a (possibly foreign) scheduler config plus overrides, like
    /// `KDPM2DiscreteScheduler.from_config(config)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a malformed or inconsistent config,
    /// [`Error::Unsupported`] for `prediction_type = "sample"`, beta sigmas or an unknown beta
    /// schedule.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?)
    }

    /// Builds the scheduler from its typed config.
    ///
    /// # Errors
    /// As [`KDpm2Discrete::from_config`].
    pub fn new(config: KDpm2DiscreteConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::unsupported(
                "KDpm2Discrete with prediction_type `sample`",
            ));
        }
        let spacing = SigmaFlags::from_options(
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        )
        .spacing()?;
        let betas = betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
        )?;
        let source = KSigmaSource {
            train_sigmas: training_sigmas(&betas, false)?,
            num_train_timesteps: config.num_train_timesteps,
            timestep_spacing: config.timestep_spacing,
            steps_offset: config.steps_offset,
            spacing,
            bounds: SigmaBounds {
                min: config.sigma_min,
                max: config.sigma_max,
            },
        };
        let schedule = StepSchedule::k_diffusion(config.timestep_spacing);
        let mut this = Self {
            config,
            source,
            schedule,
            sigmas_interpol: Vec::new(),
            first_sample: None,
        };
        // diffusers' constructor runs `set_timesteps(num_train_timesteps)`.
        this.set_timesteps(this.config.num_train_timesteps)?;
        Ok(this)
    }

    /// The typed config.
    pub fn config(&self) -> &KDpm2DiscreteConfig {
        &self.config
    }

    fn midpoint_sigma(&self, i: usize) -> Result<f64> {
        value_at(&self.sigmas_interpol, i, "midpoint sigma")
    }
}

impl Scheduler for KDpm2Discrete {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let plan = self.source.plan(num_inference_steps)?;
        // Karras timesteps are rounded (and stay float64), exponential ones stay fractional
        // float64, interpolated ones are the float32 spaced timesteps.
        let main: Vec<f64> = match self.source.spacing {
            SigmaSpacing::Karras => plan.timesteps.iter().map(|t| t.round_ties_even()).collect(),
            SigmaSpacing::Exponential | SigmaSpacing::Interpolated | SigmaSpacing::LuLambdas => {
                plan.timesteps
            }
        };
        let sigmas: Vec<f64> = plan
            .sigmas
            .iter()
            .copied()
            .chain(std::iter::once(0.0))
            .map(f32_round)
            .collect();
        // Midpoints between σ_k and σ_{k-1}; entry 0 pairs σ_0 with the final 0 (torch's `roll`)
        // and is never used.
        let interpol: Vec<f64> = sigmas
            .iter()
            .enumerate()
            .map(|(k, &s)| {
                let prev = k
                    .checked_sub(1)
                    .and_then(|p| sigmas.get(p))
                    .or(sigmas.last())
                    .copied()
                    .unwrap_or(0.0);
                log_midpoint(s, prev)
            })
            .collect();
        let logs = log_sigmas(&self.source.train_sigmas);
        // [t0, mid1, t1, mid2, t2, …, mid_{n-1}, t_{n-1}]
        let mids = interpol.iter().skip(1).map(|&s| sigma_to_t_f32(s, &logs));
        let timesteps = main
            .first()
            .copied()
            .into_iter()
            .chain(mids.zip(main.iter().skip(1)).flat_map(|(mid, &t)| [mid, t]))
            .collect();
        self.schedule.set(timesteps, interleave_twice(&sigmas));
        self.sigmas_interpol = interleave_twice(&interpol);
        self.first_sample = None;
        Ok(())
    }

    schedule_accessors!();

    fn order(&self) -> usize {
        2
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.schedule.step_index(timestep)?;
        let sigma = if self.first_sample.is_none() {
            self.schedule.sigma(i)?
        } else {
            self.midpoint_sigma(i)?
        };
        scale_by_sigma(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.schedule.step_index(timestep)?;
        let dtype = compute_dtype(model_output.dtype());
        let (mo, x) = (model_output.to_dtype(dtype)?, sample.to_dtype(dtype)?);
        let prediction = self.config.prediction_type;
        let (prev, x0) = match self.first_sample.take() {
            None => {
                // Euler half step from σ_i down to the midpoint.
                let sigma = self.schedule.sigma(i)?;
                let sigma_mid = self.midpoint_sigma(i + 1)?;
                let x0 = denoised(prediction, &mo, &x, sigma)?;
                let derivative = x.sub(&x0)?.affine(1.0 / sigma, 0.0)?;
                let prev = x.add(&derivative.affine(sigma_mid - sigma, 0.0)?)?;
                self.first_sample = Some(x);
                (prev, x0)
            }
            Some(first) => {
                // Full step from σ_{i-1} to σ_i with the slope at the midpoint.
                let prev_index = i.checked_sub(1).ok_or_else(|| {
                    Error::invalid("KDPM2's second half cannot run at step index 0")
                })?;
                let sigma = self.schedule.sigma(prev_index)?;
                let sigma_mid = self.midpoint_sigma(i)?;
                let sigma_next = self.schedule.sigma(i)?;
                let x0 = denoised(prediction, &mo, &x, sigma_mid)?;
                let derivative = x.sub(&x0)?.affine(1.0 / sigma_mid, 0.0)?;
                let prev = first.add(&derivative.affine(sigma_next - sigma, 0.0)?)?;
                (prev, x0)
            }
        };
        self.schedule.advance();
        Ok(StepOutput {
            prev_sample: prev.to_dtype(model_output.dtype())?,
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_sigma_noise(original, noise, self.schedule.noise_sigma(timestep)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn midpoint_is_geometric_mean() {
        assert!((log_midpoint(4.0, 9.0) - 6.0).abs() < 1e-5);
        assert_eq!(log_midpoint(0.0, 2.0), 0.0);
    }

    #[test]
    fn schedule_shape_matches_diffusers() {
        let mut s = KDpm2Discrete::new(KDpm2DiscreteConfig::default()).unwrap();
        s.set_timesteps(10).unwrap();
        assert_eq!(s.timesteps().len(), 19);
        assert_eq!(s.sigmas().map(<[f64]>::len), Some(22));
    }
}
