//! DDPM (Ho et al. 2020, <https://arxiv.org/abs/2006.11239>), as diffusers' `DDPMScheduler`:
//! ancestral sampling that draws fresh noise at every step but the last.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::arith::{lincomb, upcast};
use super::noising::Vp;
use super::prediction::{clip, data_prediction, reject_thresholding, PredictionType};
use super::schedule::{betas, sigmoid_betas, AlphaSchedule};
use super::spacing::{spaced_timesteps, TimestepSpacing};
use super::stepping::{schedule_accessors, StepSchedule};
use super::{NoiseSource, Scheduler, SchedulerConfig, StepOutput};
use crate::error::{Error, Result};

/// The per-step noise variance (`variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// The posterior variance β̃_t (the default).
    FixedSmall,
    /// β̃_t, computed through its logarithm.
    FixedSmallLog,
    /// β_t.
    FixedLarge,
    /// log β_t; not supported (diffusers takes its square root).
    FixedLargeLog,
    /// Predicted by the model; not supported.
    Learned,
    /// Interpolated by the model between the small and large variance; not supported.
    LearnedRange,
}

/// `DDPMScheduler`'s `config.json`, field for field, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdpmConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First beta of the training schedule.
    pub beta_start: f64,
    /// Last beta of the training schedule.
    pub beta_end: f64,
    /// `linear`, `scaled_linear`, `squaredcos_cap_v2` or `sigmoid`.
    pub beta_schedule: String,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// How the noise variance of each step is chosen.
    pub variance_type: VarianceType,
    /// Clip the predicted x₀ to `±clip_sample_range`.
    pub clip_sample: bool,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding (Imagen); not supported here.
    pub thresholding: bool,
    /// Quantile for dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Clip range used when `clip_sample` is set.
    pub clip_sample_range: f64,
    /// Upper bound for dynamic thresholding.
    pub sample_max_value: f64,
    /// How timesteps are spread.
    pub timestep_spacing: TimestepSpacing,
    /// Offset added to `leading` timesteps.
    pub steps_offset: usize,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Denoising diffusion probabilistic models: diffusers' `DDPMScheduler`.
///
/// Every step with `t > 0` draws one noise tensor from the [`NoiseSource`]. Steps are located
/// by timestep value, so [`Scheduler::set_begin_index`] has nothing to do.
#[derive(Debug, Clone)]
pub struct Ddpm {
    config: DdpmConfig,
    alphas: AlphaSchedule,
    schedule: StepSchedule,
}

impl Ddpm {
    /// Builds the scheduler from a scheduler config (unknown keys ignored).
    ///
    /// # Errors
    /// See [`Ddpm::new`]; also a known key with a value of the wrong type.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?)
    }

    /// Builds the scheduler from its typed config.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for thresholding, a learned or log-large variance, or an unknown
    /// beta schedule; [`Error::InvalidArgument`] for zero training timesteps.
    pub fn new(config: DdpmConfig) -> Result<Self> {
        reject_thresholding(config.thresholding)?;
        if !matches!(
            config.variance_type,
            VarianceType::FixedSmall | VarianceType::FixedSmallLog | VarianceType::FixedLarge
        ) {
            return Err(Error::unsupported(format!(
                "DDPM variance_type {:?} (supported: fixed_small, fixed_small_log, fixed_large)",
                config.variance_type
            )));
        }
        let betas = if config.beta_schedule == "sigmoid" && config.trained_betas.is_none() {
            sigmoid_betas(
                config.beta_start,
                config.beta_end,
                config.num_train_timesteps,
            )
        } else {
            betas(
                &config.beta_schedule,
                config.beta_start,
                config.beta_end,
                config.num_train_timesteps,
                config.trained_betas.as_deref(),
            )?
        };
        // Past the last step ᾱ is 1 (diffusers' `self.one`).
        let alphas = AlphaSchedule::new(&betas, config.rescale_betas_zero_snr, true)?;
        Ok(Self {
            config,
            alphas,
            schedule: StepSchedule::alpha(),
        })
    }

    /// The typed config this scheduler was built from.
    pub fn config(&self) -> &DdpmConfig {
        &self.config
    }

    /// The timestep after `t` in the schedule, or -1 after the last one.
    fn previous_timestep(&self, t: f64) -> Result<f64> {
        let timesteps = self.schedule.timesteps();
        let i = timesteps
            .iter()
            .position(|&s| s == t)
            .ok_or_else(|| Error::invalid(format!("timestep {t} is not in the DDPM schedule")))?;
        Ok(timesteps.get(i + 1).copied().unwrap_or(-1.0))
    }

    /// The standard deviation of the noise added at `t`.
    fn noise_std(&self, a_t: f64, a_prev: f64) -> f64 {
        let current_beta = 1.0 - a_t / a_prev;
        let variance = ((1.0 - a_prev) / (1.0 - a_t) * current_beta).max(1e-20);
        match self.config.variance_type {
            VarianceType::FixedLarge => current_beta.sqrt(),
            VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
            _ => variance.sqrt(),
        }
    }
}

impl Scheduler for Ddpm {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let timesteps = spaced_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?
        .into_iter()
        .map(f64::round_ties_even)
        .collect();
        self.schedule.set_timesteps(timesteps);
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
        self.schedule.step_count()?;
        let a_t = self.alphas.alpha(timestep)?;
        let a_prev = self.alphas.alpha_prev(self.previous_timestep(timestep)?)?;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let current_alpha = a_t / a_prev;
        let current_beta = 1.0 - current_alpha;

        let out_dtype = model_output.dtype();
        let mo = upcast(model_output)?;
        let x = upcast(sample)?;
        let x0 = data_prediction(
            self.config.prediction_type,
            &mo,
            &x,
            Vp::from_alpha_cumprod(a_t),
        )?;
        let x0 = clip(x0, self.config.clip_sample, self.config.clip_sample_range)?;

        let x0_coeff = a_prev.sqrt() * current_beta / b_t;
        let sample_coeff = current_alpha.sqrt() * b_prev / b_t;
        let mut prev = lincomb(&[(x0_coeff, &x0), (sample_coeff, &x)])?;
        if timestep > 0.0 {
            let z = noise.randn(model_output.dims(), out_dtype, model_output.device())?;
            prev = (prev + upcast(&z)?.affine(self.noise_std(a_t, a_prev), 0.0)?)?;
        }
        Ok(StepOutput {
            prev_sample: prev.to_dtype(out_dtype)?,
            pred_original_sample: Some(x0.to_dtype(out_dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        self.alphas.add_noise(original, noise, timestep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::ddim::{Ddim, DdimConfig};
    use candle_core::{DType, Device};

    /// Always the same "noise", so two samplers can be compared.
    struct Fixed(Tensor);
    impl NoiseSource for Fixed {
        fn randn(&mut self, _: &[usize], dtype: DType, _: &Device) -> Result<Tensor> {
            Ok(self.0.to_dtype(dtype)?)
        }
    }

    #[test]
    fn ddim_with_unit_eta_is_ddpm() -> Result<()> {
        let dev = Device::Cpu;
        let mut ddpm = Ddpm::new(DdpmConfig {
            clip_sample: false,
            ..DdpmConfig::default()
        })?;
        let mut ddim = Ddim::new(DdimConfig {
            clip_sample: false,
            ..DdimConfig::default()
        })?;
        ddim.set_eta(1.0)?;
        ddpm.set_timesteps(8)?;
        ddim.set_timesteps(8)?;
        assert_eq!(ddpm.timesteps(), ddim.timesteps());
        let mut noise = Fixed(Tensor::new(&[0.3f64, -1.1, 0.7], &dev)?);
        let mut x = Tensor::new(&[1.5f64, -0.4, 0.9], &dev)?;
        let steps = ddpm.timesteps().to_vec();
        for &t in &steps {
            let eps = (x.affine(0.3, 0.05)?.sin())?;
            let a = ddpm.step(&eps, t, &x, &mut noise)?.prev_sample;
            let b = ddim.step(&eps, t, &x, &mut noise)?.prev_sample;
            let diff = (&a - &b)?.abs()?.max(0)?.to_scalar::<f64>()?;
            assert!(diff < 1e-9, "t {t}: {diff}");
            x = a;
        }
        Ok(())
    }

    #[test]
    fn learned_variance_is_unsupported() {
        let cfg = DdpmConfig {
            variance_type: VarianceType::Learned,
            ..DdpmConfig::default()
        };
        assert!(matches!(Ddpm::new(cfg), Err(Error::Unsupported(_))));
    }

    #[test]
    fn sigmoid_schedule_is_accepted() -> Result<()> {
        let cfg = DdpmConfig {
            beta_schedule: "sigmoid".to_string(),
            ..DdpmConfig::default()
        };
        let mut s = Ddpm::new(cfg)?;
        s.set_timesteps(10)?;
        assert_eq!(s.timesteps().first().copied(), Some(900.0));
        Ok(())
    }

    #[test]
    fn last_step_has_no_successor() -> Result<()> {
        let mut s = Ddpm::new(DdpmConfig::default())?;
        s.set_timesteps(4)?;
        assert_eq!(s.previous_timestep(750.0)?, 500.0);
        assert_eq!(s.previous_timestep(0.0)?, -1.0);
        assert!(s.previous_timestep(3.0).is_err());
        Ok(())
    }
}
