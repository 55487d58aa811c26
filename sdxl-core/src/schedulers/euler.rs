//! Euler sampler (Karras et al. 2022, Algorithm 2, without churn), as diffusers'
//! `EulerDiscreteScheduler`, the scheduler SDXL ships with.

use candle_core::Tensor;
use serde::Deserialize;

use super::arith::compute_dtype;
use super::noising::add_sigma_noise;
use super::prediction::{denoised, PredictionType};
use super::schedule::{betas, f32_round};
use super::sigmas::{training_sigmas, FinalSigmasType, KSigmaSource, SigmaBounds, SigmaFlags};
use super::spacing::TimestepSpacing;
use super::stepping::{schedule_accessors, value_at, StepSchedule};
use super::{NoiseSource, Scheduler, SchedulerConfig, StepOutput};
use crate::error::{Error, Result};

/// `interpolation_type`: how the training sigmas become inference sigmas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    /// Linear interpolation at the spaced timesteps (`np.interp`).
    Linear,
    /// Log-linear spacing between the extreme sigmas. Not supported: diffusers' version yields
    /// one sigma more than there are timesteps.
    LogLinear,
}

/// `timestep_type`: what the model is given as its timestep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestepType {
    /// Training timesteps (possibly fractional).
    Discrete,
    /// `0.25 · ln σ` (EDM style), used together with v-prediction.
    Continuous,
}

/// `EulerDiscreteScheduler`'s config, field for field, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct EulerDiscreteConfig {
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
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// How inference sigmas are interpolated (only `linear` is supported).
    pub interpolation_type: InterpolationType,
    /// Karras sigmas.
    pub use_karras_sigmas: Option<bool>,
    /// Exponentially spaced sigmas.
    pub use_exponential_sigmas: Option<bool>,
    /// Beta-distribution sigmas (not supported).
    pub use_beta_sigmas: Option<bool>,
    /// Lower σ bound for Karras/exponential sigmas (default: the schedule's).
    pub sigma_min: Option<f64>,
    /// Upper σ bound for Karras/exponential sigmas (default: the schedule's).
    pub sigma_max: Option<f64>,
    /// How timesteps are spread over the training range.
    pub timestep_spacing: TimestepSpacing,
    /// Discrete timesteps or `0.25 · ln σ` (the latter only with v-prediction).
    pub timestep_type: TimestepType,
    /// Offset added to `leading` timesteps.
    pub steps_offset: usize,
    /// Rescale the betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
    /// The σ after the last step.
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: TimestepType::Discrete,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

/// The Euler scheduler (`EulerDiscreteScheduler`).
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    config: EulerDiscreteConfig,
    source: KSigmaSource,
    schedule: StepSchedule,
}

impl EulerDiscrete {
    /// Builds the scheduler from a (possibly foreign) scheduler config plus overrides, like
    /// `EulerDiscreteScheduler.from_config(config)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a malformed or inconsistent config,
    /// [`Error::Unsupported`] for options this crate does not implement.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?)
    }

    /// Builds the scheduler from its typed config.
    ///
    /// # Errors
    /// As [`EulerDiscrete::from_config`].
    pub fn new(config: EulerDiscreteConfig) -> Result<Self> {
        if config.interpolation_type == InterpolationType::LogLinear {
            return Err(Error::unsupported(
                "EulerDiscrete interpolation_type `log_linear`",
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
            train_sigmas: training_sigmas(&betas, config.rescale_betas_zero_snr)?,
            num_train_timesteps: config.num_train_timesteps,
            timestep_spacing: config.timestep_spacing,
            steps_offset: config.steps_offset,
            spacing,
            bounds: SigmaBounds {
                min: config.sigma_min,
                max: config.sigma_max,
            },
        };
        let (mut timesteps, sigmas) = source.training_schedule();
        let schedule = StepSchedule::k_diffusion(config.timestep_spacing);
        let mut this = Self {
            config,
            source,
            schedule,
        };
        if this.continuous_timesteps() {
            timesteps = continuous_from_sigmas(&sigmas);
        }
        this.schedule.set(timesteps, sigmas);
        Ok(this)
    }

    /// The typed config.
    pub fn config(&self) -> &EulerDiscreteConfig {
        &self.config
    }

    fn continuous_timesteps(&self) -> bool {
        self.config.timestep_type == TimestepType::Continuous
            && self.config.prediction_type == PredictionType::VPrediction
    }
}

/// `0.25 · ln σ` (float32) for every σ but the final one.
fn continuous_from_sigmas(sigmas: &[f64]) -> Vec<f64> {
    let n = sigmas.len().saturating_sub(1);
    sigmas
        .iter()
        .take(n)
        .map(|&s| f32_round(0.25 * (s as f32).ln() as f64))
        .collect()
}

impl Scheduler for EulerDiscrete {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let plan = self.source.plan(num_inference_steps)?;
        let last = match self.config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => value_at(&self.source.train_sigmas, 0, "sigma")?,
        };
        let sigmas: Vec<f64> = plan
            .sigmas
            .iter()
            .copied()
            .chain(std::iter::once(last))
            .map(f32_round)
            .collect();
        let timesteps = if self.continuous_timesteps() {
            continuous_from_sigmas(&sigmas)
        } else {
            plan.timesteps.into_iter().map(f32_round).collect()
        };
        self.schedule.set(timesteps, sigmas);
        Ok(())
    }

    schedule_accessors!();

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let (i, sigma) = self.schedule.current_sigma(timestep)?;
        let sigma_next = self.schedule.sigma(i + 1)?;
        let dtype = compute_dtype(model_output.dtype());
        let (mo, x) = (model_output.to_dtype(dtype)?, sample.to_dtype(dtype)?);
        let x0 = denoised(self.config.prediction_type, &mo, &x, sigma)?;
        // Euler step along the ODE derivative (x - x0) / sigma (no churn: sigma_hat = sigma).
        let derivative = x.sub(&x0)?.affine(1.0 / sigma, 0.0)?;
        let prev = x.add(&derivative.affine(sigma_next - sigma, 0.0)?)?;
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
    fn defaults_mirror_diffusers() {
        let c: EulerDiscreteConfig = SchedulerConfig::default().parse().unwrap();
        assert_eq!(c.timestep_spacing, TimestepSpacing::Linspace);
        assert_eq!(c.beta_schedule, "linear");
        assert_eq!(c.final_sigmas_type, FinalSigmasType::Zero);
    }

    #[test]
    fn conflicting_sigma_flags_are_rejected() {
        let cfg = SchedulerConfig::default()
            .with("use_karras_sigmas", true)
            .with("use_exponential_sigmas", true);
        assert!(matches!(
            EulerDiscrete::from_config(&cfg),
            Err(Error::InvalidArgument(_))
        ));
        let beta = SchedulerConfig::default().with("use_beta_sigmas", true);
        assert!(matches!(
            EulerDiscrete::from_config(&beta),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn zero_steps_is_an_error() {
        let mut s = EulerDiscrete::new(EulerDiscreteConfig::default()).unwrap();
        assert!(matches!(s.set_timesteps(0), Err(Error::InvalidArgument(_))));
    }
}
