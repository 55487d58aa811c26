//! The forward (noising) process: its coefficients and `add_noise`.
//!
//! Two parametrisations meet here: the variance-preserving one of DDPM-type models,
//! `x_t = α_t·x₀ + σ_t·ε` with `α_t = √ᾱ_t`, `σ_t = √(1 − ᾱ_t)`, and the k-diffusion one,
//! `x = x₀ + σ·ε` with `σ = σ_t / α_t`, which is the same process with the sample scaled by
//! `1 / α_t`.

use candle_core::Tensor;

use super::arith::lincomb;
use crate::error::Result;

/// The coefficients `(α_t, σ_t)` of the variance-preserving forward process
/// `x_t = α_t·x₀ + σ_t·ε`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Vp {
    /// α_t, the weight of the clean sample.
    pub alpha: f64,
    /// σ_t, the weight of the noise.
    pub sigma: f64,
}

impl Vp {
    /// From the cumulative alpha ᾱ_t: `(√ᾱ_t, √(1 − ᾱ_t))`.
    pub(crate) fn from_alpha_cumprod(alpha_cumprod: f64) -> Self {
        Self {
            alpha: alpha_cumprod.sqrt(),
            sigma: (1.0 - alpha_cumprod).sqrt(),
        }
    }

    /// From a k-diffusion σ: `α_t = 1/√(σ²+1)`, `σ_t = σ·α_t`.
    pub(crate) fn from_sigma(sigma: f64) -> Self {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        Self {
            alpha,
            sigma: sigma * alpha,
        }
    }

    /// The half-log-SNR `λ = log α_t − log σ_t` (+∞ at σ = 0).
    pub(crate) fn lambda(self) -> f64 {
        self.alpha.ln() - self.sigma.ln()
    }

    /// `α_t·original + σ_t·noise` (diffusers' `add_noise` of DDIM, DDPM, LCM, DPM-Solver++ and
    /// UniPC); the noise is cast to the sample's dtype.
    ///
    /// # Errors
    /// Tensor failures (mismatched shapes).
    pub(crate) fn add_noise(self, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let noise = noise.to_dtype(original.dtype())?;
        lincomb(&[(self.alpha, original), (self.sigma, &noise)])
    }
}

/// `original + noise · σ`, the forward process of the k-diffusion families.
///
/// # Errors
/// Tensor failures (mismatched shapes or dtypes).
pub(crate) fn add_sigma_noise(original: &Tensor, noise: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(original.add(&noise.affine(sigma, 0.0)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parametrisations_agree() {
        let sigma = 2.5;
        let vp = Vp::from_sigma(sigma);
        assert!((vp.alpha * vp.alpha + vp.sigma * vp.sigma - 1.0).abs() < 1e-12);
        assert!((vp.sigma / vp.alpha - sigma).abs() < 1e-12);
        let same = Vp::from_alpha_cumprod(vp.alpha * vp.alpha);
        assert!((same.alpha - vp.alpha).abs() < 1e-12 && (same.sigma - vp.sigma).abs() < 1e-12);
        assert!((vp.lambda() + sigma.ln()).abs() < 1e-12);
        assert_eq!(Vp::from_sigma(0.0).lambda(), f64::INFINITY);
    }
}
