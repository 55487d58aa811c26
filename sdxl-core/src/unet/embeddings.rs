//! diffusers' `TimestepEmbedding`: the two-layer MLP that turns sinusoidal features into the
//! embedding every resnet receives (`time_embedding`, and SDXL's `add_embedding`).

use candle_core::{Module, Tensor};

use super::attention::LinearVisitor;
use crate::error::Result;
use crate::layers::{linear, Linear};
use crate::loading::Weights;

/// `linear_1 → SiLU → linear_2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    /// `linear_1`: `[out, in]`.
    pub linear_1: Linear,
    /// `linear_2`: `[out, out]`.
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    /// Loads `linear_1` (`in_dim → out_dim`) and `linear_2` (`out_dim → out_dim`) from `w`
    /// (e.g. `time_embedding` or `add_embedding`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(w: &Weights, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, true, &w.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, true, &w.pp("linear_2"))?,
        })
    }

    /// Calls `f` on `linear_1` and `linear_2`, named under `prefix`.
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_linears_mut(&mut self, prefix: &str, f: &mut LinearVisitor<'_>) -> Result<()> {
        f(&format!("{prefix}.linear_1"), &mut self.linear_1)?;
        f(&format!("{prefix}.linear_2"), &mut self.linear_2)
    }

    /// Applies the MLP to `x` `[B, in]`.
    ///
    /// # Errors
    /// Tensor shape or device failures.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.linear_1.forward(x)?.silu()?;
        Ok(self.linear_2.forward(&h)?)
    }
}
