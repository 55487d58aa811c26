//! The diffusers folder layout: `model_index.json` and one subfolder per component.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::json::read_json;
use crate::error::{Error, Result};

/// The parts of `model_index.json` this crate uses. Unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    /// The pipeline class, e.g. `StableDiffusionXLPipeline` or `StableDiffusionXLImg2ImgPipeline`.
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// When true, an absent negative prompt gives all-zero negative embeddings.
    #[serde(default)]
    pub force_zeros_for_empty_prompt: bool,
    /// True for the refiner, whose time ids carry an aesthetic score instead of a target size.
    #[serde(default)]
    pub requires_aesthetics_score: bool,
    /// `[library, class]` per component, `[null, null]` for an absent one.
    #[serde(default)]
    pub text_encoder: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of the second text encoder.
    #[serde(default)]
    pub text_encoder_2: Option<(Option<String>, Option<String>)>,
}

impl ModelIndex {
    /// Reads `<dir>/model_index.json`.
    ///
    /// # Errors
    /// [`Error::NotFound`] when `dir` is not a diffusers folder, [`Error::Json`] when the file
    /// cannot be parsed.
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                what: "diffusers model folder".into(),
            });
        }
        read_json(
            &dir.join("model_index.json"),
            "model_index.json of a diffusers folder",
        )
    }

    /// Whether the pipeline has a first text encoder (the refiner has none).
    pub fn has_text_encoder(&self) -> bool {
        matches!(&self.text_encoder, Some((Some(_), Some(_))))
    }
}

/// Finds the weight files of one component folder (`unet/`, `vae/`, `text_encoder/`, …).
///
/// `stem` is `diffusion_pytorch_model` for UNet and VAE and `model` for text encoders. With a
/// `variant` (e.g. `fp16`), `<stem>.<variant>.safetensors` (or its sharded index) is required;
/// without one, the plain file is preferred and a single variant file is accepted when it is the
/// only one present. Sharded checkpoints are read through `<file>.safetensors.index.json`.
///
/// # Errors
/// [`Error::NotFound`] listing what was looked for; [`Error::Unsupported`] for pickle-only
/// folders (`.bin`, `.ckpt`), which are never unpickled.
pub fn component_weight_files(
    dir: &Path,
    stem: &str,
    variant: Option<&str>,
) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::NotFound {
            path: dir.to_path_buf(),
            what: "model component folder".into(),
        });
    }
    let names: Vec<String> = match variant {
        Some(v) => vec![format!("{stem}.{v}.safetensors")],
        None => vec![format!("{stem}.safetensors")],
    };
    for name in &names {
        let single = dir.join(name);
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{name}.index.json"));
        if index.is_file() {
            return sharded_files(&index);
        }
    }
    if variant.is_none() {
        // Only a variant present (e.g. a folder downloaded with variant="fp16"): accept it when
        // it is unambiguous.
        let mut found = list_variant_files(dir, stem)?;
        if found.len() == 1 {
            let f = found.remove(0);
            return if f.to_string_lossy().ends_with(".index.json") {
                sharded_files(&f)
            } else {
                Ok(vec![f])
            };
        }
    }
    let pickle = ["bin", "ckpt", "pt", "pth"]
        .iter()
        .any(|ext| dir.join(format!("{stem}.{ext}")).is_file());
    if pickle {
        return Err(Error::unsupported(format!(
            "{} holds only PyTorch pickle weights ({stem}.bin/.ckpt); they are never unpickled \
             because loading a pickle can run arbitrary code. Convert them to safetensors, e.g. \
             with diffusers: `pipe.save_pretrained(dir, safe_serialization=True)`",
            dir.display()
        )));
    }
    Err(Error::NotFound {
        path: dir.join(&names[0]),
        what: format!("weights of component `{}`", dir.display()),
    })
}

fn list_variant_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_variant = name.starts_with(&format!("{stem}."))
            && (name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json"))
            && name != format!("{stem}.safetensors");
        if is_variant {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

fn sharded_files(index: &Path) -> Result<Vec<PathBuf>> {
    let parsed: ShardIndex = read_json(index, "sharded safetensors index")?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}
