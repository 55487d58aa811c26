//! A whole SDXL model (base or refiner) loaded from a diffusers folder.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::loading::ModelIndex;
use crate::schedulers::SchedulerConfig;
use crate::text::clip::ClipTextModel;
use crate::text::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::{AutoencoderKL, TilingOptions};

/// How to load a model: where to run, in which precision, and which VAE to use how.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The device the components run on.
    pub device: Device,
    /// The dtype of the text encoders and the UNet.
    pub dtype: DType,
    /// The dtype of the VAE; `None` follows diffusers: `dtype`, except f32 when `dtype` is f16
    /// and the VAE config sets `force_upcast` (the SDXL VAE overflows in f16).
    pub vae_dtype: Option<DType>,
    /// A weights variant such as `fp16` (`*.fp16.safetensors`); `None` takes the plain files.
    pub variant: Option<String>,
    /// A diffusers VAE folder (`config.json` and `diffusion_pytorch_model.safetensors`) to load
    /// instead of the model's own `vae/`, e.g. an fp16-fix SDXL VAE, whose config clears
    /// `force_upcast` so that it runs in f16. It is read without `variant`: the plain weights
    /// file, or the only variant file present.
    pub vae_path: Option<PathBuf>,
    /// How the VAE tiles large images (default: [`TilingMode::Auto`](crate::vae::TilingMode)).
    pub vae_tiling: TilingOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            vae_dtype: None,
            variant: None,
            vae_path: None,
            vae_tiling: TilingOptions::default(),
        }
    }
}

/// Whether a folder holds the SDXL base (text-to-image) or the refiner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Two text encoders, 6 time ids (sizes and crop).
    Base,
    /// Text encoder 2 only, 5 time ids (sizes, crop and an aesthetic score).
    Refiner,
}

/// The text side of a model: tokenizer and encoder pairs.
pub struct TextStack {
    /// CLIP ViT-L tokenizer and encoder (absent in the refiner).
    pub encoder_1: Option<(ClipTokenizer, ClipTextModel)>,
    /// OpenCLIP ViT-bigG tokenizer and encoder with projection.
    pub encoder_2: (ClipTokenizer, ClipTextModel),
}

/// Every component of an SDXL base or refiner.
pub struct SdxlModel {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Base or refiner.
    pub kind: ModelKind,
    /// The pipeline flags of `model_index.json`.
    pub index: ModelIndex,
    /// Tokenizers and text encoders.
    pub text: TextStack,
    /// The denoiser.
    pub unet: UNet2DConditionModel,
    /// The autoencoder.
    pub vae: AutoencoderKL,
    /// The model's own scheduler config.
    pub scheduler_config: SchedulerConfig,
    /// The options it was loaded with.
    pub options: LoadOptions,
}

impl std::fmt::Debug for SdxlModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdxlModel")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl SdxlModel {
    /// Loads a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder*/`,
    /// `tokenizer*/`, `scheduler/`). Weights are memory-mapped while loading.
    ///
    /// # Errors
    /// [`Error::NotFound`] for a missing folder or component, format errors naming the file or
    /// tensor, [`Error::Unsupported`] for a pipeline class that is not SDXL.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Self> {
        let index = ModelIndex::read(path)?;
        let kind = match index.class_name.as_str() {
            "StableDiffusionXLPipeline" | "StableDiffusionXLImg2ImgPipeline"
                if !index.requires_aesthetics_score =>
            {
                ModelKind::Base
            }
            "StableDiffusionXLImg2ImgPipeline" => ModelKind::Refiner,
            other => {
                return Err(Error::unsupported(format!(
                    "{}: pipeline class `{other}` is not an SDXL base or refiner",
                    path.display()
                )))
            }
        };
        let (device, dtype) = (&options.device, options.dtype);
        let variant = options.variant.as_deref();
        // The VAE first: a wrong `vae_path` fails before the large components load.
        let (vae_dir, vae_variant) = match &options.vae_path {
            Some(dir) => (dir.clone(), None),
            None => (path.join("vae"), variant),
        };
        let vae_dtype = match options.vae_dtype {
            Some(d) => d,
            None => {
                let cfg: crate::vae::VaeConfig =
                    crate::loading::read_json(&vae_dir.join("config.json"), "VAE config")?;
                if dtype == DType::F16 && cfg.force_upcast {
                    DType::F32
                } else {
                    dtype
                }
            }
        };
        let vae = AutoencoderKL::load(&vae_dir, vae_dtype, device, vae_variant)?;
        let encoder_1 = if index.has_text_encoder() {
            Some((
                ClipTokenizer::from_dir(&path.join("tokenizer"))?,
                ClipTextModel::load(&path.join("text_encoder"), dtype, device, variant)?,
            ))
        } else {
            None
        };
        let encoder_2 = (
            ClipTokenizer::from_dir(&path.join("tokenizer_2"))?,
            ClipTextModel::load(&path.join("text_encoder_2"), dtype, device, variant)?,
        );
        let unet = UNet2DConditionModel::load(&path.join("unet"), dtype, device, variant)?;
        let scheduler_config =
            SchedulerConfig::from_file(&path.join("scheduler").join("scheduler_config.json"))?;
        Ok(Self {
            path: path.to_path_buf(),
            kind,
            index,
            text: TextStack {
                encoder_1,
                encoder_2,
            },
            unet,
            vae,
            scheduler_config,
            options: options.clone(),
        })
    }
}
