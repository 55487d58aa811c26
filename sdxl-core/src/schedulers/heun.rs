//! Heun's second-order sampler (Karras et al. 2022, Algorithm 1), as diffusers'
//! `HeunDiscreteScheduler`.
//!
//! Every timestep but the first appears twice in the schedule: the first visit takes an Euler
//! step and remembers its derivative, the second re-evaluates the model at the Euler estimate and
//! replaces that step by one with the averaged derivative. The final step is plain Euler.

use candle_core::Tensor;
use serde::Deserialize;

use super::arith::compute_dtype;
use super::noising::add_sigma_noise;
use super::prediction::{clip, denoised, PredictionType};
use super::schedule::{betas, exp_betas, f32_round};
use super::sigmas::{training_sigmas, KSigmaSource, SigmaBounds, SigmaFlags};
use super::spacing::TimestepSpacing;
use super::stepping::{repeat_after_first, schedule_accessors, StepSchedule};
use super::{NoiseSource, Scheduler, SchedulerConfig, StepOutput};
use crate::error::Result;

/// `HeunDiscreteScheduler`'s config, field for field, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct HeunDiscreteConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First training beta.
    pub beta_start: f64,
    /// Last training beta.
    pub beta_end: f64,
    /// `linear`, `scaled_linear`, `squaredcos_cap_v2` or `exp`.
    pub beta_schedule: String,
    /// Explicit training betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Karras sigmas.
    pub use_karras_sigmas: Option<bool>,
    /// Exponentially spaced sigmas.
    pub use_exponential_sigmas: Option<bool>,
    /// Beta-distribution sigmas (not supported).
    pub use_beta_sigmas: Option<bool>,
    /// Clamp the denoised estimate to `±clip_sample_range`.
    pub clip_sample: Option<bool>,
    /// The clamp bound for `clip_sample`.
    pub clip_sample_range: f64,
    /// How timesteps are spread over the training range.
    pub timestep_spacing: TimestepSpacing,
    /// Offset added to `leading` timesteps.
    pub steps_offset: usize,
    /// Not a parameter of this class: diffusers keeps it when the source config has it and then
    /// uses it as the lower bound of Karras/exponential sigmas.
    pub sigma_min: Option<f64>,
    /// Upper counterpart of [`HeunDiscreteConfig::sigma_min`].
    pub sigma_max: Option<f64>,
}

impl Default for HeunDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            clip_sample: Some(false),
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

/// What the first (Euler) half of a step leaves for the second half.
#[derive(Debug, Clone)]
struct FirstOrder {
    derivative: Tensor,
    dt: f64,
    sample: Tensor,
}

/// Heun's scheduler (`HeunDiscreteScheduler`).
#[derive(Debug, Clone)]
pub struct HeunDiscrete {
    config: HeunDiscreteConfig,
    source: KSigmaSource,
    schedule: StepSchedule,
    first_order: Option<FirstOrder>,
}

impl HeunDiscrete {
    /// Builds the scheduler from a (possibly foreign) scheduler config plus overrides, like
    /// `HeunDiscreteScheduler.from_config(config)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a malformed or inconsistent
    /// config, [`Error::Unsupported`](crate::Error::Unsupported) for options this crate does not
    /// implement.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?)
    }

    /// Builds the scheduler from its typed config.
    ///
    /// # Errors
    /// As [`HeunDiscrete::from_config`].
    pub fn new(config: HeunDiscreteConfig) -> Result<Self> {
        let spacing = SigmaFlags::from_options(
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        )
        .spacing()?;
        let betas = match (&config.trained_betas, config.beta_schedule.as_str()) {
            (None, "exp") => exp_betas(config.num_train_timesteps),
            (trained, schedule) => betas(
                schedule,
                config.beta_start,
                config.beta_end,
                config.num_train_timesteps,
                trained.as_deref(),
            )?,
        };
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
            first_order: None,
        };
        // diffusers' constructor runs `set_timesteps(num_train_timesteps)`.
        this.set_timesteps(this.config.num_train_timesteps)?;
        Ok(this)
    }

    /// The typed config.
    pub fn config(&self) -> &HeunDiscreteConfig {
        &self.config
    }

    /// x₀ at `sigma`, clamped when `clip_sample` is set.
    fn denoised(&self, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        let c = &self.config;
        let x0 = denoised(c.prediction_type, model_output, sample, sigma)?;
        clip(x0, c.clip_sample.unwrap_or(false), c.clip_sample_range)
    }
}

impl Scheduler for HeunDiscrete {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let plan = self.source.plan(num_inference_steps)?;
        // [σ0, σ1, σ1, …, σn-1, σn-1, 0]; the timesteps stay float64 when remapped from sigmas.
        let sigmas: Vec<f64> = plan.sigmas.iter().map(|&s| f32_round(s)).collect();
        let sigmas = repeat_after_first(&sigmas)
            .chain(std::iter::once(0.0))
            .collect();
        let timesteps = repeat_after_first(&plan.timesteps).collect();
        self.schedule.set(timesteps, sigmas);
        self.first_order = None;
        Ok(())
    }

    schedule_accessors!();

    fn order(&self) -> usize {
        2
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let (i, sigma) = self.schedule.current_sigma(timestep)?;
        let dtype = compute_dtype(model_output.dtype());
        let (mo, x) = (model_output.to_dtype(dtype)?, sample.to_dtype(dtype)?);
        let x0 = self.denoised(&mo, &x, sigma)?;
        let derivative = x.sub(&x0)?.affine(1.0 / sigma, 0.0)?;
        let prev = match self.first_order.take() {
            None => {
                let dt = self.schedule.sigma(i + 1)? - sigma;
                let prev = x.add(&derivative.affine(dt, 0.0)?)?;
                self.first_order = Some(FirstOrder {
                    derivative,
                    dt,
                    sample: x,
                });
                prev
            }
            Some(first) => {
                // The first half ended at sigmas[i]: average its slope with the one there.
                let averaged = first.derivative.add(&derivative)?.affine(0.5, 0.0)?;
                first.sample.add(&averaged.affine(first.dt, 0.0)?)?
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
    fn schedule_duplicates_every_timestep_but_the_first() {
        let mut s = HeunDiscrete::new(HeunDiscreteConfig::default()).unwrap();
        s.set_timesteps(3).unwrap();
        let t = s.timesteps();
        assert_eq!(t.len(), 5);
        assert_eq!(t.get(1), t.get(2));
        assert_eq!(s.sigmas().map(<[f64]>::len), Some(6));
        assert_eq!(s.sigmas().and_then(|v| v.last().copied()), Some(0.0));
    }
}
