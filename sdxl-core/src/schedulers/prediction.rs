//! What the denoising model predicts (`prediction_type`) and the conversions of its output to
//! the clean sample x₀ and the noise ε.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::arith::lincomb;
use super::noising::Vp;
use crate::error::{Error, Result};

/// `prediction_type`: what the denoising model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PredictionType {
    /// The added noise ε.
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The velocity `v = α_t ε − σ_t x₀` (Salimans & Ho 2022; Imagen Video, section 2.4).
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The clean sample itself (`original_sample` is diffusers' older name for it).
    #[serde(rename = "sample", alias = "original_sample")]
    Sample,
}

/// The clean sample x₀ from the model output at forward-process coefficients `vp`
/// (`x_t = α_t x₀ + σ_t ε`).
///
/// # Errors
/// Tensor failures (mismatched shapes or dtypes).
pub(crate) fn data_prediction(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    vp: Vp,
) -> Result<Tensor> {
    let Vp { alpha, sigma } = vp;
    match prediction {
        PredictionType::Epsilon => {
            lincomb(&[(1.0 / alpha, sample), (-sigma / alpha, model_output)])
        }
        PredictionType::Sample => Ok(model_output.clone()),
        PredictionType::VPrediction => lincomb(&[(alpha, sample), (-sigma, model_output)]),
    }
}

/// The noise ε from the model output at forward-process coefficients `vp`.
///
/// # Errors
/// Tensor failures (mismatched shapes or dtypes).
pub(crate) fn noise_prediction(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    vp: Vp,
) -> Result<Tensor> {
    let Vp { alpha, sigma } = vp;
    match prediction {
        PredictionType::Epsilon => Ok(model_output.clone()),
        PredictionType::Sample => lincomb(&[(1.0 / sigma, sample), (-alpha / sigma, model_output)]),
        PredictionType::VPrediction => lincomb(&[(alpha, model_output), (sigma, sample)]),
    }
}

/// The denoised estimate x₀ of the k-diffusion families at noise level `sigma`
/// (`x = x₀ + σ ε`, the model seeing `x / √(σ² + 1)`).
///
/// # Errors
/// Tensor failures (mismatched shapes or dtypes).
pub(crate) fn denoised(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => sample.sub(&model_output.affine(sigma, 0.0)?)?,
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            model_output
                .affine(-sigma / s2.sqrt(), 0.0)?
                .add(&sample.affine(1.0 / s2, 0.0)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

/// Clamps a predicted x₀ to `±range` when `on` (`clip_sample`).
///
/// # Errors
/// Tensor failures.
pub(crate) fn clip(x0: Tensor, on: bool, range: f64) -> Result<Tensor> {
    if on {
        Ok(x0.clamp(-range, range)?)
    } else {
        Ok(x0)
    }
}

/// Dynamic thresholding of x₀ (Imagen, `thresholding: true`) is not implemented.
///
/// # Errors
/// [`Error::Unsupported`] when `thresholding` is set.
pub(crate) fn reject_thresholding(thresholding: bool) -> Result<()> {
    if thresholding {
        return Err(Error::unsupported(
            "dynamic thresholding (`thresholding: true`) is not implemented",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every prediction type recovers x₀ and ε from a sample built as `α x₀ + σ ε`.
    #[test]
    fn conversions_invert_the_forward_process() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.5f64, -1.5], &dev)?;
        let eps = Tensor::new(&[1.25f64, 0.25], &dev)?;
        let vp = Vp::from_alpha_cumprod(0.3);
        let x = lincomb(&[(vp.alpha, &x0), (vp.sigma, &eps)])?;
        let v = lincomb(&[(vp.alpha, &eps), (-vp.sigma, &x0)])?;
        let close = |a: &Tensor, b: &Tensor| -> Result<bool> {
            Ok((a - b)?.abs()?.max(0)?.to_scalar::<f64>()? < 1e-12)
        };
        for (prediction, output) in [
            (PredictionType::Epsilon, &eps),
            (PredictionType::Sample, &x0),
            (PredictionType::VPrediction, &v),
        ] {
            assert!(close(&data_prediction(prediction, output, &x, vp)?, &x0)?);
            assert!(close(&noise_prediction(prediction, output, &x, vp)?, &eps)?);
            // The k-diffusion sample is x / α at σ = σ_t / α_t.
            let scaled = x.affine(1.0 / vp.alpha, 0.0)?;
            let k_output = match prediction {
                PredictionType::Epsilon | PredictionType::Sample => output.clone(),
                PredictionType::VPrediction => v.clone(),
            };
            let got = denoised(prediction, &k_output, &scaled, vp.sigma / vp.alpha)?;
            assert!(close(&got, &x0)?, "{prediction:?}");
        }
        assert!(reject_thresholding(true).is_err() && reject_thresholding(false).is_ok());
        Ok(())
    }
}
