//! Images in and out of the pipeline: RGB8 buffers, conversions to and from the VAE's tensors
//! with diffusers' exact rounding, and cheap latent previews.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// An 8-bit RGB image, rows top to bottom, 3 bytes per pixel, no padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps a buffer, checking its length.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `data` is not `width * height * 3` bytes.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * 3 {
            return Err(Error::invalid(format!(
                "RGB image of {width}x{height} needs {} bytes, got {}",
                width * height * 3,
                data.len()
            )));
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// Converts VAE output `[B, 3, H, W]` (values around [-1, 1]) into images exactly as
    /// diffusers does for `output_type="pil"`: `x/2 + 0.5`, clamp to [0, 1], `* 255`, round half
    /// to even.
    ///
    /// # Errors
    /// [`Error::NonFinite`] when the tensor holds NaN or infinity (an f16 VAE overflow), tensor
    /// failures otherwise.
    pub fn from_decoded(decoded: &Tensor) -> Result<Vec<Self>> {
        let (b, c, h, w) = decoded.dims4()?;
        if c != 3 {
            return Err(Error::invalid(format!(
                "decoded image has {c} channels, expected 3"
            )));
        }
        let nhwc = decoded
            .to_dtype(DType::F32)?
            .permute((0, 2, 3, 1))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if nhwc.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "VAE decode".into(),
                hint: ": the VAE overflowed; decode in f32 (the default when the VAE config sets \
                       force_upcast) or load an fp16-fix VAE"
                    .into(),
            });
        }
        let per = h * w * 3;
        (0..b)
            .map(|i| {
                let data = nhwc[i * per..(i + 1) * per]
                    .iter()
                    .map(|&x| to_u8(x / 2.0 + 0.5))
                    .collect();
                Self::new(w, h, data)
            })
            .collect()
    }

    /// The image as a `[1, 3, H, W]` f32 tensor in [0, 1].
    ///
    /// # Errors
    /// Tensor failures.
    pub fn to_tensor01(&self, device: &Device) -> Result<Tensor> {
        let values: Vec<f32> = self.data.iter().map(|&v| v as f32 / 255.0).collect();
        let t = Tensor::from_vec(values, (self.height, self.width, 3), device)?;
        Ok(t.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
    }
}

/// `(x.clamp(0, 1) * 255).round()` in f32 with numpy's round-half-to-even.
fn to_u8(x: f32) -> u8 {
    (x.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
}

/// Linear map from SDXL's 4 latent channels to approximate RGB in [-1, 1] (rows: latent
/// channels), the widely used factors for SDXL latent previews.
const LATENT_RGB_FACTORS: [[f32; 3]; 4] = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
];
const LATENT_RGB_BIAS: [f32; 3] = [0.1084, -0.0175, -0.0011];

/// A cheap preview of the first latent of `latents` `[B, 4, h, w]`: one RGB pixel per latent
/// cell, from a fixed linear map (no VAE).
///
/// # Errors
/// [`Error::InvalidArgument`] when the latents do not have 4 channels; tensor failures.
pub fn latent_preview(latents: &Tensor) -> Result<RgbImage> {
    let (_, c, h, w) = latents.dims4()?;
    if c != LATENT_RGB_FACTORS.len() {
        return Err(Error::invalid(format!(
            "latent preview needs 4 latent channels, got {c}"
        )));
    }
    let first = latents
        .get(0)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut data = Vec::with_capacity(h * w * 3);
    for p in 0..h * w {
        for (rgb, bias) in LATENT_RGB_BIAS.iter().enumerate() {
            let v: f32 = LATENT_RGB_FACTORS
                .iter()
                .enumerate()
                .map(|(ch, f)| first[ch * h * w + p] * f[rgb])
                .sum::<f32>()
                + bias;
            data.push(to_u8(v / 2.0 + 0.5));
        }
    }
    RgbImage::new(w, h, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_to_even_like_numpy() {
        // 0.5/255 * 255 = 0.5 rounds to 0; 1.5 rounds to 2.
        assert_eq!(to_u8(0.5 / 255.0), 0);
        assert_eq!(to_u8(1.5 / 255.0), 2);
        assert_eq!(to_u8(2.0), 255);
        assert_eq!(to_u8(-1.0), 0);
    }

    #[test]
    fn nan_decode_is_a_typed_error() -> Result<()> {
        let t = Tensor::full(f32::NAN, (1, 3, 2, 2), &Device::Cpu)?;
        assert!(matches!(
            RgbImage::from_decoded(&t),
            Err(Error::NonFinite { .. })
        ));
        Ok(())
    }

    #[test]
    fn wrong_buffer_size_is_rejected() {
        assert!(RgbImage::new(2, 2, vec![0; 11]).is_err());
    }
}
