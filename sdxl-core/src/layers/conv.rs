//! A 2-D convolution that runs in every dtype on every device.

use candle_core::{DType, Module, Tensor};

use crate::kernels::conv2d;

/// candle-nn's `Conv2d`, except on the CPU: f32 convolutions, and bf16 ones where the CPU has
/// AVX512-BF16, run through [`kernels::conv2d`](crate::kernels::conv2d) (about twice as fast as
/// candle's in f32; candle has no bf16 CPU convolution); other bf16 inputs are convolved in f32
/// and narrowed back.
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
        let (weight, bias, config) = (self.weight(), self.bias(), self.config());
        if conv2d::supports(x, weight, config) {
            conv2d::conv2d(x, weight, bias, config)
        } else if x.dtype() == DType::BF16 && x.device().is_cpu() {
            let w = weight.to_dtype(DType::F32)?;
            let x = x.to_dtype(DType::F32)?;
            let y = if conv2d::supports(&x, &w, config) {
                conv2d::conv2d(&x, &w, bias, config)?
            } else {
                let b = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
                candle_nn::Conv2d::new(w, b, *config).forward(&x)?
            };
            y.to_dtype(DType::BF16)
        } else {
            self.inner.forward(x)
        }
    }
}
