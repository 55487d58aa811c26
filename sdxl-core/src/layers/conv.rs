//! A 2-D convolution that runs in every dtype on every device.

use candle_core::{DType, Device, Module, Tensor, TensorId};
use candle_nn::Conv2dConfig;

use crate::kernels::conv2d::{self, InputPrep, PackedKernel};

/// candle-nn's `Conv2d`, except on the CPU: f32 convolutions, and bf16 ones where the CPU has
/// AVX512-BF16, run through [`kernels::conv2d`](crate::kernels::conv2d) (about twice as fast as
/// candle's in f32; candle has no bf16 CPU convolution); other bf16 inputs are convolved in f32
/// and narrowed back. A bf16 weight the native kernel uses is stored packed for it
/// ([`PackedKernel`]), in place of the plain weight.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: StoredKernel,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

/// How a [`Conv2d`] holds its weight.
#[derive(Debug, Clone)]
enum StoredKernel {
    /// `[out, in, kh, kw]` as loaded.
    Plain(Tensor),
    /// Packed for the native bf16 GEMM.
    Packed(PackedKernel),
}

impl Conv2d {
    /// The convolution of candle-nn's layer (its weight, bias and settings).
    ///
    /// # Errors
    /// Packing the weight fails.
    pub fn new(inner: candle_nn::Conv2d) -> candle_core::Result<Self> {
        let weight = inner.weight();
        let weight = match PackedKernel::pack(weight)? {
            Some(packed) if inner.config().groups == 1 => StoredKernel::Packed(packed),
            _ => StoredKernel::Plain(weight.clone()),
        };
        Ok(Self {
            weight,
            bias: inner.bias().cloned(),
            config: *inner.config(),
        })
    }

    /// The kernel `[out, in, kh, kw]`: the stored tensor, or (when stored packed) an unpacked
    /// copy.
    ///
    /// # Errors
    /// A tensor operation fails.
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            StoredKernel::Plain(w) => Ok(w.clone()),
            StoredKernel::Packed(p) => p.weight(),
        }
    }

    /// The kernel's shape `[out, in, kh, kw]`.
    pub fn weight_dims(&self) -> Vec<usize> {
        match &self.weight {
            StoredKernel::Plain(w) => w.dims().to_vec(),
            StoredKernel::Packed(p) => p.dims().to_vec(),
        }
    }

    /// The id of the stored weight: it changes exactly when the layer gets another weight.
    pub fn weight_id(&self) -> TensorId {
        match &self.weight {
            StoredKernel::Plain(w) => w.id(),
            StoredKernel::Packed(p) => p.id(),
        }
    }

    /// The weight's dtype.
    pub fn dtype(&self) -> DType {
        match &self.weight {
            StoredKernel::Plain(w) => w.dtype(),
            StoredKernel::Packed(_) => DType::BF16,
        }
    }

    /// The device the weight lives on.
    pub fn device(&self) -> Device {
        match &self.weight {
            StoredKernel::Plain(w) => w.device().clone(),
            StoredKernel::Packed(_) => Device::Cpu,
        }
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Padding, stride and the other options.
    pub fn config(&self) -> &Conv2dConfig {
        &self.config
    }
}

impl Conv2d {
    /// The convolution of `prep(x)`: on the CPU the kernel upsamples or pads while it gathers
    /// its columns, so the prepared input is never written out; elsewhere it is made with
    /// candle's operations first.
    ///
    /// # Errors
    /// Shapes that do not fit, or a tensor operation fails.
    pub fn forward_prepared(&self, x: &Tensor, prep: InputPrep) -> candle_core::Result<Tensor> {
        self.forward_with(x, prep, None)
    }

    /// `conv(x) + residual` (a residual connection: `residual` has the output's shape). On
    /// the CPU the kernel accumulates its products onto the residual, so the sum is one pass
    /// over the output and, in bf16, rounded once.
    ///
    /// # Errors
    /// Shapes that do not fit, or a tensor operation fails.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, InputPrep::NONE, Some(residual))
    }

    /// `conv(prep(x)) (+ residual)` on the fastest path for the device and dtype.
    fn forward_with(
        &self,
        x: &Tensor,
        prep: InputPrep,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (bias, config) = (self.bias.as_ref(), &self.config);
        let weight = match &self.weight {
            StoredKernel::Packed(p) if x.dtype() == DType::BF16 && x.device().is_cpu() => {
                return conv2d::conv2d_packed(x, p, bias, config, prep, residual);
            }
            StoredKernel::Packed(p) => &p.weight()?,
            StoredKernel::Plain(w) => w,
        };
        if conv2d::supports(x, weight, config) {
            return conv2d::conv2d(x, weight, bias, config, prep, residual);
        }
        let y = if x.dtype() == DType::BF16 && x.device().is_cpu() {
            let w = weight.to_dtype(DType::F32)?;
            let x = x.to_dtype(DType::F32)?;
            let y = if conv2d::supports(&x, &w, config) {
                conv2d::conv2d(&x, &w, bias, config, prep, None)?
            } else {
                let b = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
                candle_nn::Conv2d::new(w, b, *config).forward(&prep.apply(&x)?)?
            };
            y.to_dtype(DType::BF16)?
        } else {
            candle_nn::Conv2d::new(weight.clone(), bias.cloned(), *config)
                .forward(&prep.apply(x)?)?
        };
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, InputPrep::NONE, None)
    }
}
