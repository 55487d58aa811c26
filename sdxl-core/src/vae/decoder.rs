//! The VAE decoder (diffusers' `Decoder`): latents (after `post_quant_conv`) → image.

use candle_core::{Module, Tensor};

use crate::layers::Conv2d;

use super::blocks::{UpDecoderBlock2D, VaeMidBlock, VAE_NORM_EPS};
use super::config::VaeConfig;
use crate::error::{Error, Result};
use crate::layers::{conv2d, group_norm, GroupNorm};
use crate::loading::Weights;

/// `conv_in → mid_block → up_blocks → conv_norm_out → SiLU → conv_out`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Loads the decoder from `w` (the `decoder` prefix of an `AutoencoderKL` checkpoint).
    ///
    /// Up blocks run over `block_out_channels` reversed, each with `layers_per_block + 1`
    /// resnets and an upsampler on every level but the last.
    ///
    /// # Errors
    /// An unsupported config (see [`VaeConfig::validate`]), or missing or misshapen tensors.
    pub fn new(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let channels = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let (first, last) = match (channels.first(), channels.last()) {
            (Some(&f), Some(&l)) => (f, l),
            _ => return Err(Error::unsupported("VAE block_out_channels is empty")),
        };
        let mut up_blocks = Vec::with_capacity(channels.len());
        let mut in_channels = last;
        for (i, &out_channels) in channels.iter().rev().enumerate() {
            let is_last = i + 1 == channels.len();
            up_blocks.push(UpDecoderBlock2D::new(
                &w.pp("up_blocks").pp(i),
                cfg.layers_per_block + 1,
                in_channels,
                out_channels,
                groups,
                !is_last,
            )?);
            in_channels = out_channels;
        }
        Ok(Self {
            conv_in: conv2d(cfg.latent_channels, last, 3, 1, 1, &w.pp("conv_in"))?,
            mid_block: VaeMidBlock::new(
                &w.pp("mid_block"),
                last,
                groups,
                cfg.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: group_norm(groups, first, VAE_NORM_EPS, &w.pp("conv_norm_out"))?,
            conv_out: conv2d(first, cfg.out_channels, 3, 1, 1, &w.pp("conv_out"))?,
        })
    }

    /// Decodes `z` `[B, latent_channels, h, w]` into `[B, out_channels, h*f, w*f]`.
    ///
    /// # Errors
    /// Tensor shape or device failures (the caller validates sizes).
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        Ok(self.conv_out.forward(&h)?)
    }
}
