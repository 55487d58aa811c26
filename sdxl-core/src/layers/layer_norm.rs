//! Layer normalisation that runs as one vectorised pass on the CPU.

use candle_core::{DType, Module, Tensor};

use crate::kernels::layer_norm as kernel;

/// Layer normalisation over the last dimension with per-feature `weight` and `bias`, as
/// PyTorch's `LayerNorm`. On the CPU it runs in [`crate::kernels::layer_norm`] (computed in f32;
/// f16 inputs are widened first and narrowed back); elsewhere it is candle-nn's `LayerNorm`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A normalisation of `weight.len()` features, `eps` added to the variance.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if kernel::supports(x) {
            return kernel::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        if x.device().is_cpu() {
            let widened = x.to_dtype(DType::F32)?;
            if kernel::supports(&widened) {
                return kernel::layer_norm(&widened, &self.weight, &self.bias, self.eps)?
                    .to_dtype(x.dtype());
            }
        }
        candle_nn::LayerNorm::new(self.weight.clone(), self.bias.clone(), self.eps).forward(x)
    }
}
