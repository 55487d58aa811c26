//! The encoder's posterior: a diagonal Gaussian over latents (diffusers'
//! `DiagonalGaussianDistribution`).

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Lower clamp of the log-variance, as diffusers applies it.
const LOGVAR_MIN: f64 = -30.0;
/// Upper clamp of the log-variance, as diffusers applies it.
const LOGVAR_MAX: f64 = 20.0;

/// `N(mean, exp(logvar))` per latent element, in the VAE's raw latent space (not multiplied by
/// `scaling_factor`).
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// The mean `[B, latent_channels, h, w]` (the first half of the moments' channels).
    pub mean: Tensor,
    /// The log-variance, same shape, clamped to `[-30, 20]`.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits `moments` `[B, 2*L, h, w]` (the output of `quant_conv`) into mean and clamped
    /// log-variance along the channels.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `moments` is not 4-D with an even channel count.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let channels = match moments.dims() {
            [_, c, _, _] if c % 2 == 0 => *c,
            dims => {
                return Err(Error::invalid(format!(
                    "VAE moments must be [B, 2*latent_channels, h, w], got {dims:?}"
                )))
            }
        };
        let half = channels / 2;
        Ok(Self {
            mean: moments.narrow(1, 0, half)?,
            logvar: moments
                .narrow(1, half, half)?
                .clamp(LOGVAR_MIN, LOGVAR_MAX)?,
        })
    }

    /// The standard deviation `exp(0.5 * logvar)`.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// The mode of the distribution, its mean (what diffusers' `sample_mode="argmax"` uses).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// A sample `mean + std * noise` for standard-normal `noise` of the mean's shape, converted
    /// to the mean's dtype (so float32 noise can drive a half-precision VAE).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `noise` has another shape; tensor failures.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.dims() != self.mean.dims() {
            return Err(Error::invalid(format!(
                "posterior noise has shape {:?}, the latents have {:?}",
                noise.dims(),
                self.mean.dims()
            )));
        }
        let noise = noise.to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (self.std()? * noise)?)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn splits_clamps_and_samples() {
        let values: Vec<f32> = vec![1.0, -2.0, 50.0, -40.0];
        let moments = Tensor::from_vec(values, (1, 4, 1, 1), &Device::Cpu).unwrap();
        let dist = DiagonalGaussian::from_moments(&moments).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&dist.mean), [1.0, -2.0]);
        assert_eq!(flat(&dist.logvar), [20.0, -30.0]);
        let noise = Tensor::from_vec(vec![1.0f32, 2.0], (1, 2, 1, 1), &Device::Cpu).unwrap();
        let s = flat(&dist.sample(&noise).unwrap());
        assert!((s[0] - (1.0 + 10f32.exp())).abs() < 1e-3 * 10f32.exp());
        assert!((s[1] - (-2.0 + 2.0 * (-15f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn bad_shapes_are_invalid_arguments() {
        let odd = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            DiagonalGaussian::from_moments(&odd),
            Err(Error::InvalidArgument(_))
        ));
        let moments = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let dist = DiagonalGaussian::from_moments(&moments).unwrap();
        let noise = Tensor::zeros((1, 2, 2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            dist.sample(&noise),
            Err(Error::InvalidArgument(_))
        ));
    }
}
