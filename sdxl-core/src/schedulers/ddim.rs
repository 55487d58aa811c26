//! DDIM (Song et al. 2020, <https://arxiv.org/abs/2010.02502>), as diffusers' `DDIMScheduler`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::arith::{lincomb, upcast};
use super::noising::Vp;
use super::prediction::{
    clip, data_prediction, noise_prediction, reject_thresholding, PredictionType,
};
use super::schedule::{betas, AlphaSchedule};
use super::spacing::{spaced_timesteps, TimestepSpacing};
use super::stepping::{not_set, schedule_accessors, StepSchedule};
use super::{NoiseSource, Scheduler, SchedulerConfig, StepOutput};
use crate::error::{Error, Result};

/// `DDIMScheduler`'s `config.json`, field for field, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First beta of the training schedule.
    pub beta_start: f64,
    /// Last beta of the training schedule.
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// Clip the predicted x₀ to `±clip_sample_range`.
    pub clip_sample: bool,
    /// Use ᾱ = 1 past the last step (otherwise ᾱ of timestep 0).
    pub set_alpha_to_one: bool,
    /// Offset added to `leading` timesteps.
    pub steps_offset: usize,
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
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Denoising diffusion implicit models: diffusers' `DDIMScheduler`.
///
/// Deterministic with the default `eta = 0`; `eta > 0` adds noise drawn from the
/// [`NoiseSource`] (`eta = 1` is DDPM-like). DDIM locates each step by its timestep value, so
/// [`Scheduler::set_begin_index`] has nothing to do.
#[derive(Debug, Clone)]
pub struct Ddim {
    config: DdimConfig,
    alphas: AlphaSchedule,
    schedule: StepSchedule,
    num_inference_steps: Option<usize>,
    eta: f64,
    use_clipped_model_output: bool,
}

impl Ddim {
    /// Builds the scheduler from a scheduler config (unknown keys ignored).
    ///
    /// # Errors
    /// See [`Ddim::new`]; also a known key with a value of the wrong type.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?)
    }

    /// Builds the scheduler from its typed config.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for thresholding or an unknown beta schedule;
    /// [`Error::InvalidArgument`] for zero training timesteps.
    pub fn new(config: DdimConfig) -> Result<Self> {
        reject_thresholding(config.thresholding)?;
        let betas = betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
        )?;
        let alphas = AlphaSchedule::new(
            &betas,
            config.rescale_betas_zero_snr,
            config.set_alpha_to_one,
        )?;
        Ok(Self {
            config,
            alphas,
            schedule: StepSchedule::alpha(),
            num_inference_steps: None,
            eta: 0.0,
            use_clipped_model_output: false,
        })
    }

    /// The typed config this scheduler was built from.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// Sets η, the weight of the noise added per step (`step(eta=...)` in diffusers).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `eta` is negative or not finite.
    pub fn set_eta(&mut self, eta: f64) -> Result<()> {
        if !eta.is_finite() || eta < 0.0 {
            return Err(Error::invalid(format!(
                "DDIM eta must be a finite value >= 0, got {eta}"
            )));
        }
        self.eta = eta;
        Ok(())
    }

    /// Re-derives ε from the clipped x₀ before stepping (`use_clipped_model_output`).
    pub fn set_use_clipped_model_output(&mut self, on: bool) {
        self.use_clipped_model_output = on;
    }
}

impl Scheduler for Ddim {
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
        self.num_inference_steps = Some(num_inference_steps);
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
        let n = self.num_inference_steps.ok_or_else(not_set)?;
        let a_t = self.alphas.alpha(timestep)?;
        let ratio = self.config.num_train_timesteps / n;
        let a_prev = self.alphas.alpha_prev(timestep - ratio as f64)?;
        let vp = Vp::from_alpha_cumprod(a_t);

        let out_dtype = model_output.dtype();
        let mo = upcast(model_output)?;
        let x = upcast(sample)?;
        let prediction = self.config.prediction_type;
        let x0 = data_prediction(prediction, &mo, &x, vp)?;
        let x0 = clip(x0, self.config.clip_sample, self.config.clip_sample_range)?;
        let eps = if self.use_clipped_model_output {
            noise_prediction(PredictionType::Sample, &x0, &x, vp)?
        } else {
            noise_prediction(prediction, &mo, &x, vp)?
        };

        let variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta * variance.sqrt();
        let direction = (1.0 - a_prev - std_dev * std_dev).sqrt();
        let mut prev = lincomb(&[(a_prev.sqrt(), &x0), (direction, &eps)])?;
        if self.eta > 0.0 {
            let z = noise.randn(model_output.dims(), out_dtype, model_output.device())?;
            prev = (prev + upcast(&z)?.affine(std_dev, 0.0)?)?;
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
    use crate::schedulers::testing::NoNoise;
    use candle_core::Device;

    #[test]
    fn invalid_step_counts() -> Result<()> {
        let mut s = Ddim::new(DdimConfig::default())?;
        assert!(matches!(s.set_timesteps(0), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            s.set_timesteps(1001),
            Err(Error::InvalidArgument(_))
        ));
        assert!(s.set_eta(-1.0).is_err());
        Ok(())
    }

    #[test]
    fn clean_sample_is_a_fixed_point_of_sample_prediction() -> Result<()> {
        let cfg = DdimConfig {
            prediction_type: PredictionType::Sample,
            clip_sample: false,
            ..DdimConfig::default()
        };
        let mut s = Ddim::new(cfg)?;
        s.set_timesteps(5)?;
        let x0 = Tensor::new(&[0.5f32, -0.25], &Device::Cpu)?;
        let t = s.timesteps().last().copied().unwrap_or(0.0);
        let noisy = s.add_noise(&x0, &Tensor::new(&[0.1f32, 0.2], &Device::Cpu)?, t)?;
        let out = s.step(&x0, t, &noisy, &mut NoNoise)?;
        // set_alpha_to_one: the last step lands exactly on the predicted x0.
        let got = out.prev_sample.to_vec1::<f32>()?;
        assert!((got[0] - 0.5).abs() < 1e-6 && (got[1] + 0.25).abs() < 1e-6);
        Ok(())
    }
}
