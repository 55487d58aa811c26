//! Resolution changes between levels: strided-convolution downsampling and nearest-neighbour
//! upsampling followed by a convolution (diffusers' `Downsample2D` / `Upsample2D`).

use super::Conv2d;
use candle_core::{Module, Tensor};

use super::conv2d;
use super::visit::{LayerMut, LayerVisitor};
use crate::error::Result;
use crate::kernels::conv2d::InputPrep;
use crate::loading::Weights;

/// A 3×3 convolution with stride 2 (weights under `conv`).
///
/// With `padding` 1 (the UNet) the input is padded symmetrically; with `padding` 0 (the VAE
/// encoder) it is padded by one on the right and bottom only, as diffusers does.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    /// Loads `conv` from `w` (e.g. `down_blocks.0.downsamplers.0`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(
        w: &Weights,
        in_channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: conv2d(in_channels, out_channels, 3, 2, padding, &w.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }

    /// Calls `f` on `conv`, named under `prefix`.
    ///
    /// # Errors
    /// The error `f` returns.
    pub fn visit_layers_mut(&mut self, prefix: &str, f: &mut LayerVisitor<'_>) -> Result<()> {
        f(&format!("{prefix}.conv"), LayerMut::Conv2d(&mut self.conv))
    }

    /// Halves the spatial size of `x` `[B, C, H, W]`.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let prep = if self.pad_right_bottom {
            InputPrep::pad_bottom_right(1)
        } else {
            InputPrep::NONE
        };
        Ok(self.conv.forward_prepared(x, prep)?)
    }
}

/// Nearest-neighbour ×2 upsampling followed by a 3×3 convolution (weights under `conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Loads `conv` from `w` (e.g. `up_blocks.0.upsamplers.0`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(w: &Weights, in_channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(in_channels, out_channels, 3, 1, 1, &w.pp("conv"))?,
        })
    }

    /// Calls `f` on `conv`, named under `prefix`.
    ///
    /// # Errors
    /// The error `f` returns.
    pub fn visit_layers_mut(&mut self, prefix: &str, f: &mut LayerVisitor<'_>) -> Result<()> {
        f(&format!("{prefix}.conv"), LayerMut::Conv2d(&mut self.conv))
    }

    /// Upsamples `x` to `size` `(H, W)` when given (the UNet matches its skip connection),
    /// otherwise doubles it.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        if (th, tw) == (2 * h, 2 * w) {
            // The convolution reads every input value twice in each direction itself.
            return Ok(self.conv.forward_prepared(x, InputPrep::upsample(2))?);
        }
        let x = x.upsample_nearest2d(th, tw)?;
        Ok(self.conv.forward(&x)?)
    }
}
