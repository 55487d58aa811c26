//! `VaeConfig`: the serde mirror of an `AutoencoderKL` `config.json`.

use serde::Deserialize;

use crate::error::{Error, Result};

/// The only encoder block type `AutoencoderKL` uses.
pub const DOWN_ENCODER_BLOCK: &str = "DownEncoderBlock2D";
/// The only decoder block type `AutoencoderKL` uses.
pub const UP_DECODER_BLOCK: &str = "UpDecoderBlock2D";

/// `sample_size` is an integer in most configs and a `[h, w]` pair in some.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// A square size in pixels.
    Square(usize),
    /// A `[height, width]` pair in pixels.
    Rect(Vec<usize>),
}

/// diffusers' `AutoencoderKL` configuration, field for field, with diffusers' defaults.
///
/// The real SDXL VAE has `block_out_channels` (128, 256, 512, 512), four `DownEncoderBlock2D`
/// and four `UpDecoderBlock2D`, `layers_per_block` 2, `norm_num_groups` 32, `latent_channels` 4,
/// `scaling_factor` 0.13025 and `force_upcast` true.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    /// Channels of the images the encoder takes.
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    /// Channels of the images the decoder produces.
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    /// Encoder blocks, one per entry of `block_out_channels`.
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    /// Decoder blocks, one per entry of `block_out_channels`.
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level, highest resolution first.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    /// Activation of every block (`silu`; `swish` is the same function).
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Channels of the latent space.
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Groups of every group norm.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// Training image size (only used by diffusers' tiling heuristics).
    #[serde(default = "default_sample_size")]
    pub sample_size: SampleSize,
    /// Latents are `scaling_factor * z` in the diffusion model's space.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Latent shift applied by some pipelines before scaling (`null` for SDXL).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent means (`null` for SDXL).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviations (`null` for SDXL).
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Whether the VAE must run in float32 even when the rest of the pipeline runs in half
    /// precision (true for the original SDXL VAE, whose activations overflow float16).
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// Whether the encoder output goes through the 1×1 `quant_conv`.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether the decoder input goes through the 1×1 `post_quant_conv`.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the encoder and decoder mid blocks have a self-attention layer.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_image_channels() -> usize {
    3
}
fn default_down_block_types() -> Vec<String> {
    vec![DOWN_ENCODER_BLOCK.to_string()]
}
fn default_up_block_types() -> Vec<String> {
    vec![UP_DECODER_BLOCK.to_string()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_sample_size() -> SampleSize {
    SampleSize::Square(32)
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl Default for VaeConfig {
    /// diffusers' `AutoencoderKL()` defaults (a one-level VAE, not SDXL's).
    fn default() -> Self {
        Self {
            in_channels: default_image_channels(),
            out_channels: default_image_channels(),
            down_block_types: default_down_block_types(),
            up_block_types: default_up_block_types(),
            block_out_channels: default_block_out_channels(),
            layers_per_block: default_layers_per_block(),
            act_fn: default_act_fn(),
            latent_channels: default_latent_channels(),
            norm_num_groups: default_norm_num_groups(),
            sample_size: default_sample_size(),
            scaling_factor: default_scaling_factor(),
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// The factor between image and latent sizes, `2^(levels - 1)` (8 for SDXL).
    pub fn downscale_factor(&self) -> usize {
        1usize << self.block_out_channels.len().saturating_sub(1)
    }

    /// Checks that the config describes a VAE this crate implements.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for block types other than `DownEncoderBlock2D` /
    /// `UpDecoderBlock2D`, an activation other than `silu`, block lists whose lengths differ from
    /// `block_out_channels`, or zero-sized channel or layer counts.
    pub fn validate(&self) -> Result<()> {
        let levels = self.block_out_channels.len();
        if levels == 0 || self.block_out_channels.contains(&0) {
            return Err(Error::unsupported(format!(
                "VAE block_out_channels {:?} must be non-empty and positive",
                self.block_out_channels
            )));
        }
        if self.layers_per_block == 0
            || self.in_channels == 0
            || self.out_channels == 0
            || self.latent_channels == 0
        {
            return Err(Error::unsupported(
                "VAE layers_per_block, in_channels, out_channels and latent_channels must be \
                 positive",
            ));
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return Err(Error::unsupported(format!(
                "VAE act_fn `{}` (only `silu` is implemented)",
                self.act_fn
            )));
        }
        check_block_types(
            "down_block_types",
            &self.down_block_types,
            DOWN_ENCODER_BLOCK,
            levels,
        )?;
        check_block_types(
            "up_block_types",
            &self.up_block_types,
            UP_DECODER_BLOCK,
            levels,
        )
    }
}

fn check_block_types(field: &str, types: &[String], supported: &str, levels: usize) -> Result<()> {
    if let Some(other) = types.iter().find(|t| t.as_str() != supported) {
        return Err(Error::unsupported(format!(
            "VAE {field} entry `{other}` (only `{supported}` is implemented)"
        )));
    }
    if types.len() != levels {
        return Err(Error::unsupported(format!(
            "VAE {field} has {} entries but block_out_channels has {levels}",
            types.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_json_gives_diffusers_defaults() {
        let cfg: VaeConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, VaeConfig::default());
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.downscale_factor(), 1);
    }

    #[test]
    fn sample_size_accepts_int_and_pair() {
        let a: std::result::Result<VaeConfig, _> = serde_json::from_str(r#"{"sample_size": 1024}"#);
        assert!(matches!(
            a.map(|c| c.sample_size),
            Ok(SampleSize::Square(1024))
        ));
        let b: std::result::Result<VaeConfig, _> =
            serde_json::from_str(r#"{"sample_size": [512, 768]}"#);
        assert!(matches!(b.map(|c| c.sample_size), Ok(SampleSize::Rect(v)) if v == [512, 768]));
    }

    #[test]
    fn unknown_block_type_is_unsupported() {
        let cfg = VaeConfig {
            down_block_types: vec!["AttnDownEncoderBlock2D".into()],
            ..VaeConfig::default()
        };
        assert!(matches!(cfg.validate(), Err(Error::Unsupported(m)) if m.contains("AttnDown")));
        let cfg = VaeConfig {
            up_block_types: vec![UP_DECODER_BLOCK.into(), UP_DECODER_BLOCK.into()],
            ..VaeConfig::default()
        };
        assert!(matches!(cfg.validate(), Err(Error::Unsupported(_))));
        let cfg = VaeConfig {
            act_fn: "gelu".into(),
            ..VaeConfig::default()
        };
        assert!(matches!(cfg.validate(), Err(Error::Unsupported(_))));
    }
}
