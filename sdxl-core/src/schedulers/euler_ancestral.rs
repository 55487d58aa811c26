//! Ancestral Euler sampler (k-diffusion's `sample_euler_ancestral`), as diffusers'
//! `EulerAncestralDiscreteScheduler`: each step moves deterministically down to `σ_down` and
//! adds fresh noise of size `σ_up`. SDXL-Turbo ships with it (`trailing` spacing).

use candle_core::Tensor;
use serde::Deserialize;

use super::arith::compute_dtype;
use super::noising::add_sigma_noise;
use super::prediction::{denoised, PredictionType};
use super::schedule::{betas, f32_round};
use super::sigmas::{training_sigmas, KSigmaSource, SigmaBounds, SigmaSpacing};
use super::spacing::TimestepSpacing;
use super::stepping::{schedule_accessors, StepSchedule};
use super::{NoiseSource, Scheduler, SchedulerConfig, StepOutput};
use crate::error::{Error, Result};

/// `EulerAncestralDiscreteScheduler`'s config, field for field, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct EulerAncestralDiscreteConfig {
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
    /// What the model predicts (`sample` is not supported by this sampler).
    pub prediction_type: PredictionType,
    /// How timesteps are spread over the training range.
    pub timestep_spacing: TimestepSpacing,
    /// Offset added to `leading` timesteps.
    pub steps_offset: usize,
    /// Rescale the betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for EulerAncestralDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// The ancestral Euler scheduler (`EulerAncestralDiscreteScheduler`).
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscrete {
    config: EulerAncestralDiscreteConfig,
    source: KSigmaSource,
    schedule: StepSchedule,
}

impl EulerAncestralDiscrete {
    /// Builds the scheduler from a (possibly foreign) scheduler config plus overrides, like
    /// `EulerAncestralDiscreteScheduler.from_config(config)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a malformed config, [`Error::Unsupported`] for
    /// `prediction_type = "sample"` or an unknown beta schedule.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?)
    }

    /// Builds the scheduler from its typed config.
    ///
    /// # Errors
    /// As [`EulerAncestralDiscrete::from_config`].
    pub fn new(config: EulerAncestralDiscreteConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::unsupported(
                "EulerAncestralDiscrete with prediction_type `sample`",
            ));
        }
        let betas = betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
        )?;
        let source = KSigmaSource {
            train_sigmas: training_sigmas(&betas, config.rescale_betas_zero_snr)?,
            num_train_timesteps: config.num_train_timesteps,
            timestep_spacing: config.timestep_spacing,
            steps_offset: config.steps_offset,
            spacing: SigmaSpacing::Interpolated,
            bounds: SigmaBounds::default(),
        };
        let (timesteps, sigmas) = source.training_schedule();
        let mut schedule = StepSchedule::k_diffusion(config.timestep_spacing);
        schedule.set(timesteps, sigmas);
        Ok(Self {
            config,
            source,
            schedule,
        })
    }

    /// The typed config.
    pub fn config(&self) -> &EulerAncestralDiscreteConfig {
        &self.config
    }
}

/// The ancestral split of a step from `sigma_from` to `sigma_to`: the deterministic target
/// `σ_down` and the size `σ_up` of the fresh noise, with `σ_down² + σ_up² = σ_to²`.
fn ancestral_sigmas(sigma_from: f64, sigma_to: f64) -> (f64, f64) {
    let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
    let up = (to2 * (from2 - to2) / from2).sqrt();
    let down = (to2 - up * up).sqrt();
    (down, up)
}

impl Scheduler for EulerAncestralDiscrete {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let plan = self.source.plan(num_inference_steps)?;
        let sigmas = plan
            .sigmas
            .into_iter()
            .chain(std::iter::once(0.0))
            .map(f32_round)
            .collect();
        self.schedule.set(plan.timesteps, sigmas);
        Ok(())
    }

    schedule_accessors!();

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let (i, sigma) = self.schedule.current_sigma(timestep)?;
        let sigma_to = self.schedule.sigma(i + 1)?;
        let dtype = compute_dtype(model_output.dtype());
        let (mo, x) = (model_output.to_dtype(dtype)?, sample.to_dtype(dtype)?);
        let x0 = denoised(self.config.prediction_type, &mo, &x, sigma)?;
        let (sigma_down, sigma_up) = ancestral_sigmas(sigma, sigma_to);
        let derivative = x.sub(&x0)?.affine(1.0 / sigma, 0.0)?;
        let prev = x.add(&derivative.affine(sigma_down - sigma, 0.0)?)?;
        // diffusers draws the noise on every step, the last one (σ_up = 0) included.
        let z = noise.randn(
            model_output.dims(),
            model_output.dtype(),
            model_output.device(),
        )?;
        let prev = prev.add(&z.to_dtype(dtype)?.affine(sigma_up, 0.0)?)?;
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
mod tests {
    use super::*;

    #[test]
    fn ancestral_split_preserves_variance() {
        let (down, up) = ancestral_sigmas(3.0, 2.0);
        assert!((down * down + up * up - 4.0).abs() < 1e-12);
        assert_eq!(ancestral_sigmas(3.0, 0.0), (0.0, 0.0));
    }

    #[test]
    fn sample_prediction_is_unsupported() {
        let cfg = SchedulerConfig::default().with("prediction_type", "sample");
        assert!(matches!(
            EulerAncestralDiscrete::from_config(&cfg),
            Err(Error::Unsupported(_))
        ));
    }
}
