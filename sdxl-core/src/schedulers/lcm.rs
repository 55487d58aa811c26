//! Latent consistency models (Luo et al. 2023, <https://arxiv.org/abs/2310.04378>), as
//! diffusers' `LCMScheduler`: each step jumps to the consistency function's estimate of x₀
//! (`denoised`) and re-noises it to the next timestep with fresh noise.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::arith::{lincomb, upcast};
use super::noising::Vp;
use super::prediction::{clip, data_prediction, reject_thresholding, PredictionType};
use super::schedule::{betas, f32_round, AlphaSchedule};
use super::spacing::TimestepSpacing;
use super::stepping::{schedule_accessors, StepSchedule};
use super::{NoiseSource, Scheduler, SchedulerConfig, StepOutput};
use crate::error::{Error, Result};

/// The consistency models' data standard deviation σ_data.
const SIGMA_DATA: f64 = 0.5;

/// `LCMScheduler`'s `config.json`, field for field, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LcmConfig {
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
    /// Length of the distillation schedule the inference timesteps are picked from.
    pub original_inference_steps: usize,
    /// Clip the predicted x₀ to `±clip_sample_range`.
    pub clip_sample: bool,
    /// Clip range used when `clip_sample` is set.
    pub clip_sample_range: f64,
    /// Use ᾱ = 1 past the last step (otherwise ᾱ of timestep 0).
    pub set_alpha_to_one: bool,
    /// Kept for config compatibility; LCM's schedule does not use it.
    pub steps_offset: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding (Imagen); not supported here.
    pub thresholding: bool,
    /// Quantile for dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound for dynamic thresholding.
    pub sample_max_value: f64,
    /// Kept for config compatibility; LCM's schedule does not use it.
    pub timestep_spacing: TimestepSpacing,
    /// Factor applied to the timestep in the boundary-condition scalings.
    pub timestep_scaling: f64,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for LcmConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".to_string(),
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Multistep latent-consistency sampling: diffusers' `LCMScheduler`.
///
/// Every step except the last draws one noise tensor from the [`NoiseSource`]; the step's
/// `pred_original_sample` is diffusers' `denoised`.
#[derive(Debug, Clone)]
pub struct Lcm {
    config: LcmConfig,
    alphas: AlphaSchedule,
    schedule: StepSchedule,
}

impl Lcm {
    /// Builds the scheduler from a scheduler config (unknown keys ignored).
    ///
    /// # Errors
    /// See [`Lcm::new`]; also a known key with a value of the wrong type.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?)
    }

    /// Builds the scheduler from its typed config.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for thresholding or an unknown beta schedule;
    /// [`Error::InvalidArgument`] for zero training timesteps.
    pub fn new(config: LcmConfig) -> Result<Self> {
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
        })
    }

    /// The typed config this scheduler was built from.
    pub fn config(&self) -> &LcmConfig {
        &self.config
    }

    /// The boundary-condition scalings `(c_skip, c_out)` at `timestep`.
    fn scalings(&self, timestep: f64) -> (f64, f64) {
        let scaled = f32_round(timestep * self.config.timestep_scaling);
        let denom = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
        (SIGMA_DATA * SIGMA_DATA / denom, scaled / denom.sqrt())
    }
}

impl Scheduler for Lcm {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        let original = self.config.original_inference_steps;
        if original == 0 || original > train {
            return Err(Error::invalid(format!(
                "original_inference_steps must be between 1 and num_train_timesteps ({train}), got {original}"
            )));
        }
        if num_inference_steps == 0 || num_inference_steps > original {
            return Err(Error::invalid(format!(
                "num_inference_steps must be between 1 and original_inference_steps ({original}), got {num_inference_steps}"
            )));
        }
        // The distillation schedule k-1, 2k-1, ..., picked at evenly spaced indices (reversed).
        let k = (train / original) as i64;
        let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k - 1).collect();
        let stride = original as f64 / num_inference_steps as f64;
        let timesteps = (0..num_inference_steps)
            .filter_map(|i| origin.get((i as f64 * stride).floor() as usize))
            .map(|&t| t as f64)
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
        let n = self.schedule.step_count()?;
        let index = self.schedule.step_index(timestep)?;
        let prev_timestep = self
            .schedule
            .timesteps()
            .get(index + 1)
            .copied()
            .unwrap_or(timestep);
        let a_t = self.alphas.alpha(timestep)?;
        let a_prev = self.alphas.alpha_prev(prev_timestep)?;
        let (c_skip, c_out) = self.scalings(timestep);

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
        let denoised = lincomb(&[(c_out, &x0), (c_skip, &x)])?;

        let prev = if index + 1 != n {
            let z = noise.randn(model_output.dims(), out_dtype, model_output.device())?;
            lincomb(&[
                (a_prev.sqrt(), &denoised),
                ((1.0 - a_prev).sqrt(), &upcast(&z)?),
            ])?
        } else {
            denoised.clone()
        };
        self.schedule.advance();
        Ok(StepOutput {
            prev_sample: prev.to_dtype(out_dtype)?,
            pred_original_sample: Some(denoised.to_dtype(out_dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        self.alphas.add_noise(original, noise, timestep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_follow_the_distillation_schedule() -> Result<()> {
        let mut s = Lcm::new(LcmConfig::default())?;
        s.set_timesteps(4)?;
        assert_eq!(s.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
        s.set_timesteps(1)?;
        assert_eq!(s.timesteps(), &[999.0]);
        assert!(matches!(
            s.set_timesteps(51),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(s.set_timesteps(0), Err(Error::InvalidArgument(_))));
        Ok(())
    }

    #[test]
    fn boundary_scalings() -> Result<()> {
        let s = Lcm::new(LcmConfig::default())?;
        let (skip, out) = s.scalings(0.0);
        assert_eq!((skip, out), (1.0, 0.0));
        let (skip, out) = s.scalings(999.0);
        assert!(skip < 1e-6 && (out - 1.0).abs() < 1e-6);
        Ok(())
    }
}
