//! Noise schedulers: one [`Scheduler`] trait, one file per family.
//!
//! A scheduler is built from the model's own `scheduler/scheduler_config.json`
//! ([`SchedulerConfig`]), whose `_class_name` picks the family, and can be swapped for another
//! family with overrides, like diffusers' `Cls.from_config(config, **overrides)`: each family
//! reads the keys it knows, with diffusers' defaults, and ignores the rest.
//!
//! The families share one implementation of each common piece, in small private modules:
//! `schedule` (betas, ᾱ, training σ), `spacing` (`timestep_spacing`, numpy-exact), `sigmas`
//! (σ schedules: interpolation, Karras/exponential/Lu respacing, σ → t), `prediction`
//! (`prediction_type` conversions to x₀ and ε), `noising` (the forward process and
//! `add_noise`), `stepping` (step index, timestep lookup, multistep history) and `arith`
//! (compute dtype, linear combinations). The config enums they define are re-exported here.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Where stochastic schedulers draw their noise from.
///
/// The pipeline passes its seeded generator ([`crate::rng::TorchRng`]), so a run is
/// reproducible; tests can replay recorded noise instead.
pub trait NoiseSource {
    /// Standard normal samples of `shape`, in `dtype` on `device`.
    ///
    /// # Errors
    /// Tensor creation failures.
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
}

/// What one denoising step returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The sample for the next timestep.
    pub prev_sample: Tensor,
    /// The scheduler's estimate of the clean sample, where it computes one
    /// (`denoised` for LCM).
    pub pred_original_sample: Option<Tensor>,
}

/// A diffusion sampler, with the call sequence of diffusers' schedulers:
/// `set_timesteps`, (`set_begin_index`), then per timestep `scale_model_input` and `step`.
///
/// A family provides its [`StepSchedule`]; the accessors, `set_begin_index`,
/// `init_noise_sigma` and `scale_model_input` are provided on top of it.
pub trait Scheduler: Send {
    /// Prepares the timesteps (and sigmas) for `num_inference_steps` steps and resets the step
    /// index.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the step count is 0 or exceeds the training timesteps.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The schedule this scheduler steps through.
    fn schedule(&self) -> &StepSchedule;

    /// The schedule this scheduler steps through, to move its cursor.
    fn schedule_mut(&mut self) -> &mut StepSchedule;

    /// The timesteps to run, in order, as the model sees them (integers or fractional values,
    /// exactly as diffusers computes them, widened to f64).
    fn timesteps(&self) -> &[f64] {
        self.schedule().timesteps()
    }

    /// The noise levels (σ) for sigma-based schedulers, including the final 0.
    fn sigmas(&self) -> Option<&[f64]> {
        self.schedule().sigmas()
    }

    /// The standard deviation of the initial noise (`init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64 {
        self.schedule().init_noise_sigma()
    }

    /// Model evaluations per step (2 for Heun and KDPM2), as diffusers' `order`.
    fn order(&self) -> usize {
        1
    }

    /// Starts stepping at index `begin_index` of [`Scheduler::timesteps`] (img2img).
    fn set_begin_index(&mut self, begin_index: usize) {
        self.schedule_mut().set_begin_index(begin_index);
    }

    /// Scales the denoising model's input for the current timestep.
    ///
    /// # Errors
    /// Tensor failures, or a timestep not in the schedule.
    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        self.schedule_mut().scale_model_input(sample, timestep)
    }

    /// Advances `sample` by one step given the model's output at `timestep`.
    ///
    /// # Errors
    /// Tensor failures, or a timestep not in the schedule.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput>;

    /// Noises clean `original` samples to the level of `timestep` (img2img).
    ///
    /// # Errors
    /// Tensor failures, or a timestep not in the schedule.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;
}

/// A scheduler config: the raw keys of `scheduler_config.json` plus overrides.
///
/// Kept as a JSON map because each family reads its own subset with its own defaults.
#[derive(Debug, Clone, Default)]
pub struct SchedulerConfig {
    values: Map<String, Value>,
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`.
    ///
    /// # Errors
    /// Missing file or invalid JSON.
    pub fn from_file(path: &Path) -> Result<Self> {
        let values: Map<String, Value> = crate::loading::read_json(path, "scheduler_config.json")?;
        Ok(Self { values })
    }

    /// Builds a config from a JSON object.
    pub fn from_map(values: Map<String, Value>) -> Self {
        Self { values }
    }

    /// The `_class_name` (e.g. `EulerDiscreteScheduler`), if present.
    pub fn class_name(&self) -> Option<&str> {
        self.values.get("_class_name").and_then(Value::as_str)
    }

    /// The same config with `key` set to `value` (like diffusers' `from_config(**overrides)`).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.values.insert(key.to_string(), value.into());
        self
    }

    /// The raw keys.
    pub fn values(&self) -> &Map<String, Value> {
        &self.values
    }

    /// Deserialises a family's typed config from these keys (unknown keys ignored; absent keys
    /// take the family's serde defaults, which mirror diffusers').
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a known key has a value of the wrong type.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(Value::Object(self.values.clone()))
            .map_err(|e| Error::invalid(format!("scheduler config: {e}")))
    }
}

mod arith;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod kdpm2;
pub mod kind;
pub mod lcm;
pub mod lms;
mod noising;
mod prediction;
mod schedule;
mod sigmas;
mod spacing;
mod stepping;
#[cfg(test)]
mod testing;
pub mod unipc;

pub use kind::SchedulerKind;
pub use prediction::PredictionType;
pub use sigmas::FinalSigmasType;
pub use spacing::TimestepSpacing;
pub use stepping::StepSchedule;
