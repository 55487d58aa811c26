//! The SDXL UNet (`UNet2DConditionModel`), built from a diffusers `unet/` folder.
//!
//! [`UNetConfig`] mirrors `unet/config.json`.

pub mod config;
pub mod embeddings;

pub use config::{OneOrMany, UNetConfig};
