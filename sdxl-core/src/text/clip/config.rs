//! The CLIP text encoder's `config.json`, field for field as transformers' `CLIPTextConfig`.

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::kernels::activation;

/// The architecture name transformers gives the encoder with a text projection.
const WITH_PROJECTION_ARCHITECTURE: &str = "CLIPTextModelWithProjection";

/// A CLIP text encoder's `config.json` (transformers' `CLIPTextConfig`).
///
/// Absent fields take transformers' defaults (those of `openai/clip-vit-base-patch32`); unknown
/// fields (`transformers_version`, `dtype`, …) are ignored. The presets
/// [`ClipTextConfig::sdxl_text_encoder`] and [`ClipTextConfig::sdxl_text_encoder_2`] give the
/// real SDXL sizes for checkpoints that come without a config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// The model classes the checkpoint was saved from, e.g. `["CLIPTextModelWithProjection"]`.
    pub architectures: Vec<String>,
    /// `clip_text_model` for these files.
    pub model_type: String,
    /// Number of token embeddings.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of each MLP's hidden layer.
    pub intermediate_size: usize,
    /// Width of `text_projection`'s output (`text_embeds`).
    pub projection_dim: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Number of position embeddings: the longest accepted token sequence.
    pub max_position_embeddings: usize,
    /// The MLP activation: `quick_gelu`, `gelu` (exact, erf-based), `gelu_new` or
    /// `gelu_pytorch_tanh` (tanh approximation), `relu`, `silu` or `swish`.
    pub hidden_act: String,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
    /// Dropout on attention probabilities (training only; unused here).
    pub attention_dropout: f64,
    /// Weight initialisation range (training only; unused here).
    pub initializer_range: f64,
    /// Weight initialisation factor (training only; unused here).
    pub initializer_factor: f64,
    /// Padding token id.
    pub pad_token_id: i64,
    /// Beginning-of-text token id.
    pub bos_token_id: i64,
    /// End-of-text token id. The legacy value 2 (real SDXL configs) selects pooling at the
    /// largest token id instead of the first `eos_token_id`.
    pub eos_token_id: i64,
}

impl Default for ClipTextConfig {
    /// transformers' `CLIPTextConfig()` defaults.
    fn default() -> Self {
        Self {
            architectures: Vec::new(),
            model_type: "clip_text_model".into(),
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            initializer_range: 0.02,
            initializer_factor: 1.0,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
        }
    }
}

impl ClipTextConfig {
    /// SDXL's first text encoder (OpenAI CLIP ViT-L/14's text tower, `CLIPTextModel`), as in the
    /// real `text_encoder/config.json`.
    pub fn sdxl_text_encoder() -> Self {
        Self {
            architectures: vec!["CLIPTextModel".into()],
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            hidden_act: "quick_gelu".into(),
            bos_token_id: 0,
            eos_token_id: 2,
            ..Self::default()
        }
    }

    /// SDXL's second text encoder (OpenCLIP ViT-bigG/14's text tower,
    /// `CLIPTextModelWithProjection`), as in the real `text_encoder_2/config.json`. The refiner
    /// uses the same encoder.
    pub fn sdxl_text_encoder_2() -> Self {
        Self {
            architectures: vec![WITH_PROJECTION_ARCHITECTURE.into()],
            hidden_size: 1280,
            intermediate_size: 5120,
            projection_dim: 1280,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: "gelu".into(),
            bos_token_id: 0,
            eos_token_id: 2,
            ..Self::default()
        }
    }

    /// Whether `architectures` names the model class: `Some(true)` for
    /// `CLIPTextModelWithProjection`, `Some(false)` for any other class, `None` when the config
    /// names none.
    pub fn declares_projection(&self) -> Option<bool> {
        if self.architectures.is_empty() {
            None
        } else {
            Some(
                self.architectures
                    .iter()
                    .any(|a| a == WITH_PROJECTION_ARCHITECTURE),
            )
        }
    }

    /// Width of one attention head.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when `num_attention_heads` is zero or does not divide
    /// `hidden_size`.
    pub fn head_dim(&self) -> Result<usize> {
        let heads = self.num_attention_heads;
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) {
            return Err(Error::unsupported(format!(
                "CLIP text config: {heads} attention heads do not divide hidden_size {}",
                self.hidden_size
            )));
        }
        Ok(self.hidden_size / heads)
    }

    /// Checks the sizes the model relies on.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming the field for an unknown `hidden_act`, heads that do not
    /// divide `hidden_size`, no encoder layer (SDXL needs the penultimate hidden state) or no
    /// position embedding.
    pub fn validate(&self) -> Result<()> {
        Activation::parse(&self.hidden_act)?;
        self.head_dim()?;
        if self.num_hidden_layers == 0 {
            return Err(Error::unsupported(
                "CLIP text config: num_hidden_layers is 0, so there is no penultimate hidden state",
            ));
        }
        if self.max_position_embeddings == 0 || self.vocab_size == 0 {
            return Err(Error::unsupported(format!(
                "CLIP text config: max_position_embeddings {} and vocab_size {} must be positive",
                self.max_position_embeddings, self.vocab_size
            )));
        }
        Ok(())
    }
}

/// The MLP activations transformers' `ACT2FN` maps the supported `hidden_act` names to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// The exact, erf-based GELU (OpenCLIP).
    Gelu,
    /// The tanh approximation of GELU.
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
    /// `x · sigmoid(x)`.
    Silu,
}

impl Activation {
    /// Maps a `hidden_act` value to its activation.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming the value.
    pub(crate) fn parse(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(Error::unsupported(format!(
                "CLIP text config: hidden_act `{other}` (supported: quick_gelu, gelu, gelu_new, \
                 gelu_pytorch_tanh, relu, silu, swish)"
            ))),
        }
    }

    /// Applies the activation elementwise.
    ///
    /// # Errors
    /// Tensor failures.
    pub(crate) fn forward(self, x: &Tensor) -> Result<Tensor> {
        if activation::supports(x) {
            // One vectorised, multi-threaded pass on the CPU.
            match self {
                Self::QuickGelu => return Ok(activation::quick_gelu(x)?),
                Self::Gelu => return Ok(activation::gelu_erf(x)?),
                _ => {}
            }
        }
        Ok(match self {
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Self::Gelu => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
            Self::Relu => x.relu()?,
            Self::Silu => x.silu()?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn empty_json_gives_transformers_defaults() {
        let cfg: ClipTextConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, ClipTextConfig::default());
        assert_eq!(cfg.eos_token_id, 49407);
        assert_eq!(cfg.hidden_act, "quick_gelu");
        assert_eq!(cfg.declares_projection(), None);
        cfg.validate().unwrap();
    }

    #[test]
    fn presets_are_valid_and_declare_their_class() {
        let te1 = ClipTextConfig::sdxl_text_encoder();
        let te2 = ClipTextConfig::sdxl_text_encoder_2();
        te1.validate().unwrap();
        te2.validate().unwrap();
        assert_eq!(te1.declares_projection(), Some(false));
        assert_eq!(te2.declares_projection(), Some(true));
        assert_eq!(te2.head_dim().unwrap(), 64);
    }

    #[test]
    fn unknown_activation_is_unsupported() {
        let cfg = ClipTextConfig {
            hidden_act: "gelu_10".into(),
            ..ClipTextConfig::default()
        };
        assert!(matches!(cfg.validate(), Err(Error::Unsupported(m)) if m.contains("gelu_10")));
    }

    #[test]
    fn inconsistent_sizes_are_unsupported() {
        let heads = ClipTextConfig {
            num_attention_heads: 7,
            ..ClipTextConfig::default()
        };
        assert!(matches!(heads.validate(), Err(Error::Unsupported(_))));
        let layers = ClipTextConfig {
            num_hidden_layers: 0,
            ..ClipTextConfig::default()
        };
        assert!(matches!(layers.validate(), Err(Error::Unsupported(_))));
    }
}
