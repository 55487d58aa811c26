//! Reading LoRA files: [`LoraWeights`] groups a file's tensors into [`LoraModule`]s (down and up
//! projections, alpha and scaling), in the kohya or the diffusers/PEFT key layout.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::metadata::PeftConfigs;
use crate::error::{Error, Result};
use crate::loading::{SafetensorsFiles, TensorSource};

/// Largest safetensors header read for its metadata (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The model part a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraComponent {
    /// The UNet (`unet.` / `lora_unet_`).
    Unet,
    /// CLIP ViT-L, the base model's first text encoder (`text_encoder.` / `lora_te1_`).
    TextEncoder,
    /// OpenCLIP ViT-bigG, the second text encoder (`text_encoder_2.` / `lora_te2_`).
    TextEncoder2,
}

impl LoraComponent {
    /// Every component.
    pub const ALL: [Self; 3] = [Self::Unet, Self::TextEncoder, Self::TextEncoder2];

    /// The diffusers name, used as key prefix in diffusers/PEFT files: `unet`, `text_encoder`,
    /// `text_encoder_2`.
    pub fn diffusers_name(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The kohya (sd-scripts) key prefix: `lora_unet_`, `lora_te1_`, `lora_te2_`.
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Self::Unet => "lora_unet_",
            Self::TextEncoder => "lora_te1_",
            Self::TextEncoder2 => "lora_te2_",
        }
    }
}

impl fmt::Display for LoraComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.diffusers_name())
    }
}

/// The key layout of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraFormat {
    /// kohya / sd-scripts: `lora_unet_<sgm_name>.lora_down.weight`, `.lora_up.weight` and
    /// `.alpha`; module names are the original (single-file) names with `.` replaced by `_`.
    Kohya,
    /// diffusers / PEFT: `unet.<module>.lora_A.weight` and `.lora_B.weight`; rank and alpha in
    /// the header metadata `lora_adapter_metadata`.
    Diffusers,
}

impl LoraFormat {
    /// The key suffixes of the down (A) and up (B) projections.
    fn suffixes(self) -> [&'static str; 2] {
        match self {
            Self::Kohya => [".lora_down.weight", ".lora_up.weight"],
            Self::Diffusers => [".lora_A.weight", ".lora_B.weight"],
        }
    }
}

/// One low-rank update `ΔW = scaling · up @ down` of one model layer.
#[derive(Debug, Clone)]
pub struct LoraModule {
    name: String,
    format: LoraFormat,
    component: LoraComponent,
    down: Tensor,
    up: Tensor,
    alpha: f64,
    scaling: f64,
}

impl LoraModule {
    /// The module's name in the file, without the tensor suffix (e.g.
    /// `lora_unet_input_blocks_4_1_proj_in` or `unet.down_blocks.1.attentions.0.proj_in`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key layout the module was read from.
    pub fn format(&self) -> LoraFormat {
        self.format
    }

    /// The component the module targets.
    pub fn component(&self) -> LoraComponent {
        self.component
    }

    /// The module path inside its component as written in the file: dotted for diffusers files
    /// (`down_blocks.1.attentions.0.proj_in`), underscored for kohya files
    /// (`input_blocks_4_1_proj_in`).
    pub fn path(&self) -> &str {
        let prefix_len = match self.format {
            LoraFormat::Kohya => self.component.kohya_prefix().len(),
            LoraFormat::Diffusers => self.component.diffusers_name().len() + 1,
        };
        self.name.get(prefix_len..).unwrap_or_default()
    }

    /// The down projection (`lora_down` / `lora_A`), `[rank, in]` or `[rank, in, kh, kw]`.
    pub fn down(&self) -> &Tensor {
        &self.down
    }

    /// The up projection (`lora_up` / `lora_B`), `[out, rank]` or `[out, rank, 1, 1]`.
    pub fn up(&self) -> &Tensor {
        &self.up
    }

    /// The rank (rows of the down projection).
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// The module's alpha.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The factor the product `up @ down` is multiplied by at scale 1: `alpha / rank`
    /// (`alpha / sqrt(rank)` for rsLoRA).
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// The key of the down (`down == true`) or up projection tensor in the file.
    pub(crate) fn tensor_key(&self, down: bool) -> String {
        let [d, u] = self.format.suffixes();
        format!("{}{}", self.name, if down { d } else { u })
    }
}

/// A LoRA file read into memory: its modules and the keys it holds that are not part of any
/// module this crate understands.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    source: PathBuf,
    format: LoraFormat,
    modules: Vec<LoraModule>,
    unrecognized: Vec<String>,
}

/// The role of a tensor in a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// The tensors of one module, as grouped from the keys.
#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<Tensor>,
}

impl LoraWeights {
    /// Reads a LoRA `.safetensors` file (kohya or diffusers/PEFT keys) into CPU memory, in the
    /// stored dtype.
    ///
    /// # Errors
    /// [`Error::NotFound`] / [`Error::Io`] for the file, and those of
    /// [`LoraWeights::from_tensors`].
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound {
                path: path.to_path_buf(),
                what: "LoRA file".into(),
            });
        }
        let metadata = read_header_metadata(path)?;
        let file = SafetensorsFiles::open(&[path.to_path_buf()])?;
        let tensors = file
            .keys()
            .into_iter()
            .map(|k| {
                let t = file.load(&k, &Device::Cpu)?;
                Ok((k, t))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Self::from_tensors(path, tensors, &metadata)
    }

    /// Groups named tensors into modules. `source` names the LoRA in errors; `metadata` is the
    /// safetensors header metadata (only `lora_adapter_metadata` is read).
    ///
    /// A key belongs to a module when it is `<module>.lora_down.weight`, `.lora_up.weight` or
    /// `.alpha` with a kohya prefix (`lora_unet_`, `lora_te1_`, `lora_te2_`), or
    /// `<module>.lora_A.weight`, `.lora_B.weight` or `.alpha` with a diffusers prefix (`unet.`,
    /// `text_encoder.`, `text_encoder_2.`). Other keys are kept as
    /// [`unrecognized_keys`](Self::unrecognized_keys); merging refuses them unless told to skip
    /// them.
    ///
    /// Scaling: kohya modules use their `alpha` tensor (alpha = rank when absent); diffusers
    /// modules use the metadata's `r`/`lora_alpha` (with `rank_pattern`, `alpha_pattern` and
    /// `use_rslora`), else an `alpha` tensor, else alpha = rank.
    ///
    /// # Errors
    /// [`Error::InvalidCheckpoint`] (naming `source`) for a module without its down or up
    /// projection, a rank of 0, an alpha that is not one number, a rank that contradicts the
    /// metadata, a file mixing both layouts, or one without any module;
    /// [`Error::Unsupported`] for DoRA or other non-LoRA PEFT adapters.
    pub fn from_tensors(
        source: impl AsRef<Path>,
        tensors: HashMap<String, Tensor>,
        metadata: &HashMap<String, String>,
    ) -> Result<Self> {
        let source = source.as_ref().to_path_buf();
        let bad = |reason: String| Error::InvalidCheckpoint {
            path: source.clone(),
            reason,
        };
        let configs = PeftConfigs::from_metadata(metadata, &source)?;
        let mut groups: BTreeMap<(LoraFormat, LoraComponent, String), Parts> = BTreeMap::new();
        let mut unrecognized = Vec::new();
        for (key, tensor) in tensors {
            match classify(&key) {
                Some((format, component, stem, part)) => {
                    let parts = groups
                        .entry((format, component, stem.to_string()))
                        .or_default();
                    let slot = match part {
                        Part::Down => &mut parts.down,
                        Part::Up => &mut parts.up,
                        Part::Alpha => &mut parts.alpha,
                    };
                    *slot = Some(tensor);
                }
                None => unrecognized.push(key),
            }
        }
        unrecognized.sort();
        let mut format = None;
        let mut modules = Vec::with_capacity(groups.len());
        for ((f, component, name), parts) in groups {
            if format.is_some_and(|seen| seen != f) {
                return Err(bad(
                    "the file mixes kohya (lora_down/lora_up) and diffusers (lora_A/lora_B) keys"
                        .into(),
                ));
            }
            format = Some(f);
            let [down_suffix, up_suffix] = f.suffixes();
            let (down, up) = match (parts.down, parts.up) {
                (Some(d), Some(u)) => (d, u),
                (None, _) => return Err(bad(format!("`{name}{down_suffix}` is missing"))),
                (_, None) => return Err(bad(format!("`{name}{up_suffix}` is missing"))),
            };
            let rank = down.dims().first().copied().unwrap_or(0);
            if rank == 0 || down.rank() < 2 {
                return Err(bad(format!(
                    "`{name}{down_suffix}` has shape {:?}; expected [rank >= 1, in, ...]",
                    down.dims()
                )));
            }
            let alpha_tensor = match parts.alpha {
                Some(t) => Some(
                    scalar(&t).ok_or_else(|| bad(format!("`{name}.alpha` is not one number")))?,
                ),
                None => None,
            };
            let (alpha, scaling) = match (f, configs.get(component)) {
                (LoraFormat::Diffusers, Some(config)) => {
                    let path = name.get(component.diffusers_name().len() + 1..);
                    let path = path.unwrap_or_default();
                    if let Some(r) = config.rank(path) {
                        if r != rank {
                            return Err(bad(format!(
                                "the metadata gives `{name}` rank {r}, its tensors have rank \
                                 {rank}"
                            )));
                        }
                    }
                    let alpha = config.alpha(path).or(alpha_tensor).unwrap_or(rank as f64);
                    (alpha, config.scaling(alpha, rank))
                }
                _ => {
                    let alpha = alpha_tensor.unwrap_or(rank as f64);
                    (alpha, alpha / rank as f64)
                }
            };
            modules.push(LoraModule {
                name,
                format: f,
                component,
                down,
                up,
                alpha,
                scaling,
            });
        }
        let Some(format) = format else {
            let first: Vec<&str> = unrecognized.iter().take(5).map(String::as_str).collect();
            return Err(bad(format!(
                "no LoRA module in the kohya (lora_down/lora_up) or diffusers (lora_A/lora_B) \
                 layout; first keys: {}",
                first.join(", ")
            )));
        };
        Ok(Self {
            source,
            format,
            modules,
            unrecognized,
        })
    }

    /// Where the LoRA was read from (or the name it was given).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The key layout of the file.
    pub fn format(&self) -> LoraFormat {
        self.format
    }

    /// The modules, sorted by name.
    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    /// Keys that belong to no module (other adapter types such as LoHa/LoKr, DoRA scales, LoRA
    /// biases, SD 1.x text-encoder prefixes), sorted.
    pub fn unrecognized_keys(&self) -> &[String] {
        &self.unrecognized
    }
}

/// Splits a key into (format, component, module name, part), or `None` when it fits neither
/// layout.
fn classify(key: &str) -> Option<(LoraFormat, LoraComponent, &str, Part)> {
    let (stem, part, format) = [
        (".lora_down.weight", Part::Down, Some(LoraFormat::Kohya)),
        (".lora_up.weight", Part::Up, Some(LoraFormat::Kohya)),
        (".lora_A.weight", Part::Down, Some(LoraFormat::Diffusers)),
        (".lora_B.weight", Part::Up, Some(LoraFormat::Diffusers)),
        (".alpha", Part::Alpha, None),
    ]
    .into_iter()
    .find_map(|(suffix, part, format)| Some((key.strip_suffix(suffix)?, part, format)))?;
    let kohya = LoraComponent::ALL
        .into_iter()
        .find(|c| stem.starts_with(c.kohya_prefix()) && stem.len() > c.kohya_prefix().len());
    let diffusers = LoraComponent::ALL.into_iter().find(|c| {
        stem.strip_prefix(c.diffusers_name())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| !rest.is_empty())
    });
    match (kohya, diffusers, format) {
        (Some(c), _, Some(LoraFormat::Kohya) | None) => Some((LoraFormat::Kohya, c, stem, part)),
        (_, Some(c), Some(LoraFormat::Diffusers) | None) => {
            Some((LoraFormat::Diffusers, c, stem, part))
        }
        _ => None,
    }
}

/// The value of a one-element tensor.
fn scalar(t: &Tensor) -> Option<f64> {
    if t.elem_count() != 1 {
        return None;
    }
    let v = t
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .ok()?;
    v.first().copied().filter(|a| a.is_finite())
}

/// The `__metadata__` map of a safetensors header (empty when absent).
fn read_header_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: String| Error::InvalidCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(bad(format!("header of {len} bytes is too large")));
    }
    let mut header = Vec::new();
    file.take(len).read_to_end(&mut header).map_err(io)?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(header
        .get("__metadata__")
        .and_then(serde_json::Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t(shape: &[usize]) -> Tensor {
        Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn classifies_both_layouts() {
        let k = classify("lora_unet_input_blocks_4_1_proj_in.lora_down.weight").unwrap();
        assert_eq!(
            k,
            (
                LoraFormat::Kohya,
                LoraComponent::Unet,
                "lora_unet_input_blocks_4_1_proj_in",
                Part::Down
            )
        );
        let k = classify("text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora_B.weight");
        assert_eq!(
            k.map(|k| (k.0, k.1, k.3)),
            Some((LoraFormat::Diffusers, LoraComponent::TextEncoder2, Part::Up))
        );
        assert_eq!(
            classify("lora_te1_text_model_x.alpha").map(|k| k.0),
            Some(LoraFormat::Kohya)
        );
        assert!(classify("lora_te_text_model_x.lora_down.weight").is_none());
        assert!(classify("unet.x.lora_down.weight").is_none());
        assert!(classify("lora_unet_x.hada_w1_a").is_none());
        assert!(classify("unet.x.lora_B.bias").is_none());
    }

    #[test]
    fn kohya_alpha_sets_the_scaling() {
        let tensors = HashMap::from([
            ("lora_unet_a.lora_down.weight".to_string(), t(&[4, 8])),
            ("lora_unet_a.lora_up.weight".to_string(), t(&[8, 4])),
            (
                "lora_unet_a.alpha".to_string(),
                Tensor::new(2f32, &Device::Cpu).unwrap(),
            ),
            ("lora_unet_b.lora_down.weight".to_string(), t(&[2, 8])),
            ("lora_unet_b.lora_up.weight".to_string(), t(&[8, 2])),
            ("lora_unet_b.dora_scale".to_string(), t(&[1, 8])),
        ]);
        let l = LoraWeights::from_tensors("x", tensors, &HashMap::new()).unwrap();
        assert_eq!(l.format(), LoraFormat::Kohya);
        let m = l.modules();
        assert_eq!((m[0].path(), m[0].rank(), m[0].scaling()), ("a", 4, 0.5));
        assert_eq!((m[1].alpha(), m[1].scaling()), (2.0, 1.0));
        assert_eq!(l.unrecognized_keys(), ["lora_unet_b.dora_scale"]);
    }

    #[test]
    fn malformed_files_are_errors() {
        let half = HashMap::from([("unet.a.lora_A.weight".to_string(), t(&[4, 8]))]);
        assert!(matches!(
            LoraWeights::from_tensors("x", half, &HashMap::new()),
            Err(Error::InvalidCheckpoint { .. })
        ));
        let mixed = HashMap::from([
            ("unet.a.lora_A.weight".to_string(), t(&[4, 8])),
            ("unet.a.lora_B.weight".to_string(), t(&[8, 4])),
            ("lora_unet_a.lora_down.weight".to_string(), t(&[4, 8])),
            ("lora_unet_a.lora_up.weight".to_string(), t(&[8, 4])),
        ]);
        assert!(LoraWeights::from_tensors("x", mixed, &HashMap::new()).is_err());
        let none = HashMap::from([("foo".to_string(), t(&[4]))]);
        assert!(LoraWeights::from_tensors("x", none, &HashMap::new()).is_err());
        let meta = HashMap::from([(
            "lora_adapter_metadata".to_string(),
            r#"{"unet.r": 8, "unet.lora_alpha": 8}"#.to_string(),
        )]);
        let wrong_rank = HashMap::from([
            ("unet.a.lora_A.weight".to_string(), t(&[4, 8])),
            ("unet.a.lora_B.weight".to_string(), t(&[8, 4])),
        ]);
        assert!(LoraWeights::from_tensors("x", wrong_rank, &meta).is_err());
    }
}
