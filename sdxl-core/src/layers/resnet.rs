//! diffusers' `ResnetBlock2D`: two normalised 3×3 convolutions with a residual connection and
//! an optional timestep-embedding projection.

use super::{GroupNorm, Linear};
use candle_core::{Module, Tensor};

use super::Conv2d;

use super::visit::{LayerMut, LayerVisitor};
use super::{conv2d, group_norm, linear};
use crate::error::Result;
use crate::loading::Weights;

/// Sizes of one [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the timestep embedding, or `None` for blocks without one (the VAE).
    pub temb_channels: Option<usize>,
    /// Groups of both group norms.
    pub groups: usize,
    /// Epsilon of both group norms.
    pub eps: f64,
}

/// `norm1 → SiLU → conv1 (+ time_emb_proj(SiLU(temb))) → norm2 → SiLU → conv2`, plus the input
/// (through `conv_shortcut`, a 1×1 convolution, when the channel count changes).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    /// Loads the block's weights from `w` (its checkpoint prefix, e.g. `down_blocks.0.resnets.1`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(w: &Weights, cfg: &ResnetConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(linear(t, cout, true, &w.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if cin != cout {
            Some(conv2d(cin, cout, 1, 1, 0, &w.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(cfg.groups, cin, cfg.eps, &w.pp("norm1"))?,
            conv1: conv2d(cin, cout, 3, 1, 1, &w.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(cfg.groups, cout, cfg.eps, &w.pp("norm2"))?,
            conv2: conv2d(cout, cout, 3, 1, 1, &w.pp("conv2"))?,
            conv_shortcut,
        })
    }

    /// Calls `f` on `conv1`, `time_emb_proj`, `conv2` and `conv_shortcut` (those the block
    /// has), named under `prefix`.
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_layers_mut(&mut self, prefix: &str, f: &mut LayerVisitor<'_>) -> Result<()> {
        f(
            &format!("{prefix}.conv1"),
            LayerMut::Conv2d(&mut self.conv1),
        )?;
        if let Some(proj) = &mut self.time_emb_proj {
            f(&format!("{prefix}.time_emb_proj"), LayerMut::Linear(proj))?;
        }
        f(
            &format!("{prefix}.conv2"),
            LayerMut::Conv2d(&mut self.conv2),
        )?;
        if let Some(shortcut) = &mut self.conv_shortcut {
            f(
                &format!("{prefix}.conv_shortcut"),
                LayerMut::Conv2d(shortcut),
            )?;
        }
        Ok(())
    }

    /// Applies the block to `x` `[B, C, H, W]`, with the timestep embedding `temb` `[B, T]` when
    /// the block has a projection for it.
    ///
    /// # Errors
    /// Tensor shape or device failures.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let h = self.norm2.forward_silu(&h)?;
        Ok(self.conv2.forward_residual(&h, &shortcut)?)
    }
}
