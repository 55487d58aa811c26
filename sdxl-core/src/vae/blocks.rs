//! The VAE's blocks: `DownEncoderBlock2D`, `UpDecoderBlock2D` and the attention mid block
//! (diffusers' `UNetMidBlock2D` without a timestep embedding).

use candle_core::Tensor;

use super::attention::VaeAttention;
use crate::error::Result;
use crate::layers::resnet::ResnetConfig;
use crate::layers::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::loading::Weights;

/// Epsilon of every group norm in the VAE.
pub const VAE_NORM_EPS: f64 = 1e-6;

/// A resnet without timestep embedding, as every VAE resnet is.
fn vae_resnet(
    w: &Weights,
    in_channels: usize,
    out_channels: usize,
    groups: usize,
) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        w,
        &ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: None,
            groups,
            eps: VAE_NORM_EPS,
        },
    )
}

/// `count` resnets under `resnets.{j}`, the first taking `in_channels`.
fn resnets(
    w: &Weights,
    count: usize,
    in_channels: usize,
    out_channels: usize,
    groups: usize,
) -> Result<Vec<ResnetBlock2D>> {
    (0..count)
        .map(|j| {
            let cin = if j == 0 { in_channels } else { out_channels };
            vae_resnet(&w.pp("resnets").pp(j), cin, out_channels, groups)
        })
        .collect()
}

fn apply_resnets(resnets: &[ResnetBlock2D], x: &Tensor) -> Result<Tensor> {
    resnets
        .iter()
        .try_fold(x.clone(), |h, r| r.forward(&h, None))
}

/// One encoder level: resnets, then (except on the last level) a stride-2 downsampler padded on
/// the right and bottom.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    /// Loads `resnets.{0..num_layers}` and, when `add_downsample`, `downsamplers.0` from `w`
    /// (e.g. `encoder.down_blocks.1`).
    ///
    /// # Errors
    /// Missing or misshapen tensors, or `groups` not dividing a channel count.
    pub fn new(
        w: &Weights,
        num_layers: usize,
        in_channels: usize,
        out_channels: usize,
        groups: usize,
        add_downsample: bool,
    ) -> Result<Self> {
        let downsampler = if add_downsample {
            // Padding 0: diffusers pads one row/column on the right/bottom instead.
            Some(Downsample2D::new(
                &w.pp("downsamplers").pp(0),
                out_channels,
                out_channels,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets: resnets(w, num_layers, in_channels, out_channels, groups)?,
            downsampler,
        })
    }

    /// Applies the level to `x` `[B, C, H, W]`.
    ///
    /// # Errors
    /// Tensor shape or device failures.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = apply_resnets(&self.resnets, x)?;
        match &self.downsampler {
            Some(d) => d.forward(&h),
            None => Ok(h),
        }
    }
}

/// One decoder level: resnets, then (except on the last level) a nearest-neighbour ×2 upsampler.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    /// Loads `resnets.{0..num_layers}` and, when `add_upsample`, `upsamplers.0` from `w`
    /// (e.g. `decoder.up_blocks.0`).
    ///
    /// # Errors
    /// Missing or misshapen tensors, or `groups` not dividing a channel count.
    pub fn new(
        w: &Weights,
        num_layers: usize,
        in_channels: usize,
        out_channels: usize,
        groups: usize,
        add_upsample: bool,
    ) -> Result<Self> {
        let upsampler = if add_upsample {
            Some(Upsample2D::new(
                &w.pp("upsamplers").pp(0),
                out_channels,
                out_channels,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets: resnets(w, num_layers, in_channels, out_channels, groups)?,
            upsampler,
        })
    }

    /// Applies the level to `x` `[B, C, H, W]`.
    ///
    /// # Errors
    /// Tensor shape or device failures.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = apply_resnets(&self.resnets, x)?;
        match &self.upsampler {
            Some(u) => u.forward(&h, None),
            None => Ok(h),
        }
    }
}

/// The mid block: `resnets.0`, `attentions.0` (when enabled), `resnets.1`, all at one width.
#[derive(Debug, Clone)]
pub struct VaeMidBlock {
    first: ResnetBlock2D,
    attention: Option<VaeAttention>,
    second: ResnetBlock2D,
}

impl VaeMidBlock {
    /// Loads the block from `w` (e.g. `encoder.mid_block`).
    ///
    /// # Errors
    /// Missing or misshapen tensors, or `groups` not dividing `channels`.
    pub fn new(w: &Weights, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        let attention = if add_attention {
            Some(VaeAttention::new(
                &w.pp("attentions").pp(0),
                channels,
                groups,
                VAE_NORM_EPS,
            )?)
        } else {
            None
        };
        Ok(Self {
            first: vae_resnet(&w.pp("resnets").pp(0), channels, channels, groups)?,
            attention,
            second: vae_resnet(&w.pp("resnets").pp(1), channels, channels, groups)?,
        })
    }

    /// Applies the block to `x` `[B, C, H, W]`.
    ///
    /// # Errors
    /// Tensor shape or device failures.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.first.forward(x, None)?;
        let h = match &self.attention {
            Some(a) => a.forward(&h)?,
            None => h,
        };
        self.second.forward(&h, None)
    }
}
