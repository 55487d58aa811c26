//! A linear layer that keeps its weight transposed, as the CPU GEMM wants it.

use candle_core::{DType, Module, Tensor};

use crate::kernels::matmul;
use crate::kernels::transpose::transpose_2d;

/// `y = x Wᵀ + b` with the checkpoint's `weight` `[out, in]` and optional `bias` `[out]`.
///
/// The weight is stored once transposed, `[in, out]` and contiguous, so that `x · Wᵀ` is a plain
/// row-major product: the `gemm` crate then reads the weight in place instead of re-packing it
/// on every call (a third of the UNet's time at 512 px went to that packing with candle-nn's
/// `Linear`). [`Linear::weight`] is a `[out, in]` view of the same storage.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, a transposed view of `weight_t`.
    weight: Tensor,
    /// `[in, out]`, contiguous.
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer from the checkpoint's `weight` `[out, in]` and `bias` `[out]`.
    /// A `weight` that already is a transposed view of a contiguous `[in, out]` tensor (the
    /// [`Linear::weight`] of another layer, for example) is kept as it is, without a copy.
    ///
    /// # Errors
    /// `weight` not 2-D.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let transposed = weight.t()?;
        if transposed.is_contiguous() {
            return Ok(Self {
                weight,
                weight_t: transposed,
                bias,
            });
        }
        let weight_t = transpose_2d(&weight)?;
        Ok(Self {
            weight: weight_t.t()?,
            weight_t,
            bias,
        })
    }

    /// A layer from the weight already transposed, `weight_t` `[in, out]` (see
    /// [`crate::loading::Weights::get_transposed`]), and `bias` `[out]`.
    ///
    /// # Errors
    /// `weight_t` not 2-D.
    pub fn from_transposed(weight_t: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let weight_t = weight_t.contiguous()?;
        Ok(Self {
            weight: weight_t.t()?,
            weight_t,
            bias,
        })
    }

    /// The weight `[out, in]` (a view; the same tensor on every call).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // A strided lhs with a broadcast rhs hits a candle 0.11 matmul bug; contiguous inputs
        // also let candle fold the batch into one GEMM.
        let x = if x.is_contiguous() {
            x.clone()
        } else {
            x.contiguous()?
        };
        if x.dtype() == DType::BF16 && x.device().is_cpu() {
            // Native bf16 GEMM with the bias fused before the rounding (falls back to candle
            // on CPUs without AVX512-BF16).
            return matmul::linear(&x, &self.weight, self.bias.as_ref());
        }
        let y = x.broadcast_matmul(&self.weight_t)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::{Device, IndexOp};

    use super::*;
    use crate::test_support::max_abs_diff;

    #[test]
    fn equals_candle_nn_linear() {
        let d = &Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (7, 5), d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 7, d).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), d).unwrap();
        let ours = Linear::new(w.clone(), Some(b.clone())).unwrap();
        let theirs = candle_nn::Linear::new(w.clone(), Some(b));
        for x in [
            x.clone(),
            x.i((.., 1..3, ..)).unwrap(),
            x.transpose(0, 1).unwrap(),
        ] {
            let diff = max_abs_diff(&ours.forward(&x).unwrap(), &theirs.forward(&x).unwrap());
            assert!(diff < 1e-5, "worst {diff}");
        }
        assert_eq!(ours.weight().dims(), w.dims());
        assert_eq!(ours.weight().id(), ours.weight().id());
    }
}
