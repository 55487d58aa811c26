//! Single-file SDXL checkpoints in Stability's original ("SGM") layout, such as
//! `sd_xl_base_1.0.safetensors` and `sd_xl_refiner_1.0.safetensors`.
//!
//! One `.safetensors` file holds the UNet (`model.diffusion_model.*`, `input_blocks` /
//! `middle_block` / `output_blocks`), the VAE (`first_stage_model.*`, attention stored as 1×1
//! convolutions) and the text encoders (`conditioner.embedders.0.transformer.text_model.*` for
//! CLIP ViT-L in the base; `conditioner.embedders.{1|0}.model.*` for OpenCLIP ViT-bigG with fused
//! `in_proj_weight`, bare `positional_embedding` and a transposed `text_projection`), in f16,
//! bf16 or f32. [`SingleFile::open`] infers the architecture from the tensors (base, refiner or a
//! 9-channel inpainting UNet; channels, layers, transformer depths, widths: see
//! [`detect`]) and serves the weights under diffusers' names through a
//! [`TensorSource`] adapter ([`keymap::SgmSource`]), so the model
//! constructors load it unchanged. What the file does not carry (tokenizers, scheduler config,
//! pipeline flags, head counts, group-norm groups) comes from [`defaults`] or
//! [`SingleFileHints`].
//!
//! PyTorch pickles (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused: unpickling can run arbitrary
//! code.
//!
//! ```no_run
//! use sdxl_core::pipeline::{LoadOptions, SdxlModel};
//!
//! let model = SdxlModel::load("sd_xl_base_1.0.safetensors".as_ref(), &LoadOptions::default())?;
//! # Ok::<(), sdxl_core::Error>(())
//! ```

pub mod defaults;
pub mod detect;
pub mod keymap;

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};

use self::keymap::SgmSource;
use crate::error::{Error, Result};
use crate::loading::{SafetensorsFiles, TensorSource, Weights};
use crate::pipeline::ModelKind;
use crate::text::clip::ClipTextConfig;
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;

pub use keymap::{TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE};

/// File extensions of PyTorch pickle checkpoints, which are never loaded.
const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// Architecture values that no tensor shape reveals. `None` takes the documented rule of
/// [`defaults`], which gives the real SDXL values (64-wide heads, 32 groups) for real
/// checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SingleFileHints {
    /// Attention heads of each UNet level (diffusers' `attention_head_dim`, which despite its
    /// name holds head counts).
    pub unet_attention_heads: Option<Vec<usize>>,
    /// Groups of the UNet's group norms.
    pub unet_norm_num_groups: Option<usize>,
    /// Groups of the VAE's group norms.
    pub vae_norm_num_groups: Option<usize>,
    /// Attention heads of CLIP ViT-L (the base's first text encoder).
    pub text_encoder_heads: Option<usize>,
    /// Attention heads of OpenCLIP ViT-bigG.
    pub text_encoder_2_heads: Option<usize>,
}

/// The configs inferred from a single file, as a diffusers folder would hold them.
#[derive(Debug, Clone, PartialEq)]
pub struct SingleFileArchitecture {
    /// Base (CLIP ViT-L and bigG, 6 time ids) or refiner (bigG only, 5 time ids).
    pub kind: ModelKind,
    /// The UNet's config (`in_channels` 9 for an inpainting UNet).
    pub unet: UNetConfig,
    /// The VAE's config.
    pub vae: VaeConfig,
    /// CLIP ViT-L's config; `None` for the refiner.
    pub text_encoder: Option<ClipTextConfig>,
    /// OpenCLIP ViT-bigG's config (with projection).
    pub text_encoder_2: ClipTextConfig,
}

/// An opened single-file checkpoint: its inferred architecture and its weights under diffusers
/// names.
#[derive(Debug, Clone)]
pub struct SingleFile {
    source: Arc<SgmSource>,
    architecture: SingleFileArchitecture,
}

impl SingleFile {
    /// Memory-maps `path` and infers the architecture; `hints` supplies what the tensors do not
    /// tell (see [`SingleFileHints`]).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a PyTorch pickle (by extension or content) or a file that is
    /// not an SDXL base or refiner; [`Error::NotFound`]; [`Error::InvalidCheckpoint`] for a
    /// truncated file, a header that does not match the data, or misshapen tensors;
    /// [`Error::MissingTensor`] for tensors the inference needs.
    pub fn open(path: &Path, hints: &SingleFileHints) -> Result<Self> {
        refuse_pickle_extension(path)?;
        let file = SafetensorsFiles::open(&[path.to_path_buf()]).map_err(|e| match e {
            Error::InvalidCheckpoint { .. } if looks_like_pickle(path) => pickle_error(path),
            other => other,
        })?;
        let keys = file.keys();
        let (kind, counts) = detect::layout_counts(&keys, path)?;
        let source = Arc::new(SgmSource::new(file, counts)?);
        let root = Weights::new(source.clone(), DType::F32, &Device::Cpu);
        let architecture = detect::architecture(&root, path, kind, counts, hints)?;
        Ok(Self {
            source,
            architecture,
        })
    }

    /// The inferred configs.
    pub fn architecture(&self) -> &SingleFileArchitecture {
        &self.architecture
    }

    /// Base or refiner.
    pub fn kind(&self) -> ModelKind {
        self.architecture.kind
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        self.source.path()
    }

    /// The adapter serving the file under diffusers names (see [`keymap`]).
    pub fn source(&self) -> &Arc<SgmSource> {
        &self.source
    }

    /// The weights at the root of the diffusers key tree, read as `dtype` on `device`: each
    /// component is one level below ([`UNET`], [`VAE`], [`TEXT_ENCODER`], [`TEXT_ENCODER_2`]).
    pub fn weights(&self, dtype: DType, device: &Device) -> Weights {
        let source: Arc<dyn TensorSource> = self.source.clone();
        Weights::new(source, dtype, device)
    }
}

fn refuse_pickle_extension(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext {
        Some(e) if PICKLE_EXTENSIONS.contains(&e.as_str()) => Err(pickle_error(path)),
        _ => Ok(()),
    }
}

/// Whether the file starts like a PyTorch checkpoint: a zip archive (`torch.save` since 1.6) or
/// a pickle stream (protocol 2–5) whose ninth byte is not the `{` of a safetensors header.
fn looks_like_pickle(path: &Path) -> bool {
    let mut head = [0u8; 9];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head));
    if read.is_err() {
        return false;
    }
    let zip = head.starts_with(b"PK\x03\x04");
    let pickle = head[0] == 0x80 && (2..=5).contains(&head[1]) && head[8] != b'{';
    zip || pickle
}

fn pickle_error(path: &Path) -> Error {
    Error::unsupported(format!(
        "{} is a PyTorch pickle checkpoint; it is never loaded, because unpickling can run \
         arbitrary code. Convert a file you trust to safetensors first, e.g. in Python: \
         `sd = torch.load(path, map_location=\"cpu\", weights_only=True); \
         safetensors.torch.save_file(sd.get(\"state_dict\", sd), \"model.safetensors\")`, \
         or download the model's `.safetensors` release",
        path.display()
    ))
}
