//! A whole SDXL model (base or refiner) loaded from a diffusers folder or a single-file
//! checkpoint, each component kept in memory or read from its checkpoint when it is used.

use std::borrow::Cow;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::loading::memory::release_free_memory;
use crate::loading::single_file::{self, defaults, SingleFile, SingleFileHints};
use crate::loading::{component_weight_files, read_json, ModelIndex, Weights};
use crate::lora::{LoraComponent, PendingLoras};
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
    /// When the text encoders are in memory (default [`Residency::Resident`]). On demand they
    /// are read when prompts are encoded and dropped before denoising.
    pub text_encoders: Residency,
    /// When the UNet is in memory (default [`Residency::Resident`]). On demand it is read when
    /// a denoising loop starts and dropped when the loop ends.
    pub unet: Residency,
    /// When the VAE is in memory (default [`Residency::Resident`]). On demand it is read for
    /// each encode or decode.
    pub vae: Residency,
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
            text_encoders: Residency::Resident,
            unet: Residency::Resident,
            vae: Residency::Resident,
        }
    }
}

impl LoadOptions {
    /// These options with every component [`Residency::OnDemand`]: a generation holds one
    /// component at a time (the text encoders, then the UNet, then the VAE), so its peak memory
    /// is the UNet's weights and activations rather than the whole model's. Each generation
    /// reads the weights again (from the page cache when memory allows).
    #[must_use]
    pub fn low_memory(self) -> Self {
        Self {
            text_encoders: Residency::OnDemand,
            unet: Residency::OnDemand,
            vae: Residency::OnDemand,
            ..self
        }
    }
}

/// When a component's weights are in memory.
///
/// Results do not depend on it: a component read on demand computes exactly what the resident
/// one does, bit for bit, with the same LoRAs merged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Residency {
    /// Read when the model loads and kept until it is dropped: fastest when generating several
    /// times, but every resident component is in memory all the time.
    #[default]
    Resident,
    /// Read from the memory-mapped checkpoint each time the component is used and dropped right
    /// after, so it holds no memory between uses. [`SdxlModel::load`] still reads it once, so
    /// that a broken checkpoint fails at load; each use then costs a read of its weights (and a
    /// merge of the model's LoRAs into them).
    OnDemand,
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
#[derive(Debug, Clone)]
pub struct TextStack {
    /// CLIP ViT-L tokenizer and encoder (absent in the refiner).
    pub encoder_1: Option<(ClipTokenizer, ClipTextModel)>,
    /// OpenCLIP ViT-bigG tokenizer and encoder with projection.
    pub encoder_2: (ClipTokenizer, ClipTextModel),
}

/// Every component of an SDXL base or refiner.
///
/// The text encoders, the UNet and the VAE are reached through [`text`](Self::text),
/// [`unet`](Self::unet) and [`vae`](Self::vae) as a [`Loaded`]: borrowed when they are
/// resident, read from the checkpoint for the caller when they are loaded on demand (see
/// [`Residency`]).
pub struct SdxlModel {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Base or refiner.
    pub kind: ModelKind,
    /// The pipeline flags of `model_index.json`.
    pub index: ModelIndex,
    /// Tokenizers and text encoders.
    text: Held<TextStack, TextSources>,
    /// The denoiser.
    unet: Held<UNet2DConditionModel, (Weights, UNetConfig)>,
    /// The autoencoder.
    vae: Held<AutoencoderKL, (Weights, VaeConfig)>,
    /// The LoRAs merged into the components that are loaded on demand.
    pub(crate) loras: PendingLoras,
    /// The model's own scheduler config.
    pub scheduler_config: SchedulerConfig,
    /// The options it was loaded with. Changing `device`, `dtype` or the residencies after
    /// loading changes nothing; `vae_tiling` is read at every encode and decode.
    pub options: LoadOptions,
}

/// A component in memory, or what it is built from at each use.
enum Held<T, S> {
    Resident(T),
    OnDemand(S),
}

impl<T: Clone, S> Held<T, S> {
    /// `source` built now when `residency` keeps it, kept as it is otherwise.
    fn new(residency: Residency, source: S, build: impl FnOnce(&S) -> Result<T>) -> Result<Self> {
        Ok(match residency {
            Residency::Resident => Self::Resident(build(&source)?),
            Residency::OnDemand => Self::OnDemand(source),
        })
    }

    /// The resident component, or one built from the source now.
    fn get(&self, build: impl FnOnce(&S) -> Result<T>) -> Result<Loaded<'_, T>> {
        Ok(match self {
            Self::Resident(t) => Loaded {
                value: Cow::Borrowed(t),
                _release: None,
            },
            Self::OnDemand(source) => Loaded {
                value: Cow::Owned(build(source)?),
                _release: Some(ReleaseOnDrop),
            },
        })
    }
}

/// A component of an [`SdxlModel`] for one use: borrowed from the model when it is resident,
/// or read from the checkpoint for this use when it is loaded on demand. Dropping a component
/// read on demand frees its weights and hands the freed memory back to the system (the
/// allocator would otherwise keep it for the process).
pub struct Loaded<'a, T: Clone> {
    // Fields drop in order: the weights, then the release of their memory.
    value: Cow<'a, T>,
    _release: Option<ReleaseOnDrop>,
}

/// Returns the memory freed so far to the system when dropped.
struct ReleaseOnDrop;

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release_free_memory();
    }
}

impl<'a, T: Clone> Loaded<'a, T> {
    /// The model's own component when it is resident; `None` when it was read for this use.
    pub fn resident(&self) -> Option<&'a T> {
        match self.value {
            Cow::Borrowed(t) => Some(t),
            Cow::Owned(_) => None,
        }
    }

    /// The component to edit: a copy of a resident one (its tensors are shared until they are
    /// replaced), or the one read for this use.
    pub fn to_mut(&mut self) -> &mut T {
        self.value.to_mut()
    }
}

impl<T: Clone> Deref for Loaded<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: Clone + std::fmt::Debug> std::fmt::Debug for Loaded<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("resident", &self.resident().is_some())
            .field("component", &*self.value)
            .finish()
    }
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
            text: TextSources {
                encoder_1: if index.has_text_encoder() {
                    Some(text_encoder("text_encoder", "tokenizer")?)
                } else {
                    None
                },
                encoder_2: text_encoder("text_encoder_2", "tokenizer_2")?,
            },
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
            text: TextSources {
                encoder_1: match arch.text_encoder {
                    Some(config) => Some(TextComponent {
                        tokenizer: defaults::tokenizer()?,
                        weights: w.pp(single_file::TEXT_ENCODER),
                        config,
                    }),
                    None => None,
                },
                encoder_2: TextComponent {
                    tokenizer: defaults::tokenizer_2()?,
                    weights: w.pp(single_file::TEXT_ENCODER_2),
                    config: arch.text_encoder_2,
                },
            },
            unet: (w.pp(single_file::UNET), arch.unet),
            vae: (w.pp(single_file::VAE), arch.vae),
            scheduler_config: defaults::scheduler_config()?,
        };
        let index = defaults::model_index(arch.kind)?;
        Self::assemble(path, arch.kind, index, components, options)
    }

    /// Builds every model from its weights and config, whatever layout they came from.
    ///
    /// Components loaded on demand are built once here, one at a time and before the resident
    /// ones, so that a broken checkpoint fails at load without two components ever sharing
    /// memory.
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
                (w, cfg)
            }
            None => {
                let (vae_w, vae_cfg) = parts.vae;
                (vae_w.with_dtype(vae_dtype(&vae_cfg)), vae_cfg)
            }
        };
        let (text, unet) = (parts.text, parts.unet);
        let on_demand = |r: Residency| r == Residency::OnDemand;
        if on_demand(options.vae) {
            check(&vae, build_vae)?;
        }
        if on_demand(options.text_encoders) {
            check(&text, build_text)?;
        }
        if on_demand(options.unet) {
            check(&unet, build_unet)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            kind,
            index,
            vae: Held::new(options.vae, vae, build_vae)?,
            text: Held::new(options.text_encoders, text, build_text)?,
            unet: Held::new(options.unet, unet, build_unet)?,
            loras: PendingLoras::default(),
            scheduler_config: parts.scheduler_config,
            options: options.clone(),
        })
    }

    /// The tokenizers and text encoders, with the model's LoRAs merged: borrowed when resident,
    /// read now (and dropped with the returned value) when loaded on demand.
    ///
    /// # Errors
    /// On demand: read errors of the checkpoint, tensor failures while merging LoRAs.
    pub fn text(&self) -> Result<Loaded<'_, TextStack>> {
        self.text.get(|source| {
            let mut text = build_text(source)?;
            self.loras.merge_into_text(&mut text)?;
            Ok(text)
        })
    }

    /// The UNet, with the model's LoRAs merged: borrowed when resident, read now (and dropped
    /// with the returned value) when loaded on demand.
    ///
    /// # Errors
    /// On demand: read errors of the checkpoint, tensor failures while merging LoRAs.
    pub fn unet(&self) -> Result<Loaded<'_, UNet2DConditionModel>> {
        self.unet.get(|source| {
            let mut unet = build_unet(source)?;
            self.loras.merge_into_unet(&mut unet)?;
            Ok(unet)
        })
    }

    /// The VAE: borrowed when resident, read now (and dropped with the returned value) when
    /// loaded on demand.
    ///
    /// # Errors
    /// On demand: read errors of the checkpoint.
    pub fn vae(&self) -> Result<Loaded<'_, AutoencoderKL>> {
        self.vae.get(build_vae)
    }

    /// The UNet's config, whether or not the UNet is in memory.
    pub fn unet_config(&self) -> &UNetConfig {
        match &self.unet {
            Held::Resident(unet) => unet.config(),
            Held::OnDemand((_, config)) => config,
        }
    }

    /// The VAE's config, whether or not the VAE is in memory.
    pub fn vae_config(&self) -> &VaeConfig {
        match &self.vae {
            Held::Resident(vae) => vae.config(),
            Held::OnDemand((_, config)) => config,
        }
    }

    /// Whether the layers a LoRA `component` targets are resident (edited in place by a merge)
    /// rather than read on demand (merged each time they are read).
    pub(crate) fn is_resident(&self, component: LoraComponent) -> bool {
        match component {
            LoraComponent::Unet => matches!(self.unet, Held::Resident(_)),
            LoraComponent::TextEncoder | LoraComponent::TextEncoder2 => {
                matches!(self.text, Held::Resident(_))
            }
        }
    }

    /// The resident UNet, to edit in place; `None` when it is loaded on demand.
    pub(crate) fn resident_unet_mut(&mut self) -> Option<&mut UNet2DConditionModel> {
        match &mut self.unet {
            Held::Resident(unet) => Some(unet),
            Held::OnDemand(_) => None,
        }
    }

    /// The resident text encoders, to edit in place; `None` when they are loaded on demand.
    pub(crate) fn resident_text_mut(&mut self) -> Option<&mut TextStack> {
        match &mut self.text {
            Held::Resident(text) => Some(text),
            Held::OnDemand(_) => None,
        }
    }

    /// The UNet as stored: borrowed when resident, read without the model's LoRAs when loaded
    /// on demand (for its layer names and shapes).
    pub(crate) fn unmerged_unet(&self) -> Result<Loaded<'_, UNet2DConditionModel>> {
        self.unet.get(build_unet)
    }

    /// The text encoders as stored: see [`Self::unmerged_unet`].
    pub(crate) fn unmerged_text(&self) -> Result<Loaded<'_, TextStack>> {
        self.text.get(build_text)
    }
}

/// Builds a component to check its checkpoint, then drops it and releases its memory.
fn check<S, T>(source: &S, build: impl FnOnce(&S) -> Result<T>) -> Result<()> {
    drop(build(source)?);
    release_free_memory();
    Ok(())
}

fn build_text(t: &TextSources) -> Result<TextStack> {
    let encoder = |t: &TextComponent| -> Result<(ClipTokenizer, ClipTextModel)> {
        Ok((
            t.tokenizer.clone(),
            ClipTextModel::new(&t.weights, &t.config)?,
        ))
    };
    Ok(TextStack {
        encoder_1: t.encoder_1.as_ref().map(encoder).transpose()?,
        encoder_2: encoder(&t.encoder_2)?,
    })
}

fn build_unet((weights, config): &(Weights, UNetConfig)) -> Result<UNet2DConditionModel> {
    UNet2DConditionModel::new(weights, config)
}

fn build_vae((weights, config): &(Weights, VaeConfig)) -> Result<AutoencoderKL> {
    AutoencoderKL::new(weights, config)
}

/// The stem of diffusers' UNet and VAE weight files.
const DIFFUSERS_STEM: &str = "diffusion_pytorch_model";

/// A tokenizer with its text encoder's config and weights.
struct TextComponent {
    tokenizer: ClipTokenizer,
    config: ClipTextConfig,
    weights: Weights,
}

/// What the text encoders are built from.
struct TextSources {
    encoder_1: Option<TextComponent>,
    encoder_2: TextComponent,
}

/// Where each component comes from: a diffusers folder or a single file.
struct Components {
    text: TextSources,
    unet: (Weights, UNetConfig),
    vae: (Weights, VaeConfig),
    scheduler_config: SchedulerConfig,
}
