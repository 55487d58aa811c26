//! kohya module names: the UNet's diffusers module paths in the original single-file ("SGM")
//! layout (`down_blocks.1.attentions.0.proj_in` → `input_blocks.4.1.proj_in`), then
//! `lora_unet_` + the path with every `.` replaced by `_`.
//!
//! The SGM indices are computed from the UNet's own block structure (resnets per level,
//! resamplers, attentions), so any `layers_per_block` and number of levels works:
//! `input_blocks.0` is `conv_in`; each down level's resnets (with their transformers) take the
//! next input blocks, then its downsampler one more; `middle_block.{0,1,2}` are resnet,
//! transformer, resnet; each up level's resnets take the next output blocks, and its upsampler
//! sits in the last of them (`.2.conv` after a transformer, `.1.conv` otherwise).

use super::file::LoraComponent;
use crate::unet::model::{DownBlock, UpBlock};
use crate::unet::UNet2DConditionModel;

/// Where one UNet level's modules sit among the SGM input or output blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Level {
    /// Index of the level's first block.
    first: usize,
    /// Resnets in the level.
    layers: usize,
    /// Whether the level has transformers (`attentions`).
    attentions: bool,
}

/// The UNet's block structure, as needed to name its modules in the SGM layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgmUnetLayout {
    down: Vec<Level>,
    up: Vec<Level>,
}

impl SgmUnetLayout {
    /// Reads the block structure of `unet`.
    pub fn of(unet: &UNet2DConditionModel) -> Self {
        let mut next = 1;
        let down = unet
            .down_blocks
            .iter()
            .map(|block| {
                let (layers, attentions, resampler) = match block {
                    DownBlock::Plain(b) => (b.resnets.len(), false, b.downsampler.is_some()),
                    DownBlock::CrossAttn(b) => (b.resnets.len(), true, b.downsampler.is_some()),
                };
                let level = Level {
                    first: next,
                    layers,
                    attentions,
                };
                next += layers + usize::from(resampler);
                level
            })
            .collect();
        let mut next = 0;
        let up = unet
            .up_blocks
            .iter()
            .map(|block| {
                let (layers, attentions) = match block {
                    UpBlock::Plain(b) => (b.resnets.len(), false),
                    UpBlock::CrossAttn(b) => (b.resnets.len(), true),
                };
                let level = Level {
                    first: next,
                    layers,
                    attentions,
                };
                next += layers;
                level
            })
            .collect();
        Self { down, up }
    }

    /// The SGM module path of a diffusers UNet module path (`mid_block.attentions.0.proj_in` →
    /// `middle_block.1.proj_in`), or `None` for a path outside the layout.
    pub fn module_name(&self, diffusers: &str) -> Option<String> {
        let parts: Vec<&str> = diffusers.split('.').collect();
        let index = |s: &str| s.parse::<usize>().ok();
        let sgm = match parts.as_slice() {
            ["time_embedding", linear] => format!("time_embed.{}", mlp_index(linear)?),
            ["add_embedding", linear] => format!("label_emb.0.{}", mlp_index(linear)?),
            ["conv_in"] => "input_blocks.0.0".to_string(),
            ["conv_out"] => "out.2".to_string(),
            ["down_blocks", b, kind, rest @ ..] => {
                let level = self.down.get(index(b)?)?;
                match (*kind, rest) {
                    ("resnets", [j, tail @ ..]) => {
                        let j = index(j).filter(|&j| j < level.layers)?;
                        format!("input_blocks.{}.0.{}", level.first + j, resnet(tail)?)
                    }
                    ("attentions", [j, tail @ ..]) if level.attentions && !tail.is_empty() => {
                        let j = index(j).filter(|&j| j < level.layers)?;
                        format!("input_blocks.{}.1.{}", level.first + j, tail.join("."))
                    }
                    ("downsamplers", ["0", "conv"]) => {
                        format!("input_blocks.{}.0.op", level.first + level.layers)
                    }
                    _ => return None,
                }
            }
            ["mid_block", kind, j, tail @ ..] if !tail.is_empty() => match (*kind, *j) {
                ("resnets", "0") => format!("middle_block.0.{}", resnet(tail)?),
                ("attentions", "0") => format!("middle_block.1.{}", tail.join(".")),
                ("resnets", "1") => format!("middle_block.2.{}", resnet(tail)?),
                _ => return None,
            },
            ["up_blocks", b, kind, rest @ ..] => {
                let level = self.up.get(index(b)?)?;
                match (*kind, rest) {
                    ("resnets", [j, tail @ ..]) => {
                        let j = index(j).filter(|&j| j < level.layers)?;
                        format!("output_blocks.{}.0.{}", level.first + j, resnet(tail)?)
                    }
                    ("attentions", [j, tail @ ..]) if level.attentions && !tail.is_empty() => {
                        let j = index(j).filter(|&j| j < level.layers)?;
                        format!("output_blocks.{}.1.{}", level.first + j, tail.join("."))
                    }
                    ("upsamplers", ["0", "conv"]) if level.layers > 0 => format!(
                        "output_blocks.{}.{}.conv",
                        level.first + level.layers - 1,
                        if level.attentions { 2 } else { 1 }
                    ),
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some(sgm)
    }
}

/// `linear_1`/`linear_2` of a timestep MLP → its index in the SGM `Sequential`.
fn mlp_index(linear: &str) -> Option<usize> {
    match linear {
        "linear_1" => Some(0),
        "linear_2" => Some(2),
        _ => None,
    }
}

/// A resnet's layer in SGM names.
fn resnet(tail: &[&str]) -> Option<&'static str> {
    match tail {
        ["conv1"] => Some("in_layers.2"),
        ["time_emb_proj"] => Some("emb_layers.1"),
        ["conv2"] => Some("out_layers.3"),
        ["conv_shortcut"] => Some("skip_connection"),
        _ => None,
    }
}

/// The kohya name of a module: the component's prefix and the module path with `.` replaced by
/// `_`. UNet paths are diffusers paths, translated to SGM names through `layout` first (`None`
/// when the layout has no such module); text-encoder paths are transformers module names
/// (`text_model.encoder.layers.0.self_attn.q_proj` → `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`).
pub fn kohya_module_name(
    component: LoraComponent,
    module: &str,
    layout: &SgmUnetLayout,
) -> Option<String> {
    let path = match component {
        LoraComponent::Unet => layout.module_name(module)?,
        LoraComponent::TextEncoder | LoraComponent::TextEncoder2 => module.to_string(),
    };
    Some(format!(
        "{}{}",
        component.kohya_prefix(),
        path.replace('.', "_")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SDXL base: levels of 2 resnets (3 going up), transformers in levels 1 and 2.
    fn sdxl_base() -> SgmUnetLayout {
        let level = |first, layers, attentions| Level {
            first,
            layers,
            attentions,
        };
        SgmUnetLayout {
            down: vec![level(1, 2, false), level(4, 2, true), level(7, 2, true)],
            up: vec![level(0, 3, true), level(3, 3, true), level(6, 3, false)],
        }
    }

    #[test]
    fn maps_diffusers_paths_to_sgm_names() {
        let l = sdxl_base();
        let cases = [
            ("conv_in", "input_blocks.0.0"),
            ("time_embedding.linear_2", "time_embed.2"),
            ("add_embedding.linear_1", "label_emb.0.0"),
            (
                "down_blocks.0.resnets.1.conv1",
                "input_blocks.2.0.in_layers.2",
            ),
            ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
            (
                "down_blocks.1.resnets.0.conv_shortcut",
                "input_blocks.4.0.skip_connection",
            ),
            (
                "down_blocks.2.attentions.1.transformer_blocks.2.attn1.to_q",
                "input_blocks.8.1.transformer_blocks.2.attn1.to_q",
            ),
            (
                "mid_block.resnets.1.time_emb_proj",
                "middle_block.2.emb_layers.1",
            ),
            ("mid_block.attentions.0.proj_out", "middle_block.1.proj_out"),
            (
                "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj",
                "output_blocks.2.1.transformer_blocks.0.ff.net.0.proj",
            ),
            ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
            (
                "up_blocks.1.resnets.2.conv2",
                "output_blocks.5.0.out_layers.3",
            ),
            (
                "up_blocks.2.resnets.0.conv1",
                "output_blocks.6.0.in_layers.2",
            ),
            ("conv_out", "out.2"),
        ];
        for (diffusers, sgm) in cases {
            assert_eq!(
                l.module_name(diffusers).as_deref(),
                Some(sgm),
                "{diffusers}"
            );
        }
        for outside in [
            "down_blocks.0.attentions.0.proj_in",
            "down_blocks.3.resnets.0.conv1",
            "down_blocks.0.resnets.2.conv1",
            "mid_block.resnets.2.conv1",
            "up_blocks.0.resnets.0.norm1",
            "conv_norm_out",
        ] {
            assert_eq!(l.module_name(outside), None, "{outside}");
        }
    }

    #[test]
    fn upsampler_without_transformers_is_block_one() {
        let l = SgmUnetLayout {
            down: vec![],
            up: vec![Level {
                first: 0,
                layers: 3,
                attentions: false,
            }],
        };
        assert_eq!(
            l.module_name("up_blocks.0.upsamplers.0.conv").as_deref(),
            Some("output_blocks.2.1.conv")
        );
    }

    #[test]
    fn kohya_names_replace_dots() {
        let l = sdxl_base();
        assert_eq!(
            kohya_module_name(
                LoraComponent::Unet,
                "mid_block.attentions.0.transformer_blocks.2.attn2.to_out.0",
                &l
            )
            .as_deref(),
            Some("lora_unet_middle_block_1_transformer_blocks_2_attn2_to_out_0")
        );
        assert_eq!(
            kohya_module_name(
                LoraComponent::TextEncoder2,
                "text_model.encoder.layers.3.self_attn.out_proj",
                &l
            )
            .as_deref(),
            Some("lora_te2_text_model_encoder_layers_3_self_attn_out_proj")
        );
    }
}
