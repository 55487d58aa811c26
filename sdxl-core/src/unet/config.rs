//! `unet/config.json`: [`UNetConfig`] mirrors diffusers' `UNet2DConditionModel` config field for
//! field (with diffusers' defaults), and resolves it into the sizes of every block.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::loading::read_json;

/// A config value that diffusers accepts either once for every block or as one value per block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// One value per block (or per layer), in block order.
    Many(Vec<T>),
    /// The same value for every block.
    One(T),
}

impl<T: Clone> OneOrMany<T> {
    /// The value for each of `n` entries: `One` repeated, or `Many` when it has exactly `n`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming `field` when a list has another length.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => Err(Error::unsupported(format!(
                "UNet config: `{field}` has {} entries, but {n} are needed (one per block, or \
                 one per layer of a block)",
                v.len()
            ))),
        }
    }
}

/// The SDXL UNet's `config.json` (`UNet2DConditionModel`), field for field.
///
/// Missing fields take diffusers' defaults (those of `UNet2DConditionModel.__init__`, which are
/// Stable Diffusion 1.x-like sizes); SDXL checkpoints always spell out their sizes. Fields that
/// configure features this crate does not implement are accepted when they hold the neutral
/// value and rejected by [`UNetConfig::validate`] otherwise.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    /// Default latent size (an int or `[height, width]`); informational.
    pub sample_size: Option<OneOrMany<usize>>,
    /// Latent channels in.
    pub in_channels: usize,
    /// Channels out (the noise prediction).
    pub out_channels: usize,
    /// Whether the input is mapped with `2 * x - 1` first.
    pub center_input_sample: bool,
    /// Order of the sinusoidal timestep features: `cos, sin` when true.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the sinusoidal timestep features.
    pub freq_shift: f64,
    /// Block type of each level going down: `DownBlock2D` or `CrossAttnDownBlock2D`.
    pub down_block_types: Vec<String>,
    /// The middle block: `UNetMidBlock2DCrossAttn`.
    pub mid_block_type: Option<String>,
    /// Block type of each level going up: `UpBlock2D` or `CrossAttnUpBlock2D`.
    pub up_block_types: Vec<String>,
    /// Cross-attention only (no self-attention) per block; must be false.
    pub only_cross_attention: OneOrMany<bool>,
    /// Channels of each level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: OneOrMany<usize>,
    /// Padding of the stride-2 downsampling convolutions.
    pub downsample_padding: usize,
    /// Output scale of the middle block's resnets; must be 1.
    pub mid_block_scale_factor: f64,
    /// Training dropout; unused at inference.
    pub dropout: f64,
    /// Activation of the resnets and the output head: `silu` (or its alias `swish`).
    pub act_fn: String,
    /// Groups of every group norm; `null` (no output norm) is not supported.
    pub norm_num_groups: Option<usize>,
    /// Epsilon of the resnet and output group norms.
    pub norm_eps: f64,
    /// Width of the text conditioning (`encoder_hidden_states`), once or per block.
    pub cross_attention_dim: OneOrMany<usize>,
    /// Transformer layers of each attention, per block and optionally per layer of a block.
    pub transformer_layers_per_block: OneOrMany<OneOrMany<usize>>,
    /// Transformer layers of the up blocks when they are not the mirror of the down blocks.
    pub reverse_transformer_layers_per_block: Option<Vec<OneOrMany<usize>>>,
    /// Projection of `encoder_hidden_states`; must be `null`.
    pub encoder_hid_dim: Option<usize>,
    /// Kind of that projection; must be `null`.
    pub encoder_hid_dim_type: Option<String>,
    /// Despite its name, the number of attention *heads* per block when `num_attention_heads` is
    /// `null` (a diffusers naming quirk); the head size is `channels / heads`.
    pub attention_head_dim: OneOrMany<usize>,
    /// Must be `null`: diffusers rejects it and reads head counts from `attention_head_dim`.
    pub num_attention_heads: Option<OneOrMany<usize>>,
    /// Two cross-attention transformers per block; must be false.
    pub dual_cross_attention: bool,
    /// Whether the transformers' `proj_in`/`proj_out` are linear layers (SDXL) rather than 1×1
    /// convolutions; must be true.
    pub use_linear_projection: bool,
    /// Class conditioning; must be `null`.
    pub class_embed_type: Option<String>,
    /// Extra conditioning added to the timestep embedding: `text_time` (SDXL).
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal features of each time id.
    pub addition_time_embed_dim: Option<usize>,
    /// Number of classes for class conditioning; must be `null`.
    pub num_class_embeds: Option<usize>,
    /// Whether attention scores are computed in f32; softmax here always runs at least in f32
    /// on the CPU, and the score matmul follows the model dtype as with diffusers' default
    /// (`scaled_dot_product_attention`) processor.
    pub upcast_attention: Option<bool>,
    /// How resnets apply the timestep embedding; must be `default`.
    pub resnet_time_scale_shift: String,
    /// Must be false.
    pub resnet_skip_time_act: bool,
    /// Output scale of the down/up resnets; must be 1.
    pub resnet_out_scale_factor: f64,
    /// Timestep features: `positional` (sinusoidal).
    pub time_embedding_type: String,
    /// Width of the timestep embedding; `null` means `4 * block_out_channels[0]`.
    pub time_embedding_dim: Option<usize>,
    /// Activation after the timestep embedding; must be `null`.
    pub time_embedding_act_fn: Option<String>,
    /// Activation at the end of the timestep MLP; must be `null`.
    pub timestep_post_act: Option<String>,
    /// Guidance-embedding input of the timestep MLP (distilled LCM UNets); must be `null`.
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel size of `conv_in`.
    pub conv_in_kernel: usize,
    /// Kernel size of `conv_out`.
    pub conv_out_kernel: usize,
    /// Input width of `add_embedding`: `n_time_ids * addition_time_embed_dim + pooled width`.
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Attention variant; must be `default`.
    pub attention_type: String,
    /// Must be false.
    pub class_embeddings_concat: bool,
    /// Only used by middle-block types this crate does not implement.
    pub mid_block_only_cross_attention: Option<bool>,
    /// Normalisation of `encoder_hidden_states` in cross-attention; must be `null`.
    pub cross_attention_norm: Option<String>,
    /// Heads of the `text` addition embedding; unused by `text_time`.
    pub addition_embed_type_num_heads: usize,
}

impl Default for UNetConfig {
    fn default() -> Self {
        let s = |v: &str| v.to_string();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                s(CROSS_ATTN_DOWN),
                s(CROSS_ATTN_DOWN),
                s(CROSS_ATTN_DOWN),
                s(DOWN),
            ],
            mid_block_type: Some(s(MID_CROSS_ATTN)),
            up_block_types: vec![s(UP), s(CROSS_ATTN_UP), s(CROSS_ATTN_UP), s(CROSS_ATTN_UP)],
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: s("silu"),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            transformer_layers_per_block: OneOrMany::One(OneOrMany::One(1)),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: None,
            resnet_time_scale_shift: s("default"),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: s("positional"),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: s("default"),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

const DOWN: &str = "DownBlock2D";
const CROSS_ATTN_DOWN: &str = "CrossAttnDownBlock2D";
const UP: &str = "UpBlock2D";
const CROSS_ATTN_UP: &str = "CrossAttnUpBlock2D";
const MID_CROSS_ATTN: &str = "UNetMidBlock2DCrossAttn";

/// Sizes of one transformer (`Transformer2DModel`) inside a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransformerSpec {
    /// Channels of the feature map (and the transformer width).
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Stacked `BasicTransformerBlock`s.
    pub layers: usize,
    /// Width of `encoder_hidden_states`.
    pub cross_attention_dim: usize,
}

/// Sizes of one down block, resolved from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownBlockSpec {
    /// Input channels (of the first resnet).
    pub in_channels: usize,
    /// Output channels of every resnet.
    pub out_channels: usize,
    /// Resnets in the block.
    pub num_layers: usize,
    /// One transformer after each resnet for `CrossAttnDownBlock2D`, `None` for `DownBlock2D`.
    pub transformers: Option<Vec<TransformerSpec>>,
    /// Whether a stride-2 downsampler ends the block (all but the last level).
    pub add_downsample: bool,
}

/// Sizes of one up block, resolved from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpBlockSpec {
    /// Channels coming from the block below (input of the first resnet, before the skip).
    pub prev_output_channels: usize,
    /// Channels of the deepest skip connection this block consumes (its last resnet's).
    pub in_channels: usize,
    /// Output channels of every resnet.
    pub out_channels: usize,
    /// Resnets in the block (`layers_per_block + 1`).
    pub num_layers: usize,
    /// One transformer after each resnet for `CrossAttnUpBlock2D`, `None` for `UpBlock2D`.
    pub transformers: Option<Vec<TransformerSpec>>,
    /// Whether a ×2 upsampler ends the block (all but the last level).
    pub add_upsample: bool,
}

/// Every block size of a UNet, resolved from a validated [`UNetConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetLayout {
    /// The down blocks, top level first.
    pub down: Vec<DownBlockSpec>,
    /// The middle block's transformer (between its two resnets).
    pub mid: TransformerSpec,
    /// The up blocks, deepest level first.
    pub up: Vec<UpBlockSpec>,
}

impl UNetConfig {
    /// Reads `<unet_dir>/config.json`.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Io`] or [`Error::Json`] naming the file.
    pub fn load(unet_dir: &Path) -> Result<Self> {
        read_json(&unet_dir.join("config.json"), "UNet config")
    }

    /// Width of the timestep embedding that every resnet receives.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or_else(|| 4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// Number of stride-2 downsamplers: latent heights and widths must be multiples of
    /// `2^num_downsamplers()`.
    pub fn num_downsamplers(&self) -> usize {
        self.block_out_channels.len().saturating_sub(1)
    }

    /// `(addition_time_embed_dim, projection_class_embeddings_input_dim)` of the SDXL
    /// add-embedding.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the config has no `text_time` add-embedding.
    pub fn text_time_dims(&self) -> Result<(usize, usize)> {
        if self.addition_embed_type.as_deref() != Some("text_time") {
            return Err(Error::unsupported(format!(
                "UNet config: addition_embed_type {:?}; only \"text_time\" (SDXL) is supported",
                self.addition_embed_type
            )));
        }
        match (
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ) {
            (Some(d), Some(p)) if d > 0 => Ok((d, p)),
            _ => Err(Error::unsupported(
                "UNet config: addition_embed_type \"text_time\" needs addition_time_embed_dim > 0 \
                 and projection_class_embeddings_input_dim",
            )),
        }
    }

    /// Groups of every group norm.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when `norm_num_groups` is `null`.
    pub fn groups(&self) -> Result<usize> {
        self.norm_num_groups.ok_or_else(|| {
            Error::unsupported(
                "UNet config: norm_num_groups null (no output norm) is not supported",
            )
        })
    }

    /// Rejects every option this crate does not implement, naming the field and its value.
    ///
    /// # Errors
    /// [`Error::Unsupported`].
    pub fn validate(&self) -> Result<()> {
        fn require(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
            if ok {
                Ok(())
            } else {
                Err(Error::unsupported(format!("UNet config: {}", what())))
            }
        }
        require(self.num_attention_heads.is_none(), || {
            "num_attention_heads must be null (diffusers reads the head counts from \
             attention_head_dim)"
                .into()
        })?;
        require(matches!(self.act_fn.as_str(), "silu" | "swish"), || {
            format!("act_fn {:?}; only \"silu\" is supported", self.act_fn)
        })?;
        require(self.time_embedding_type == "positional", || {
            format!(
                "time_embedding_type {:?}; only \"positional\" is supported",
                self.time_embedding_type
            )
        })?;
        require(self.resnet_time_scale_shift == "default", || {
            format!(
                "resnet_time_scale_shift {:?}; only \"default\" is supported",
                self.resnet_time_scale_shift
            )
        })?;
        require(self.attention_type == "default", || {
            format!(
                "attention_type {:?}; only \"default\" is supported",
                self.attention_type
            )
        })?;
        require(self.use_linear_projection, || {
            "use_linear_projection false (convolutional transformer projections) is not supported"
                .into()
        })?;
        require(self.resnet_out_scale_factor == 1.0, || {
            format!(
                "resnet_out_scale_factor {} (only 1)",
                self.resnet_out_scale_factor
            )
        })?;
        require(self.mid_block_scale_factor == 1.0, || {
            format!(
                "mid_block_scale_factor {} (only 1)",
                self.mid_block_scale_factor
            )
        })?;
        let unset: [(&str, bool); 13] = [
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type.is_some()),
            ("class_embed_type", self.class_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_some(),
            ),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("cross_attention_norm", self.cross_attention_norm.is_some()),
            ("dual_cross_attention", self.dual_cross_attention),
            ("resnet_skip_time_act", self.resnet_skip_time_act),
            ("class_embeddings_concat", self.class_embeddings_concat),
            ("center_input_sample", self.center_input_sample),
            (
                "only_cross_attention",
                match &self.only_cross_attention {
                    OneOrMany::One(b) => *b,
                    OneOrMany::Many(v) => v.iter().any(|b| *b),
                },
            ),
        ];
        if let Some((name, _)) = unset.iter().find(|(_, set)| *set) {
            return Err(Error::unsupported(format!(
                "UNet config: `{name}` is set; this option is not supported (it must be null or \
                 false)"
            )));
        }
        require(
            self.conv_in_kernel % 2 == 1 && self.conv_out_kernel % 2 == 1,
            || {
                format!(
                    "conv_in_kernel {} / conv_out_kernel {} must be odd",
                    self.conv_in_kernel, self.conv_out_kernel
                )
            },
        )?;
        self.groups()?;
        self.text_time_dims()?;
        self.layout().map(|_| ())
    }

    /// Resolves the per-block sizes the way `UNet2DConditionModel.__init__` does.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for unknown block types, list fields whose length does not match
    /// the number of blocks, or head counts that are zero.
    pub fn layout(&self) -> Result<UNetLayout> {
        let n = self.down_block_types.len();
        if n == 0 || self.block_out_channels.len() != n || self.up_block_types.len() != n {
            return Err(Error::unsupported(format!(
                "UNet config: {} down block types, {} up block types and {} block_out_channels \
                 must be equally many (and at least one)",
                n,
                self.up_block_types.len(),
                self.block_out_channels.len()
            )));
        }
        let heads = self.attention_head_dim.expand(n, "attention_head_dim")?;
        if heads.contains(&0) {
            return Err(Error::unsupported(
                "UNet config: attention_head_dim (head counts) must be positive",
            ));
        }
        let cross = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let tlpb = self
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let channels = &self.block_out_channels;

        let mut down = Vec::with_capacity(n);
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let out = channels[i];
            let transformers = match kind.as_str() {
                DOWN => None,
                CROSS_ATTN_DOWN => Some(transformer_specs(
                    &tlpb[i],
                    layers[i],
                    out,
                    heads[i],
                    cross[i],
                    "transformer_layers_per_block",
                )?),
                other => {
                    return Err(Error::unsupported(format!(
                        "UNet config: down block type {other:?}; supported: {DOWN}, \
                         {CROSS_ATTN_DOWN}"
                    )))
                }
            };
            down.push(DownBlockSpec {
                in_channels: if i == 0 { channels[0] } else { channels[i - 1] },
                out_channels: out,
                num_layers: layers[i],
                transformers,
                add_downsample: i + 1 < n,
            });
        }

        let last = n - 1;
        match self.mid_block_type.as_deref() {
            Some(MID_CROSS_ATTN) => {}
            other => {
                return Err(Error::unsupported(format!(
                    "UNet config: mid_block_type {other:?}; only {MID_CROSS_ATTN} is supported"
                )))
            }
        }
        let mid_layers = match &tlpb[last] {
            OneOrMany::One(l) => *l,
            OneOrMany::Many(v) => v.first().copied().unwrap_or(0),
        };
        let mid = TransformerSpec {
            channels: channels[last],
            heads: heads[last],
            layers: mid_layers,
            cross_attention_dim: cross[last],
        };

        let reversed_tlpb: Vec<OneOrMany<usize>> = match &self.reverse_transformer_layers_per_block
        {
            Some(r) => {
                OneOrMany::Many(r.clone()).expand(n, "reverse_transformer_layers_per_block")?
            }
            None => {
                if tlpb.iter().any(|t| matches!(t, OneOrMany::Many(_))) {
                    return Err(Error::unsupported(
                        "UNet config: transformer_layers_per_block lists per layer (an asymmetric \
                         UNet) need reverse_transformer_layers_per_block",
                    ));
                }
                tlpb.iter().rev().cloned().collect()
            }
        };
        let mut up = Vec::with_capacity(n);
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let level = last - i;
            let out = channels[level];
            let prev = channels[(level + 1).min(last)];
            let num_layers = layers[level] + 1;
            let transformers = match kind.as_str() {
                UP => None,
                CROSS_ATTN_UP => Some(transformer_specs(
                    &reversed_tlpb[i],
                    num_layers,
                    out,
                    heads[level],
                    cross[level],
                    "reverse_transformer_layers_per_block",
                )?),
                other => {
                    return Err(Error::unsupported(format!(
                        "UNet config: up block type {other:?}; supported: {UP}, {CROSS_ATTN_UP}"
                    )))
                }
            };
            up.push(UpBlockSpec {
                prev_output_channels: prev,
                in_channels: channels[level.saturating_sub(1)],
                out_channels: out,
                num_layers,
                transformers,
                add_upsample: i < last,
            });
        }
        Ok(UNetLayout { down, mid, up })
    }
}

fn transformer_specs(
    layers_per_transformer: &OneOrMany<usize>,
    num_layers: usize,
    channels: usize,
    heads: usize,
    cross_attention_dim: usize,
    field: &str,
) -> Result<Vec<TransformerSpec>> {
    Ok(layers_per_transformer
        .expand(num_layers, field)?
        .into_iter()
        .map(|layers| TransformerSpec {
            channels,
            heads,
            layers,
            cross_attention_dim,
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(json: &str) -> UNetConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn one_or_many_parses_ints_lists_and_nested_lists() {
        let c = parse(
            r#"{"attention_head_dim": [1, 2], "transformer_layers_per_block": [1, [2, 3]],
                "layers_per_block": 2}"#,
        );
        assert_eq!(c.attention_head_dim, OneOrMany::Many(vec![1, 2]));
        assert_eq!(
            c.transformer_layers_per_block,
            OneOrMany::Many(vec![OneOrMany::One(1), OneOrMany::Many(vec![2, 3])])
        );
        assert_eq!(c.layers_per_block, OneOrMany::One(2));
    }

    #[test]
    fn defaults_are_diffusers_defaults() {
        let c = parse("{}");
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(c.time_embed_dim(), 1280);
        assert!(c.flip_sin_to_cos);
        assert_eq!(c.norm_num_groups, Some(32));
    }

    #[test]
    fn sdxl_base_layout_mirrors_diffusers() {
        let c = parse(
            r#"{"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
                "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
                "use_linear_projection": true, "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}"#,
        );
        c.validate().unwrap();
        let l = c.layout().unwrap();
        assert!(l.down[0].transformers.is_none());
        assert_eq!(l.mid.layers, 10);
        assert_eq!(l.mid.heads, 20);
        assert_eq!(l.up[0].num_layers, 3);
        assert_eq!(l.up[0].prev_output_channels, 1280);
        assert_eq!(l.up[0].in_channels, 640);
        assert_eq!(l.up[2].in_channels, 320);
        let t = l.up[1].transformers.as_ref().map(|t| t[0]);
        assert_eq!(
            t.map(|t| (t.channels, t.heads, t.layers)),
            Some((640, 10, 2))
        );
    }

    #[test]
    fn unknown_block_type_is_unsupported_and_named() {
        let c = parse(
            r#"{"down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D",
                          "DownBlock2D"]}"#,
        );
        let e = c.layout().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("AttnDownBlock2D"), "{e}");
    }
}
