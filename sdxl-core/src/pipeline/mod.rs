//! Pipelines: text-to-image, image-to-image (SDEdit) and the base → refiner hand-off, composed
//! from the public components so that each stage can also be used on its own.
//!
//! ```no_run
//! use sdxl_core::pipeline::{generate, GenerateParams, LoadOptions, RunControl, SdxlModel};
//! # fn main() -> sdxl_core::Result<()> {
//! let base = SdxlModel::load("stable-diffusion-xl-base-1.0".as_ref(), &LoadOptions::default())?;
//! let mut params = GenerateParams::new("a lighthouse on a cliff, stormy sea");
//! params.steps = 30;
//! params.seed = 42;
//! let images = generate(&base, None, &params, RunControl::none())?;
//! assert_eq!(images[0].width, 1024);
//! # Ok(()) }
//! ```

pub mod control;
pub mod denoise;
pub mod generate;
pub mod image;
pub mod model;
pub mod params;
pub mod prompt;

pub use control::{CancelToken, Flow, NoObserver, ProgressFn, StepInfo, StepObserver, StepTensors};
pub use generate::{
    decode_images, decode_latents, encode_latents, generate, generate_latents, image_to_image,
    text_to_image, RunControl,
};
pub use image::{latent_preview, RgbImage};
pub use model::{LoadOptions, Loaded, ModelKind, Residency, SdxlModel, TextStack};
pub use params::{GenerateParams, InitImage, MicroParams, SchedulerChoice};
pub use prompt::{encode_prompt, LongPrompts, PromptEmbeds, Prompts};
