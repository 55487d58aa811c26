//! The rank and alpha of diffusers/PEFT LoRA files, read from the safetensors header
//! (`__metadata__["lora_adapter_metadata"]`: PEFT's `LoraConfig.to_dict()` per component, each
//! key prefixed by the component, e.g. `"unet.r": 4`, `"unet.lora_alpha": 2.0`).

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::file::LoraComponent;
use crate::error::{Error, Result};

/// The header metadata key diffusers writes the adapter configs under.
pub(crate) const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

/// Characters that make a PEFT pattern key a regular expression rather than a module name.
const REGEX_CHARS: &[char] = &[
    '*', '+', '?', '(', ')', '[', ']', '{', '}', '|', '^', '$', '\\',
];

/// The parts of one component's `LoraConfig` that decide a module's scaling.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PeftConfig {
    /// `r`.
    r: Option<usize>,
    /// `lora_alpha`.
    lora_alpha: Option<f64>,
    /// `rank_pattern`: per-module ranks, by module name or name suffix.
    rank_pattern: Vec<(String, usize)>,
    /// `alpha_pattern`: per-module alphas, by module name or name suffix.
    alpha_pattern: Vec<(String, f64)>,
    /// `use_rslora`: scaling `alpha / sqrt(r)` instead of `alpha / r`.
    use_rslora: bool,
}

/// The configs of every component a file's metadata describes.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeftConfigs(HashMap<LoraComponent, PeftConfig>);

impl PeftConfigs {
    /// Reads `lora_adapter_metadata` from a file's header metadata; empty when absent.
    ///
    /// # Errors
    /// [`Error::InvalidCheckpoint`] for metadata that is not a JSON object or has values of the
    /// wrong type; [`Error::Unsupported`] for DoRA adapters, other PEFT types and regular
    /// expressions in `rank_pattern` / `alpha_pattern`.
    pub(crate) fn from_metadata(metadata: &HashMap<String, String>, path: &Path) -> Result<Self> {
        let Some(text) = metadata.get(ADAPTER_METADATA_KEY) else {
            return Ok(Self::default());
        };
        let bad = |reason: String| Error::InvalidCheckpoint {
            path: path.to_path_buf(),
            reason: format!("header metadata `{ADAPTER_METADATA_KEY}`: {reason}"),
        };
        let json: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let object = json
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let mut configs = HashMap::new();
        for component in LoraComponent::ALL {
            let prefix = format!("{}.", component.diffusers_name());
            let fields: Map<String, Value> = object
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v.clone())))
                .collect();
            if !fields.is_empty() {
                let config = PeftConfig::from_fields(&fields, &prefix).map_err(|e| match e {
                    Error::InvalidArgument(reason) => bad(reason),
                    other => other,
                })?;
                configs.insert(component, config);
            }
        }
        Ok(Self(configs))
    }

    /// The config of `component`, when the metadata has one.
    pub(crate) fn get(&self, component: LoraComponent) -> Option<&PeftConfig> {
        self.0.get(&component)
    }
}

impl PeftConfig {
    /// Reads the fields of one component (keys without the component prefix).
    ///
    /// Errors are [`Error::InvalidArgument`] (rewritten by the caller to name the file) or
    /// [`Error::Unsupported`].
    fn from_fields(fields: &Map<String, Value>, prefix: &str) -> Result<Self> {
        let present = |key: &str| fields.get(key).filter(|v| !v.is_null());
        let wrong = |key: &str, what: &str| {
            let found = present(key).map(Value::to_string).unwrap_or_default();
            Error::invalid(format!("`{prefix}{key}` must be {what}, got {found}"))
        };
        if let Some(t) = present("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(Error::unsupported(format!(
                    "`{prefix}peft_type` is {t}; only LoRA adapters can be merged"
                )));
            }
        }
        if present("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(Error::unsupported(format!(
                "`{prefix}use_dora` is set: DoRA adapters cannot be merged as plain LoRAs"
            )));
        }
        let r = match present("r") {
            Some(v) => Some(as_rank(v).ok_or_else(|| wrong("r", "a positive integer"))?),
            None => None,
        };
        let lora_alpha = match present("lora_alpha") {
            Some(v) => Some(v.as_f64().ok_or_else(|| wrong("lora_alpha", "a number"))?),
            None => None,
        };
        let use_rslora = match present("use_rslora") {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| wrong("use_rslora", "a boolean"))?,
            None => false,
        };
        let rank_pattern = patterns(present("rank_pattern"), prefix, "rank_pattern", as_rank)?;
        let alpha_pattern = patterns(present("alpha_pattern"), prefix, "alpha_pattern", |v| {
            v.as_f64()
        })?;
        Ok(Self {
            r,
            lora_alpha,
            rank_pattern,
            alpha_pattern,
            use_rslora,
        })
    }

    /// The rank the config gives `module` (`rank_pattern`, else `r`).
    pub(crate) fn rank(&self, module: &str) -> Option<usize> {
        find_pattern(&self.rank_pattern, module).or(self.r)
    }

    /// The alpha the config gives `module` (`alpha_pattern`, else `lora_alpha`).
    pub(crate) fn alpha(&self, module: &str) -> Option<f64> {
        find_pattern(&self.alpha_pattern, module).or(self.lora_alpha)
    }

    /// PEFT's scaling for `alpha` and `rank`: `alpha / rank`, or `alpha / sqrt(rank)` with
    /// rsLoRA.
    pub(crate) fn scaling(&self, alpha: f64, rank: usize) -> f64 {
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

fn as_rank(v: &Value) -> Option<usize> {
    v.as_u64()
        .filter(|&r| r > 0)
        .and_then(|r| usize::try_from(r).ok())
}

/// Reads a `{pattern: value}` map; keys must be module names (PEFT matches them as regular
/// expressions against the end of the module name; plain names behave the same).
fn patterns<T>(
    value: Option<&Value>,
    prefix: &str,
    field: &str,
    read: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<(String, T)>> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let map = value
        .as_object()
        .ok_or_else(|| Error::invalid(format!("`{prefix}{field}` must be an object")))?;
    map.iter()
        .map(|(key, v)| {
            if key.contains(REGEX_CHARS) {
                return Err(Error::unsupported(format!(
                    "`{prefix}{field}` key `{key}` is a regular expression; only module names \
                     are supported"
                )));
            }
            let v = read(v).ok_or_else(|| {
                Error::invalid(format!("`{prefix}{field}[{key}]` has an invalid value {v}"))
            })?;
            Ok((key.clone(), v))
        })
        .collect()
}

/// PEFT's `get_pattern_key`: the first pattern equal to `module` or to a dotted suffix of it.
fn find_pattern<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(p, _)| {
            module == p
                || module
                    .strip_suffix(p.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn configs(json: &str) -> Result<PeftConfigs> {
        let meta = HashMap::from([(ADAPTER_METADATA_KEY.to_string(), json.to_string())]);
        PeftConfigs::from_metadata(&meta, Path::new("x.safetensors"))
    }

    #[test]
    fn reads_rank_alpha_and_patterns_per_component() {
        let c = configs(
            r#"{"unet.r": 4, "unet.lora_alpha": 2.0, "unet.rank_pattern": {"attn1.to_q": 8},
                "unet.alpha_pattern": {"down_blocks.1.proj_in": 3}, "text_encoder_2.r": 2,
                "text_encoder_2.lora_alpha": 2, "text_encoder_2.use_rslora": true}"#,
        )
        .unwrap();
        let unet = c.get(LoraComponent::Unet).unwrap();
        assert_eq!(unet.rank("down_blocks.1.attentions.0.proj_in"), Some(4));
        assert_eq!(unet.rank("x.transformer_blocks.0.attn1.to_q"), Some(8));
        // A pattern matches whole dotted components only.
        assert_eq!(unet.rank("x.transformer_blocks.0.xattn1.to_q"), Some(4));
        assert_eq!(unet.alpha("down_blocks.1.proj_in"), Some(3.0));
        assert_eq!(unet.alpha("down_blocks.2.proj_in"), Some(2.0));
        assert_eq!(unet.scaling(2.0, 4), 0.5);
        let te2 = c.get(LoraComponent::TextEncoder2).unwrap();
        assert_eq!(te2.scaling(2.0, 4), 1.0);
        assert!(c.get(LoraComponent::TextEncoder).is_none());
    }

    #[test]
    fn rejects_dora_regex_patterns_and_bad_values() {
        assert!(matches!(
            configs(r#"{"unet.use_dora": true}"#),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            configs(r#"{"unet.rank_pattern": {"attn.*": 8}}"#),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            configs(r#"{"unet.r": "four"}"#),
            Err(Error::InvalidCheckpoint { .. })
        ));
        assert!(matches!(
            configs("[1, 2]"),
            Err(Error::InvalidCheckpoint { .. })
        ));
    }

    #[test]
    fn no_metadata_means_no_configs() {
        let c = PeftConfigs::from_metadata(&HashMap::new(), Path::new("x")).unwrap();
        assert!(c.get(LoraComponent::Unet).is_none());
    }
}
