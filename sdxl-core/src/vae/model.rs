//! `AutoencoderKL`: the encoder and decoder with their 1×1 quantisation convolutions, input
//! validation and loading from a diffusers `vae/` folder.

use std::path::Path;

use crate::kernels::parallel::on_pool;
use crate::layers::Conv2d;
use candle_core::{DType, Device, Module, Tensor};

use super::config::VaeConfig;
use super::decoder::Decoder;
use super::distribution::DiagonalGaussian;
use super::encoder::Encoder;
use crate::error::{Error, Result};
use crate::layers::conv2d;
use crate::loading::{component_weight_files, read_json, Weights};

/// File stem of the VAE weights in a diffusers folder.
const WEIGHTS_STEM: &str = "diffusion_pytorch_model";

/// The SDXL VAE: images in `[-1, 1]` ↔ raw latents.
///
/// Neither [`encode`](Self::encode) nor [`decode`](Self::decode) applies
/// [`scaling_factor`](Self::scaling_factor): pipelines multiply encoded latents by it and divide
/// latents by it before decoding.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dtype: DType,
    device: Device,
}

impl AutoencoderKL {
    /// Builds the VAE from `w` positioned at the VAE's root (keys `encoder.*`, `decoder.*`,
    /// `quant_conv.*`, `post_quant_conv.*`), in `w`'s dtype and on its device.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a config this crate does not implement (see
    /// [`VaeConfig::validate`]); [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the
    /// full key of a wrong checkpoint.
    pub fn new(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let latent = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv2d(
                2 * latent,
                2 * latent,
                1,
                1,
                0,
                &w.pp("quant_conv"),
            )?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv2d(latent, latent, 1, 1, 0, &w.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::new(&w.pp("encoder"), cfg)?,
            decoder: Decoder::new(&w.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    /// Loads a diffusers `vae/` folder: `config.json` and `diffusion_pytorch_model[.variant]
    /// .safetensors` (or its shards), converted to `dtype` on `device`.
    ///
    /// # Errors
    /// [`Error::NotFound`] / [`Error::Json`] for the config, the errors of
    /// [`component_weight_files`] for the weights, and those of [`AutoencoderKL::new`].
    pub fn load(dir: &Path, dtype: DType, device: &Device, variant: Option<&str>) -> Result<Self> {
        let cfg: VaeConfig = read_json(&dir.join("config.json"), "VAE config")?;
        let files = component_weight_files(dir, WEIGHTS_STEM, variant)?;
        let w = Weights::from_safetensors(&files, dtype, device)?;
        Self::new(&w, &cfg)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// `scaling_factor` from the config (0.13025 for SDXL).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Whether the config asks to run the VAE in float32 in half-precision pipelines.
    pub fn force_upcast(&self) -> bool {
        self.config.force_upcast
    }

    /// The dtype of the weights; inputs must have it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights; inputs must be on it.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The raw moments `quant_conv(encoder(x))` `[B, 2*latent_channels, H/f, W/f]`, before the
    /// log-variance clamp (`f` = [`VaeConfig::downscale_factor`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] unless `x` is `[B, in_channels, H, W]` with `H` and `W` positive
    /// multiples of `f`, in the model's dtype and on its device.
    pub fn encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.config.downscale_factor();
        self.check_input("VAE encode input", x, self.config.in_channels, f)?;
        on_pool(|| {
            let h = self.encoder.forward(x)?;
            match &self.quant_conv {
                Some(q) => Ok(q.forward(&h)?),
                None => Ok(h),
            }
        })
    }

    /// Encodes images `x` `[B, in_channels, H, W]` in `[-1, 1]` into the latent posterior.
    ///
    /// # Errors
    /// As [`encode_moments`](Self::encode_moments).
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        DiagonalGaussian::from_moments(&self.encode_moments(x)?)
    }

    /// The first step of [`decode`](Self::decode): `post_quant_conv(z)`, or `z` itself when the
    /// config has no such convolution.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] unless `z` is `[B, latent_channels, h, w]` in the model's dtype
    /// and on its device.
    pub fn post_quant_conv(&self, z: &Tensor) -> Result<Tensor> {
        self.check_input("VAE decode input", z, self.config.latent_channels, 1)?;
        match &self.post_quant_conv {
            Some(p) => Ok(p.forward(z)?),
            None => Ok(z.clone()),
        }
    }

    /// Decodes RAW latents `z` `[B, latent_channels, h, w]` (already divided by the scaling
    /// factor) into images `[B, out_channels, h*f, w*f]`, roughly in `[-1, 1]` and unclamped.
    ///
    /// The output is not checked for NaN; that is the caller's decision.
    ///
    /// # Errors
    /// As [`post_quant_conv`](Self::post_quant_conv).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        on_pool(|| self.decoder.forward(&self.post_quant_conv(z)?))
    }

    /// Checks rank, channels, spatial divisibility, dtype and device of an input.
    fn check_input(&self, what: &str, x: &Tensor, channels: usize, multiple: usize) -> Result<()> {
        let (_, c, h, w) = match x.dims() {
            &[b, c, h, w] => (b, c, h, w),
            dims => {
                return Err(Error::invalid(format!(
                    "{what} must be [B, {channels}, H, W], got {dims:?}"
                )))
            }
        };
        if c != channels {
            return Err(Error::invalid(format!(
                "{what} has {c} channels, the VAE expects {channels} (shape {:?})",
                x.dims()
            )));
        }
        if h == 0 || w == 0 || h % multiple != 0 || w % multiple != 0 {
            return Err(Error::invalid(format!(
                "{what} is {h}x{w}; height and width must be positive multiples of {multiple}"
            )));
        }
        if x.dtype() != self.dtype {
            return Err(Error::invalid(format!(
                "{what} has dtype {:?}, the VAE weights are {:?}; convert it first",
                x.dtype(),
                self.dtype
            )));
        }
        if !x.device().same_device(&self.device) {
            return Err(Error::invalid(format!(
                "{what} is on {:?}, the VAE on {:?}",
                x.device().location(),
                self.device.location()
            )));
        }
        Ok(())
    }
}
