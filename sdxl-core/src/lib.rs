//! # sdxl-core
//!
//! Stable Diffusion XL on [candle](https://github.com/huggingface/candle): tokenizers, both CLIP
//! text encoders, the micro-conditioning embedder, the UNet, the VAE, noise schedulers and the
//! text-to-image / image-to-image / refiner pipelines, as composable public types.
//!
//! Models are loaded from the files users have (diffusers folders with their `config.json`
//! files), walking the checkpoint's own key tree: a missing or misshapen tensor fails at load
//! time with an [`Error`] naming the full key.
#![warn(missing_docs)]

pub mod conditioning;
pub mod error;
pub mod kernels;
pub mod layers;
pub mod loading;
pub mod lora;
pub mod pipeline;
pub mod rng;
pub mod schedulers;
pub mod text;
pub mod unet;
pub mod vae;

#[cfg(test)]
mod test_support;

pub use error::{Error, ErrorCode, Result};
