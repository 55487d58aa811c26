//! Layers shared by the UNet, the VAE and the text encoders, built from [`Weights`] under the
//! checkpoint's own names.
//!
//! The layer types run our CPU kernels where they apply and candle's operations elsewhere;
//! these constructors read `weight`/`bias` with shape checks so that a wrong checkpoint fails
//! with the full key and both shapes.

use candle_nn::Conv2dConfig;

use crate::error::{Error, Result};
use crate::loading::Weights;

/// A linear layer `y = x Wᵀ + b` with `weight` `[out, in]` and optional `bias` `[out]`.
///
/// # Errors
/// Missing or misshapen tensors.
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, w: &Weights) -> Result<Linear> {
    let bias = if bias {
        Some(w.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(match w.get_packed((out_dim, in_dim), "weight")? {
        Some(packed) => Linear::from_packed(packed, bias),
        None => Linear::from_transposed(w.get_transposed((out_dim, in_dim), "weight")?, bias)?,
    })
}

/// A 2-D convolution with a square `kernel`, `stride` and `padding`, with bias.
///
/// # Errors
/// Missing or misshapen tensors.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    w: &Weights,
) -> Result<Conv2d> {
    let weight = w.get((out_channels, in_channels, kernel, kernel), "weight")?;
    let bias = w.get(out_channels, "bias")?;
    let config = Conv2dConfig {
        padding,
        stride,
        dilation: 1,
        groups: 1,
        cudnn_fwd_algo: None,
    };
    Ok(Conv2d::new(candle_nn::Conv2d::new(
        weight,
        Some(bias),
        config,
    ))?)
}

/// Group normalisation over `channels` in `groups`, with affine `weight` and `bias`.
///
/// # Errors
/// Missing or misshapen tensors, or `groups` not dividing `channels`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, w: &Weights) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(Error::unsupported(format!(
            "group norm `{}`: {groups} groups do not divide {channels} channels",
            w.key("weight")
        )));
    }
    let weight = w.get(channels, "weight")?;
    let bias = w.get(channels, "bias")?;
    Ok(GroupNorm::new(weight, bias, groups, eps))
}

/// Layer normalisation over the last dimension of size `size`, with `weight` and `bias`.
///
/// # Errors
/// Missing or misshapen tensors.
pub fn layer_norm(size: usize, eps: f64, w: &Weights) -> Result<LayerNorm> {
    let weight = w.get(size, "weight")?;
    let bias = w.get(size, "bias")?;
    Ok(LayerNorm::new(weight, bias, eps))
}

pub mod conv;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;
pub mod resnet;
pub mod sampling;
pub mod visit;

pub use conv::Conv2d;
pub use group_norm::GroupNorm;
pub use layer_norm::LayerNorm;
pub use linear::Linear;
pub use resnet::ResnetBlock2D;
pub use sampling::{Downsample2D, Upsample2D};
pub use visit::{LayerMut, LayerVisitor, SavedLayer};
