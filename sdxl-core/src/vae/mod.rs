//! The SDXL VAE (`AutoencoderKL`).
//!
//! [`AutoencoderKL`] encodes images in `[-1, 1]` into a [`DiagonalGaussian`] over raw latents
//! and decodes raw latents back into images. The scaling factor is left to the pipeline.
//! The parts ([`Encoder`], [`Decoder`], the blocks and the mid-block attention) are public so
//! they can be used and tested on their own. [`tiling`] decodes and encodes large inputs in
//! overlapping tiles, as diffusers' `enable_tiling()` does.

pub mod attention;
pub mod blocks;
pub mod config;
pub mod decoder;
pub mod distribution;
pub mod encoder;
pub mod model;
pub mod tiling;

pub use attention::VaeAttention;
pub use blocks::{DownEncoderBlock2D, UpDecoderBlock2D, VaeMidBlock};
pub use config::{SampleSize, VaeConfig};
pub use decoder::Decoder;
pub use distribution::DiagonalGaussian;
pub use encoder::Encoder;
pub use model::AutoencoderKL;
pub use tiling::{TileGeometry, TilingMode, TilingOptions};
