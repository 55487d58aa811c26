//! Group normalisation that runs fused on the CPU.

use candle_core::{DType, Module, Tensor};

use crate::kernels::group_norm::{self as kernel, GroupNormParams};

/// Group normalisation over dimension 1 with per-channel `weight` and `bias`, as diffusers'
/// `GroupNorm`. On the CPU it runs in one fused pass (computed in f32; f16 inputs are widened
/// first and narrowed back, as candle-nn does); elsewhere it is candle-nn's `GroupNorm`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// A normalisation of `weight.len()` channels in `groups` groups.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Self {
        Self {
            weight,
            bias,
            groups,
            eps,
        }
    }

    /// `SiLU(GroupNorm(x))`, fused on the CPU (the norm-then-activation of every ResNet block).
    ///
    /// # Errors
    /// Shapes that do not match the weights.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let params = GroupNormParams {
            groups: self.groups,
            eps: self.eps,
            weight: &self.weight,
            bias: &self.bias,
            silu,
        };
        if kernel::supports(x) {
            return kernel::group_norm(x, &params);
        }
        if x.device().is_cpu() {
            let widened = x.to_dtype(DType::F32)?;
            if kernel::supports(&widened) {
                return kernel::group_norm(&widened, &params)?.to_dtype(x.dtype());
            }
        }
        let channels = self.weight.elem_count();
        let norm = candle_nn::GroupNorm::new(
            self.weight.clone(),
            self.bias.clone(),
            channels,
            self.groups,
            self.eps,
        )?;
        let y = norm.forward(x)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }
}
