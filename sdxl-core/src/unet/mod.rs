//! The SDXL UNet (`UNet2DConditionModel`), built from a diffusers `unet/` folder.
//!
//! [`UNetConfig`] mirrors `unet/config.json`; [`UNet2DConditionModel`] walks the checkpoint's key
//! tree (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`, …) and predicts
//! noise from a latent, a timestep and a [`UNetConditioning`] (text embeddings, pooled text
//! embedding and micro-conditioning time ids, see [`crate::conditioning`]).

pub mod attention;
pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod model;

pub use config::{OneOrMany, UNetConfig};
pub use model::{UNet2DConditionModel, UNetConditioning};
