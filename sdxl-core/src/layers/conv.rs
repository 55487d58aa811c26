//! A 2-D convolution that runs in every dtype on every device.

use candle_core::{DType, Module, Tensor};

/// candle-nn's `Conv2d`, except that bf16 inputs on the CPU are convolved in f32 (candle's CPU
/// convolution has no bf16 kernel) and the result is narrowed back.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

impl Conv2d {
    /// Wraps candle-nn's convolution.
    pub fn new(inner: candle_nn::Conv2d) -> Self {
        Self { inner }
    }

    /// The kernel `[out, in, k, k]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Padding, stride and the other options.
    pub fn config(&self) -> &candle_nn::Conv2dConfig {
        self.inner.config()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() == DType::BF16 && x.device().is_cpu() {
            let w = self.inner.weight().to_dtype(DType::F32)?;
            let b = self
                .inner
                .bias()
                .map(|b| b.to_dtype(DType::F32))
                .transpose()?;
            let conv = candle_nn::Conv2d::new(w, b, *self.inner.config());
            conv.forward(&x.to_dtype(DType::F32)?)?
                .to_dtype(DType::BF16)
        } else {
            self.inner.forward(x)
        }
    }
}
