//! A linear layer that keeps its weight in the layout the CPU GEMM reads.

use candle_core::{DType, Module, Tensor, TensorId};

use crate::kernels::matmul::{self, PackedWeight};
use crate::kernels::transpose::transpose_2d;

/// `y = x Wᵀ + b` with the checkpoint's `weight` `[out, in]` and optional `bias` `[out]`.
///
/// The weight is stored once in the layout the GEMM wants, never as a second copy:
/// - bf16 on a CPU with AVX512-BF16: packed for the native bf16 GEMM ([`PackedWeight`]), so
///   that no call re-packs it (a fifth of a bf16 UNet step went to that packing);
/// - otherwise transposed, `[in, out]` and contiguous, so that `x · Wᵀ` is a plain row-major
///   product the `gemm` crate reads in place (a third of the f32 UNet's time at 512 px went to
///   re-packing candle-nn's `[out, in]` weight on every call).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: StoredWeight,
    bias: Option<Tensor>,
}

/// How a [`Linear`] holds its weight.
#[derive(Debug, Clone)]
enum StoredWeight {
    /// `[in, out]`, contiguous.
    Transposed(Tensor),
    /// Packed for the native bf16 GEMM.
    Packed(PackedWeight),
}

impl Linear {
    /// A layer from the checkpoint's `weight` `[out, in]` and `bias` `[out]`.
    /// A `weight` that already is a transposed view of a contiguous `[in, out]` tensor is
    /// transposed back without a copy.
    ///
    /// # Errors
    /// `weight` not 2-D.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let transposed = weight.t()?;
        if transposed.is_contiguous() || PackedWeight::applies(weight.dtype(), weight.device()) {
            // Packing reads each output row of `weight` as one line: no transposed copy first.
            return Self::from_transposed(transposed, bias);
        }
        Self::from_transposed(transpose_2d(&weight)?, bias)
    }

    /// A layer from the weight already transposed, `weight_t` `[in, out]` (see
    /// [`crate::loading::Weights::get_transposed`]), and `bias` `[out]`.
    ///
    /// # Errors
    /// `weight_t` not 2-D.
    pub fn from_transposed(weight_t: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        weight_t.dims2()?;
        let weight = match PackedWeight::pack(&weight_t)? {
            Some(packed) => StoredWeight::Packed(packed),
            None => StoredWeight::Transposed(weight_t.contiguous()?),
        };
        Ok(Self { weight, bias })
    }

    /// A layer from a weight already packed for the native bf16 GEMM and `bias` `[out]`.
    pub fn from_packed(weight: PackedWeight, bias: Option<Tensor>) -> Self {
        Self {
            weight: StoredWeight::Packed(weight),
            bias,
        }
    }

    /// The weight `[out, in]`: a view of the stored tensor, or (for a packed bf16 weight) an
    /// unpacked copy.
    ///
    /// # Errors
    /// A tensor operation fails.
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            StoredWeight::Transposed(w) => w.t(),
            StoredWeight::Packed(p) => p.weight(),
        }
    }

    /// `(out, in)`: the weight's shape.
    pub fn weight_dims(&self) -> (usize, usize) {
        match &self.weight {
            StoredWeight::Transposed(w) => {
                let d = w.dims();
                (
                    d.get(1).copied().unwrap_or(0),
                    d.first().copied().unwrap_or(0),
                )
            }
            StoredWeight::Packed(p) => p.dims(),
        }
    }

    /// The id of the stored weight: it changes exactly when the layer gets another weight.
    pub fn weight_id(&self) -> TensorId {
        match &self.weight {
            StoredWeight::Transposed(w) => w.id(),
            StoredWeight::Packed(p) => p.id(),
        }
    }

    /// The weight's dtype (that of the outputs).
    pub fn dtype(&self) -> DType {
        match &self.weight {
            StoredWeight::Transposed(w) => w.dtype(),
            StoredWeight::Packed(_) => DType::BF16,
        }
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Linear {
    /// `x · Wᵀ + b + residual` (a residual connection: `residual` has the output's shape). On
    /// the CPU with a packed bf16 weight the GEMM accumulates onto the residual, so the sum
    /// is one pass over the output, rounded once.
    ///
    /// # Errors
    /// Shapes that do not fit, or a tensor operation fails.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, Some(residual))
    }

    /// `x · Wᵀ + b (+ residual)` on the fastest path for the device and dtype.
    fn forward_with(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        // A strided lhs with a broadcast rhs hits a candle 0.11 matmul bug; contiguous inputs
        // also let candle fold the batch into one GEMM.
        let x = if x.is_contiguous() {
            x.clone()
        } else {
            x.contiguous()?
        };
        let weight_t = match &self.weight {
            StoredWeight::Packed(p) => return p.linear(&x, self.bias.as_ref(), residual),
            StoredWeight::Transposed(w) => w,
        };
        let y = if x.dtype() == DType::BF16 && x.device().is_cpu() {
            // Native bf16 GEMM with the bias fused before the rounding (falls back to candle
            // on CPUs without AVX512-BF16).
            matmul::linear(&x, &weight_t.t()?, self.bias.as_ref())?
        } else {
            let y = x.broadcast_matmul(weight_t)?;
            match &self.bias {
                Some(bias) => y.broadcast_add(bias)?,
                None => y,
            }
        };
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::{DType, Device, IndexOp};

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
        assert_eq!(ours.weight().unwrap().dims(), w.dims());
        assert_eq!(ours.weight_dims(), (7, 5));
        assert_eq!(ours.weight_id(), ours.weight_id());
    }

    /// `forward_residual` equals `forward` plus the residual: in f32 to rounding, and in bf16
    /// (the packed GEMM, which rounds the sum once) within the two roundings of the unfused
    /// sum. A residual of another shape is an error.
    #[test]
    fn residual_is_added_inside_the_projection() {
        let d = &Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 40), d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, d).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 40), d).unwrap();
        let r = Tensor::randn(0f32, 4.0, (2, 3, 6), d).unwrap();
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 0.25)] {
            let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let layer = Linear::new(cast(&w), Some(cast(&b))).unwrap();
            let wide = |t: Tensor| t.to_dtype(DType::F32).unwrap();
            let unfused = (wide(layer.forward(&cast(&x)).unwrap()) + wide(cast(&r))).unwrap();
            let fused = wide(layer.forward_residual(&cast(&x), &cast(&r)).unwrap());
            let worst = max_abs_diff(&fused, &unfused);
            assert!(worst <= tolerance, "{dtype:?}: worst {worst}");
            let wrong = Tensor::zeros((2, 3, 5), dtype, d).unwrap();
            assert!(layer.forward_residual(&cast(&x), &wrong).is_err());
        }
    }
}
