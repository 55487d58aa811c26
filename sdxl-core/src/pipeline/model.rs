//! A whole SDXL model (base or refiner) loaded from a diffusers folder or a single-file
//! checkpoint.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::loading::single_file::{self, defaults, SingleFile, SingleFileHints};
use crate::loading::{component_weight_files, read_json, ModelIndex, Weights};
use crate::schedulers::SchedulerConfig;
use crate::text::clip::{ClipTextConfig, ClipTextModel};
use crate::text::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, TilingOptions, VaeConfig};

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

/// Whether a model is the SDXL base (text-to-image) or the refiner.
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
    /// `tokenizer*/`, `scheduler/`) or a single-file `.safetensors` checkpoint in the original
    /// SDXL layout (see [`SdxlModel::load_single_file`], with the default hints). Weights are
    /// memory-mapped while loading.
    ///
    /// # Errors
    /// [`Error::NotFound`] for a missing folder or component, format errors naming the file or
    /// tensor, [`Error::Unsupported`] for a pipeline class that is not SDXL or a PyTorch pickle
    /// file.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Self> {
        if path.is_file() {
            return Self::load_single_file(path, options, &SingleFileHints::default());
        }
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
        let folder = |name: &str, stem: &str| -> Result<Weights> {
            let files = component_weight_files(&path.join(name), stem, variant)?;
            Weights::from_safetensors(&files, dtype, device)
        };
        let text_encoder = |name: &str, tokenizer: &str| -> Result<TextComponent> {
            let dir = path.join(name);
            if !dir.is_dir() {
                return Err(Error::NotFound {
                    path: dir,
                    what: "CLIP text encoder folder".into(),
                });
            }
            Ok(TextComponent {
                tokenizer: ClipTokenizer::from_dir(&path.join(tokenizer))?,
                config: read_json(&dir.join("config.json"), "CLIP text encoder config")?,
                weights: folder(name, "model")?,
            })
        };
        let components = Components {
            text_encoder: if index.has_text_encoder() {
                Some(text_encoder("text_encoder", "tokenizer")?)
            } else {
                None
            },
            text_encoder_2: text_encoder("text_encoder_2", "tokenizer_2")?,
            unet: {
                let config = UNetConfig::load(&path.join("unet"))?;
                (folder("unet", DIFFUSERS_STEM)?, config)
            },
            vae: {
                let config = read_json(&path.join("vae").join("config.json"), "VAE config")?;
                (folder("vae", DIFFUSERS_STEM)?, config)
            },
            scheduler_config: SchedulerConfig::from_file(
                &path.join("scheduler").join("scheduler_config.json"),
            )?,
        };
        Self::assemble(path, kind, index, components, options)
    }

    /// Loads a single-file checkpoint in Stability's original layout (`sd_xl_base_1.0`,
    /// `sd_xl_refiner_1.0` and their fine-tunes): the architecture is inferred from the tensors,
    /// with `hints` for the values no shape reveals; tokenizers, scheduler config and pipeline
    /// flags are the SDXL defaults shipped with the library (see
    /// [`crate::loading::single_file`]). `options.variant` does not apply.
    ///
    /// # Errors
    /// The errors of [`SingleFile::open`] (pickles, truncated files, files that are not SDXL),
    /// and missing or misshapen tensors naming their diffusers key.
    pub fn load_single_file(
        path: &Path,
        options: &LoadOptions,
        hints: &SingleFileHints,
    ) -> Result<Self> {
        let file = SingleFile::open(path, hints)?;
        let arch = file.architecture().clone();
        let w = file.weights(options.dtype, &options.device);
        let components = Components {
            text_encoder: match arch.text_encoder {
                Some(config) => Some(TextComponent {
                    tokenizer: defaults::tokenizer()?,
                    weights: w.pp(single_file::TEXT_ENCODER),
                    config,
                }),
                None => None,
            },
            text_encoder_2: TextComponent {
                tokenizer: defaults::tokenizer_2()?,
                weights: w.pp(single_file::TEXT_ENCODER_2),
                config: arch.text_encoder_2,
            },
            unet: (w.pp(single_file::UNET), arch.unet),
            vae: (w.pp(single_file::VAE), arch.vae),
            scheduler_config: defaults::scheduler_config()?,
        };
        let index = defaults::model_index(arch.kind)?;
        Self::assemble(path, arch.kind, index, components, options)
    }

    /// Builds every model from its weights and config, whatever layout they came from.
    fn assemble(
        path: &Path,
        kind: ModelKind,
        index: ModelIndex,
        parts: Components,
        options: &LoadOptions,
    ) -> Result<Self> {
        // diffusers' rule: the SDXL VAE overflows in f16, so `force_upcast` keeps it in f32.
        let vae_dtype = |cfg: &VaeConfig| {
            options
                .vae_dtype
                .unwrap_or(if options.dtype == DType::F16 && cfg.force_upcast {
                    DType::F32
                } else {
                    options.dtype
                })
        };
        // The VAE first: a wrong `vae_path` fails before the large components are read.
        let vae = match &options.vae_path {
            Some(dir) => {
                let cfg: VaeConfig = read_json(&dir.join("config.json"), "VAE config")?;
                let files = component_weight_files(dir, DIFFUSERS_STEM, None)?;
                let w = Weights::from_safetensors(&files, vae_dtype(&cfg), &options.device)?;
                AutoencoderKL::new(&w, &cfg)?
            }
            None => {
                let (vae_w, vae_cfg) = parts.vae;
                AutoencoderKL::new(&vae_w.with_dtype(vae_dtype(&vae_cfg)), &vae_cfg)?
            }
        };
        let encoder = |t: TextComponent| -> Result<(ClipTokenizer, ClipTextModel)> {
            Ok((t.tokenizer, ClipTextModel::new(&t.weights, &t.config)?))
        };
        let encoder_1 = parts.text_encoder.map(encoder).transpose()?;
        let encoder_2 = encoder(parts.text_encoder_2)?;
        let (unet_w, unet_cfg) = parts.unet;
        let unet = UNet2DConditionModel::new(&unet_w, &unet_cfg)?;
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
            scheduler_config: parts.scheduler_config,
            options: options.clone(),
        })
    }
}

/// The stem of diffusers' UNet and VAE weight files.
const DIFFUSERS_STEM: &str = "diffusion_pytorch_model";

/// A tokenizer with its text encoder's config and weights.
struct TextComponent {
    tokenizer: ClipTokenizer,
    config: ClipTextConfig,
    weights: Weights,
}

/// Where each component comes from: a diffusers folder or a single file.
struct Components {
    text_encoder: Option<TextComponent>,
    text_encoder_2: TextComponent,
    unet: (Weights, UNetConfig),
    vae: (Weights, VaeConfig),
    scheduler_config: SchedulerConfig,
}
