//! Heun's second-order sampler (Karras et al. 2022, Algorithm 1), as diffusers'
//! `HeunDiscreteScheduler`.
//!
//! Every timestep but the first appears twice in the schedule: the first visit takes an Euler
//! step and remembers its derivative, the second re-evaluates the model at the Euler estimate and
//! replaces that step by one with the averaged derivative. The final step is plain Euler.

use candle_core::Tensor;
use serde::Deserialize;

use super::common::{self, PredictionType, SigmaBounds, SigmaSpacing, StepCursor, TimestepSpacing};
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
    spacing: SigmaSpacing,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    cursor: StepCursor,
    first_order: Option<FirstOrder>,
}

/// The `exp` schedule of diffusers' `betas_for_alpha_bar`: `ᾱ(t) = e^{-12 t}`, i.e. a constant
/// beta of `1 - e^{-12/T}` (capped at 0.999), in float32.
fn exp_betas(num_train_timesteps: usize) -> Vec<f64> {
    let n = num_train_timesteps as f64;
    (0..num_train_timesteps)
        .map(|i| {
            let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
            common::f32_round((1.0 - (-12.0 * t2).exp() / (-12.0 * t1).exp()).min(0.999))
        })
        .collect()
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
        let spacing = SigmaSpacing::from_flags(
            config.use_karras_sigmas.unwrap_or(false),
            config.use_exponential_sigmas.unwrap_or(false),
            config.use_beta_sigmas.unwrap_or(false),
        )?;
        let betas = match (&config.trained_betas, config.beta_schedule.as_str()) {
            (None, "exp") => exp_betas(config.num_train_timesteps),
            (trained, schedule) => common::betas(
                schedule,
                config.beta_start,
                config.beta_end,
                config.num_train_timesteps,
                trained.as_deref(),
            )?,
        };
        let train_sigmas = common::training_sigmas(&betas, false)?;
        let mut this = Self {
            spacing,
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            cursor: StepCursor::default(),
            first_order: None,
            config,
        };
        // diffusers' constructor runs `set_timesteps(num_train_timesteps)`.
        this.set_timesteps(this.config.num_train_timesteps)?;
        Ok(this)
    }

    /// The typed config.
    pub fn config(&self) -> &HeunDiscreteConfig {
        &self.config
    }
}

impl Scheduler for HeunDiscrete {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        let spaced = common::spaced_timesteps(
            c.timestep_spacing,
            c.num_train_timesteps,
            num_inference_steps,
            c.steps_offset,
        )?;
        let bounds = SigmaBounds {
            min: c.sigma_min,
            max: c.sigma_max,
        };
        let plan = common::sigma_plan(
            &self.train_sigmas,
            spaced,
            self.spacing,
            num_inference_steps,
            bounds,
        );
        // [σ0, σ1, σ1, …, σn-1, σn-1, 0]; the timesteps stay float64 when remapped from sigmas.
        let sigmas: Vec<f64> = plan.sigmas.iter().map(|&s| common::f32_round(s)).collect();
        self.sigmas = sigmas
            .iter()
            .enumerate()
            .flat_map(|(k, &s)| std::iter::repeat_n(s, if k == 0 { 1 } else { 2 }))
            .chain(std::iter::once(0.0))
            .collect();
        self.timesteps = plan
            .timesteps
            .iter()
            .enumerate()
            .flat_map(|(k, &t)| std::iter::repeat_n(t, if k == 0 { 1 } else { 2 }))
            .collect();
        self.first_order = None;
        self.cursor.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        common::init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn order(&self) -> usize {
        2
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.cursor.set_begin(begin_index);
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.cursor.current(&self.timesteps, timestep)?;
        common::scale_by_sigma(sample, common::value_at(&self.sigmas, i, "sigma")?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.cursor.current(&self.timesteps, timestep)?;
        let dtype = common::compute_dtype(model_output.dtype());
        let (mo, x) = (model_output.to_dtype(dtype)?, sample.to_dtype(dtype)?);
        let (prev, x0) = match self.first_order.take() {
            None => {
                let sigma = common::value_at(&self.sigmas, i, "sigma")?;
                let sigma_next = common::value_at(&self.sigmas, i + 1, "sigma")?;
                let x0 = self.denoised(&mo, &x, sigma)?;
                let derivative = x.sub(&x0)?.affine(1.0 / sigma, 0.0)?;
                let dt = sigma_next - sigma;
                let prev = x.add(&derivative.affine(dt, 0.0)?)?;
                self.first_order = Some(FirstOrder {
                    derivative,
                    dt,
                    sample: x,
                });
                (prev, x0)
            }
            Some(first) => {
                // The first half ended at sigmas[i]: re-evaluate there and average the slopes.
                let sigma_next = common::value_at(&self.sigmas, i, "sigma")?;
                let x0 = self.denoised(&mo, &x, sigma_next)?;
                let derivative = x.sub(&x0)?.affine(1.0 / sigma_next, 0.0)?;
                let averaged = first.derivative.add(&derivative)?.affine(0.5, 0.0)?;
                let prev = first.sample.add(&averaged.affine(first.dt, 0.0)?)?;
                (prev, x0)
            }
        };
        self.cursor.advance();
        Ok(StepOutput {
            prev_sample: prev.to_dtype(model_output.dtype())?,
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.cursor.noise_index(&self.timesteps, timestep)?;
        common::add_sigma_noise(original, noise, common::value_at(&self.sigmas, i, "sigma")?)
    }
}

impl HeunDiscrete {
    /// x₀ at `sigma`, clamped when `clip_sample` is set.
    fn denoised(&self, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        let x0 =
            common::predict_original(self.config.prediction_type, model_output, sample, sigma)?;
        if self.config.clip_sample.unwrap_or(false) {
            let r = self.config.clip_sample_range;
            Ok(x0.clamp(-r, r)?)
        } else {
            Ok(x0)
        }
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

    #[test]
    fn exp_schedule_is_constant() {
        let b = exp_betas(10);
        let first = b.first().copied().unwrap();
        assert!(b.iter().all(|&x| (x - first).abs() < 1e-7));
        assert!((first - (1.0 - (-1.2f64).exp())).abs() < 1e-6);
    }
}
