//! The VAE encoder (diffusers' `Encoder` with `double_z`): image → `[mean | logvar]` moments
//! before `quant_conv`.

use candle_core::{Module, Tensor};

use crate::layers::Conv2d;

use super::blocks::{DownEncoderBlock2D, VaeMidBlock, VAE_NORM_EPS};
use super::config::VaeConfig;
use crate::error::{Error, Result};
use crate::layers::{conv2d, group_norm, GroupNorm};
use crate::loading::Weights;

/// `conv_in → down_blocks → mid_block → conv_norm_out → SiLU → conv_out`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Loads the encoder from `w` (the `encoder` prefix of an `AutoencoderKL` checkpoint).
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
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut in_channels = first;
        for (i, &out_channels) in channels.iter().enumerate() {
            let is_last = i + 1 == channels.len();
            down_blocks.push(DownEncoderBlock2D::new(
                &w.pp("down_blocks").pp(i),
                cfg.layers_per_block,
                in_channels,
                out_channels,
                groups,
                !is_last,
            )?);
            in_channels = out_channels;
        }
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, first, 3, 1, 1, &w.pp("conv_in"))?,
            down_blocks,
            mid_block: VaeMidBlock::new(
                &w.pp("mid_block"),
                last,
                groups,
                cfg.mid_block_add_attention,
            )?,
            conv_norm_out: group_norm(groups, last, VAE_NORM_EPS, &w.pp("conv_norm_out"))?,
            conv_out: conv2d(last, 2 * cfg.latent_channels, 3, 1, 1, &w.pp("conv_out"))?,
        })
    }

    /// Encodes `x` `[B, in_channels, H, W]` into `[B, 2 * latent_channels, H/f, W/f]`.
    ///
    /// # Errors
    /// Tensor shape or device failures (the caller validates sizes).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            h = block.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        let h = self.conv_norm_out.forward_silu(&h)?;
        Ok(self.conv_out.forward(&h)?)
    }
}
