//! Everything a generation can be asked to do, with diffusers' defaults and validation.

use candle_core::Tensor;

use super::prompt::Prompts;
use crate::conditioning::MicroConditioning;
use crate::error::{Error, Result};
use crate::schedulers::{SchedulerConfig, SchedulerKind};

/// Which scheduler to sample with, on top of the model's own `scheduler_config.json`.
#[derive(Debug, Clone, Default)]
pub struct SchedulerChoice {
    /// The family; `None` keeps the model's own (`_class_name`).
    pub kind: Option<SchedulerKind>,
    /// `use_karras_sigmas` override.
    pub karras: Option<bool>,
    /// `timestep_spacing` override: `leading`, `trailing` or `linspace`.
    pub timestep_spacing: Option<String>,
    /// `prediction_type` override: `epsilon` or `v_prediction`.
    pub prediction_type: Option<String>,
    /// Any other scheduler config keys, applied last (like diffusers'
    /// `Cls.from_config(config, **overrides)`).
    pub overrides: serde_json::Map<String, serde_json::Value>,
}

impl SchedulerChoice {
    /// The model's config with these overrides applied, and the family to build.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown spacing or prediction type;
    /// [`Error::Unsupported`] for an unknown scheduler class in the model's config.
    pub fn resolve(&self, base: &SchedulerConfig) -> Result<(SchedulerKind, SchedulerConfig)> {
        let mut config = base.clone();
        if let Some(k) = self.karras {
            config = config.with("use_karras_sigmas", k);
        }
        if let Some(s) = &self.timestep_spacing {
            if !["leading", "trailing", "linspace"].contains(&s.as_str()) {
                return Err(Error::invalid(format!(
                    "timestep spacing `{s}` (expected leading, trailing or linspace)"
                )));
            }
            config = config.with("timestep_spacing", s.as_str());
        }
        if let Some(p) = &self.prediction_type {
            if !["epsilon", "v_prediction", "sample"].contains(&p.as_str()) {
                return Err(Error::invalid(format!(
                    "prediction type `{p}` (expected epsilon or v_prediction)"
                )));
            }
            config = config.with("prediction_type", p.as_str());
        }
        for (k, v) in &self.overrides {
            config = config.with(k, v.clone());
        }
        let kind = match self.kind {
            Some(k) => k,
            None => SchedulerKind::from_config(&config)?,
        };
        Ok((kind, config))
    }
}

/// The starting point of an image-to-image run.
#[derive(Debug, Clone)]
pub enum InitImage {
    /// An image `[1, 3, H, W]` with values in [0, 1]; it is encoded with the VAE.
    Pixels(Tensor),
    /// Latents `[B, 4, h, w]` already scaled by the VAE scaling factor (a base model's output
    /// handed to the refiner); used as they are.
    Latents(Tensor),
}

/// Size and crop conditioning as users give it: sizes left at `None` default to the output
/// size, as in diffusers' pipelines. Sizes are `(height, width)`, crops `(top, left)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroParams {
    /// `original_size` (default: the output size).
    pub original_size: Option<(usize, usize)>,
    /// `crops_coords_top_left` (default `(0, 0)`).
    pub crops_coords_top_left: (usize, usize),
    /// `target_size` (default: the output size).
    pub target_size: Option<(usize, usize)>,
    /// `negative_original_size`.
    pub negative_original_size: Option<(usize, usize)>,
    /// `negative_crops_coords_top_left` (default `(0, 0)`).
    pub negative_crops_coords_top_left: Option<(usize, usize)>,
    /// `negative_target_size`.
    pub negative_target_size: Option<(usize, usize)>,
    /// The refiner's `aesthetic_score` (default 6.0).
    pub aesthetic_score: f64,
    /// The refiner's `negative_aesthetic_score` (default 2.5).
    pub negative_aesthetic_score: f64,
}

impl Default for MicroParams {
    fn default() -> Self {
        Self {
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            negative_original_size: None,
            negative_crops_coords_top_left: None,
            negative_target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

impl MicroParams {
    /// The concrete values for an output of `height × width` pixels.
    pub fn resolve(&self, height: usize, width: usize) -> MicroConditioning {
        let mut m = MicroConditioning::new(height, width);
        if let Some(s) = self.original_size {
            m.original_size = s;
        }
        m.crops_coords_top_left = self.crops_coords_top_left;
        if let Some(s) = self.target_size {
            m.target_size = s;
        }
        m.negative_original_size = self.negative_original_size;
        if let Some(c) = self.negative_crops_coords_top_left {
            m.negative_crops_coords_top_left = c;
        }
        m.negative_target_size = self.negative_target_size;
        m.aesthetic_score = self.aesthetic_score;
        m.negative_aesthetic_score = self.negative_aesthetic_score;
        m
    }
}

/// Parameters of one generation. [`GenerateParams::new`] gives diffusers' defaults.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Prompts and negative prompts.
    pub prompts: Prompts,
    /// Output width in pixels, a positive multiple of 8.
    pub width: usize,
    /// Output height in pixels, a positive multiple of 8.
    pub height: usize,
    /// Denoising steps of the full schedule.
    pub steps: usize,
    /// Classifier-free guidance scale; guidance is off at 1 or below.
    pub guidance_scale: f64,
    /// `guidance_rescale` (φ of Lin et al. 2023); 0 disables it.
    pub guidance_rescale: f64,
    /// Images per prompt.
    pub num_images: usize,
    /// Seed of the torch-compatible generator (initial latents and scheduler noise).
    pub seed: u64,
    /// Scheduler family and overrides.
    pub scheduler: SchedulerChoice,
    /// Size and crop conditioning (and aesthetic scores for the refiner).
    pub micro: MicroParams,
    /// Stop after this fraction of the schedule and return latents (base → refiner hand-off).
    pub denoising_end: Option<f64>,
    /// Start at this fraction of the schedule without adding noise (refiner hand-off).
    pub denoising_start: Option<f64>,
    /// Image-to-image strength in (0, 1]: the fraction of the schedule that is re-run.
    pub strength: f64,
}

impl GenerateParams {
    /// Defaults as diffusers' SDXL pipelines: 1024×1024, 50 steps, guidance 5.0, strength 0.3.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompts: Prompts {
                prompt: prompt.into(),
                ..Prompts::default()
            },
            width: 1024,
            height: 1024,
            steps: 50,
            guidance_scale: 5.0,
            guidance_rescale: 0.0,
            num_images: 1,
            seed: 0,
            scheduler: SchedulerChoice::default(),
            micro: MicroParams::default(),
            denoising_end: None,
            denoising_start: None,
            strength: 0.3,
        }
    }

    /// Checks every value that does not depend on the model.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the offending parameter.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % 8 != 0 {
                return Err(Error::invalid(format!(
                    "{name} must be a positive multiple of 8, got {v}"
                )));
            }
            if v > 16384 {
                return Err(Error::invalid(format!(
                    "{name} {v} is larger than the supported maximum of 16384"
                )));
            }
        }
        if self.steps == 0 {
            return Err(Error::invalid("steps must be at least 1"));
        }
        if self.num_images == 0 {
            return Err(Error::invalid("the number of images must be at least 1"));
        }
        if !self.guidance_scale.is_finite() {
            return Err(Error::invalid(format!(
                "guidance scale must be a finite number, got {}",
                self.guidance_scale
            )));
        }
        if !(0.0..=1.0).contains(&self.guidance_rescale) {
            return Err(Error::invalid(format!(
                "guidance rescale must be in [0, 1], got {}",
                self.guidance_rescale
            )));
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(Error::invalid(format!(
                "strength must be in (0, 1], got {}",
                self.strength
            )));
        }
        for (name, v) in [
            ("denoising_end", self.denoising_end),
            ("denoising_start", self.denoising_start),
        ] {
            if let Some(v) = v {
                if !(v > 0.0 && v < 1.0) {
                    return Err(Error::invalid(format!("{name} must be in (0, 1), got {v}")));
                }
            }
        }
        Ok(())
    }
}
