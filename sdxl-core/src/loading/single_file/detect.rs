//! Inferring the architecture of a single-file checkpoint from its tensors.
//!
//! First the stored keys give the model kind and the counts the key mapping needs
//! ([`layout_counts`]); then every size is read from tensor shapes under the diffusers names
//! ([`architecture`]): channels, layers, transformer depth per level and per layer, context and
//! pooled widths, `addition_time_embed_dim`, text-encoder sizes and VAE channels. What no shape
//! reveals (head counts, group-norm groups) comes from [`SingleFileHints`] or the rules of
//! [`defaults`].

use std::collections::BTreeSet;
use std::path::Path;

use super::defaults;
use super::keymap::{
    LayoutCounts, BIGG_PREFIX_BASE, BIGG_PREFIX_REFINER, CLIP_L_PREFIX, TEXT_ENCODER,
    TEXT_ENCODER_2, UNET, UNET_PREFIX, VAE, VAE_PREFIX,
};
use super::{SingleFileArchitecture, SingleFileHints};
use crate::error::{Error, Result};
use crate::loading::Weights;
use crate::pipeline::ModelKind;
use crate::text::clip::ClipTextConfig;
use crate::unet::{OneOrMany, UNetConfig};
use crate::vae::config::{DOWN_ENCODER_BLOCK, UP_DECODER_BLOCK};
use crate::vae::{SampleSize, VaeConfig};

/// The token table of a CLIP text encoder under the diffusers names.
const TOKEN_TABLE: &str = "text_model.embeddings.token_embedding.weight";
/// Micro-conditioning values per image of the base: original size, crop, target size.
const BASE_TIME_IDS: usize = 6;
/// Micro-conditioning values per image of the refiner: original size, crop, aesthetic score.
const REFINER_TIME_IDS: usize = 5;

/// The kind and the mapping counts of a file with these stored keys.
///
/// # Errors
/// [`Error::Unsupported`] for a file that is not an SGM-layout SDXL base or refiner (the
/// message says what the file looks like instead), or whose UNet input blocks do not form
/// equal levels.
pub fn layout_counts(keys: &[String], path: &Path) -> Result<(ModelKind, LayoutCounts)> {
    let has = |key: &str| keys.iter().any(|k| k == key);
    let has_prefix = |prefix: &str| keys.iter().any(|k| k.starts_with(prefix));
    let unsupported = |what: String| {
        Error::unsupported(format!(
            "{}: {what}; expected an SDXL base or refiner single file (`model.diffusion_model.*`, \
             `first_stage_model.*`, `conditioner.embedders.*`)",
            path.display()
        ))
    };
    if !has(&format!("{UNET_PREFIX}input_blocks.0.0.weight")) {
        let looks_like = if has_prefix("cond_stage_model.") {
            "a Stable Diffusion 1.x/2.x checkpoint (`cond_stage_model.*`)"
        } else if has_prefix("lora_unet_") || keys.iter().any(|k| k.contains("lora")) {
            "a LoRA, not a model"
        } else if has_prefix("down_blocks.") || has_prefix("unet.") {
            "diffusers-named weights; load the diffusers folder instead"
        } else {
            "no UNet under `model.diffusion_model.`"
        };
        return Err(unsupported(looks_like.into()));
    }
    if !has(&format!("{VAE_PREFIX}encoder.conv_in.weight")) {
        return Err(unsupported(
            "no VAE under `first_stage_model.` (a UNet-only file)".into(),
        ));
    }
    let bigg_tokens = "token_embedding.weight";
    let clip_l = has_prefix(CLIP_L_PREFIX);
    let (kind, bigg_prefix) = if has(&format!("{BIGG_PREFIX_BASE}{bigg_tokens}")) && clip_l {
        (ModelKind::Base, BIGG_PREFIX_BASE)
    } else if has(&format!("{BIGG_PREFIX_REFINER}{bigg_tokens}")) && !clip_l {
        (ModelKind::Refiner, BIGG_PREFIX_REFINER)
    } else {
        return Err(unsupported(format!(
            "text encoders not recognised (CLIP ViT-L under `{CLIP_L_PREFIX}`: {clip_l}; \
             OpenCLIP ViT-bigG under `{BIGG_PREFIX_BASE}` for the base or \
             `{BIGG_PREFIX_REFINER}` for the refiner not found as expected)"
        )));
    };
    let input_blocks = indices(keys, &format!("{UNET_PREFIX}input_blocks."));
    let downsamplers = input_blocks
        .iter()
        .filter(|k| has(&format!("{UNET_PREFIX}input_blocks.{k}.0.op.weight")))
        .count();
    let total = input_blocks.last().map_or(0, |k| k + 1);
    let levels = downsamplers + 1;
    let per_level = total / levels;
    if per_level < 2 || per_level * levels != total || input_blocks.len() != total {
        return Err(unsupported(format!(
            "{total} UNet input blocks with {downsamplers} downsamplers do not form {levels} \
             levels of equally many resnets"
        )));
    }
    let vae_levels = indices(keys, &format!("{VAE_PREFIX}encoder.down."))
        .last()
        .map_or(0, |i| i + 1);
    Ok((
        kind,
        LayoutCounts {
            unet_layers_per_block: per_level - 1,
            vae_levels,
            bigg_prefix,
        },
    ))
}

/// The distinct numbers `n` of keys `{prefix}{n}.…`, ascending.
fn indices(keys: &[String], prefix: &str) -> Vec<usize> {
    let set: BTreeSet<usize> = keys
        .iter()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect();
    set.into_iter().collect()
}

/// Every component's config, read from the shapes of `w` (the adapted `file`, at its root).
///
/// # Errors
/// [`Error::MissingTensor`] / [`Error::InvalidCheckpoint`] for tensors the inference needs that
/// are absent or misshapen, [`Error::Unsupported`] for sizes the rules cannot divide into heads,
/// or parts SDXL does not have.
pub fn architecture(
    w: &Weights,
    file: &Path,
    kind: ModelKind,
    counts: LayoutCounts,
    hints: &SingleFileHints,
) -> Result<SingleFileArchitecture> {
    let shapes = |component: &str| Shapes {
        w: w.pp(component),
        file,
    };
    let text_encoder = match kind {
        ModelKind::Base => Some(clip_config(
            &shapes(TEXT_ENCODER),
            ClipTextConfig::sdxl_text_encoder(),
            hints.text_encoder_heads,
        )?),
        ModelKind::Refiner => None,
    };
    let text_encoder_2 = clip_config(
        &shapes(TEXT_ENCODER_2),
        ClipTextConfig::sdxl_text_encoder_2(),
        hints.text_encoder_2_heads,
    )?;
    let unet = unet_config(
        &shapes(UNET),
        kind,
        counts.unet_layers_per_block,
        text_encoder_2.projection_dim,
        hints,
    )?;
    let vae = vae_config(&shapes(VAE), counts.vae_levels, hints.vae_norm_num_groups)?;
    let context = text_encoder.as_ref().map_or(0, |c| c.hidden_size) + text_encoder_2.hidden_size;
    if unet.cross_attention_dim != OneOrMany::One(context) {
        return Err(Error::unsupported(format!(
            "{}: the UNet attends to {:?}-wide text embeddings, but the text encoders of this \
             {kind:?} file produce {context}",
            file.display(),
            unet.cross_attention_dim
        )));
    }
    Ok(SingleFileArchitecture {
        kind,
        unet,
        vae,
        text_encoder,
        text_encoder_2,
    })
}

/// Shape queries on one adapted component, with errors naming the file.
struct Shapes<'a> {
    w: Weights,
    file: &'a Path,
}

impl Shapes<'_> {
    /// The shape of `name`, which must have `N` dimensions.
    fn dims<const N: usize>(&self, name: &str) -> Result<[usize; N]> {
        let shape = self.w.shape_of(name)?;
        <[usize; N]>::try_from(shape.as_slice()).map_err(|_| Error::InvalidCheckpoint {
            path: self.file.to_path_buf(),
            reason: format!(
                "tensor `{}` has shape {shape:?}, expected {N} dimensions",
                self.w.key(name)
            ),
        })
    }

    /// Dimension 0 of `name`, which must have `N` dimensions.
    fn rows<const N: usize>(&self, name: &str) -> Result<usize> {
        Ok(self.dims::<N>(name)?.first().copied().unwrap_or(0))
    }

    fn contains(&self, name: &str) -> bool {
        self.w.contains(name)
    }

    /// How many consecutive `{prefix}{i}{suffix}` exist, from 0.
    fn count(&self, prefix: &str, suffix: &str) -> usize {
        (0..)
            .take_while(|i| self.contains(&format!("{prefix}{i}{suffix}")))
            .count()
    }

    /// Transformer depth of each attention of one block (`None` for a block without one).
    fn depths(&self, block: &str, layers: usize) -> Option<Vec<usize>> {
        self.contains(&format!("{block}.attentions.0.proj_in.weight"))
            .then(|| {
                (0..layers)
                    .map(|j| {
                        self.count(
                            &format!("{block}.attentions.{j}.transformer_blocks."),
                            ".attn1.to_q.weight",
                        )
                    })
                    .collect()
            })
    }
}

/// `total / parts` when that divides exactly, else an error describing the quantity.
fn divide(total: usize, parts: usize, what: impl FnOnce() -> String) -> Result<usize> {
    if parts > 0 && total.is_multiple_of(parts) && total >= parts {
        Ok(total / parts)
    } else {
        Err(Error::unsupported(format!(
            "{}: {total} is not a multiple of {parts}; pass the value in SingleFileHints",
            what()
        )))
    }
}

fn clip_config(
    s: &Shapes<'_>,
    preset: ClipTextConfig,
    heads: Option<usize>,
) -> Result<ClipTextConfig> {
    let [vocab_size, hidden_size] = s.dims(TOKEN_TABLE)?;
    let [max_position_embeddings, _] = s.dims("text_model.embeddings.position_embedding.weight")?;
    let [intermediate_size, _] = s.dims("text_model.encoder.layers.0.mlp.fc1.weight")?;
    let projection_dim = if s.contains("text_projection.weight") {
        s.rows::<2>("text_projection.weight")?
    } else {
        hidden_size
    };
    Ok(ClipTextConfig {
        vocab_size,
        hidden_size,
        intermediate_size,
        projection_dim,
        num_hidden_layers: s.count("text_model.encoder.layers.", ".mlp.fc1.weight"),
        num_attention_heads: heads.unwrap_or_else(|| defaults::text_heads(hidden_size)),
        max_position_embeddings,
        ..preset
    })
}

/// One depth per block when all its attentions agree, else one per attention.
fn per_block(depths: &[usize]) -> OneOrMany<usize> {
    match depths {
        [first, rest @ ..] if rest.iter().all(|d| d == first) => OneOrMany::One(*first),
        _ => OneOrMany::Many(depths.to_vec()),
    }
}

/// `(transformer_layers_per_block, reverse_transformer_layers_per_block)` of a UNet config.
type Depths = (OneOrMany<OneOrMany<usize>>, Option<Vec<OneOrMany<usize>>>);

/// The transformer depths of a UNet as diffusers' config expresses them:
/// `(transformer_layers_per_block, reverse_transformer_layers_per_block)`.
///
/// Levels without attention get the middle block's depth at the deepest level (diffusers' middle
/// block reads the last entry) and 1 elsewhere (unused).
fn transformer_depths(
    down: &[Option<Vec<usize>>],
    up: &[Option<Vec<usize>>],
    mid_depth: usize,
) -> Result<Depths> {
    let last = down.len().saturating_sub(1);
    let levels: Vec<OneOrMany<usize>> = down
        .iter()
        .enumerate()
        .map(|(b, d)| match d {
            Some(d) => per_block(d),
            None if b == last => OneOrMany::One(mid_depth),
            None => OneOrMany::One(1),
        })
        .collect();
    if levels.last() != Some(&OneOrMany::One(mid_depth)) {
        return Err(Error::unsupported(format!(
            "UNet: the deepest level's transformer depth {:?} differs from the middle block's \
             {mid_depth}, which a diffusers config cannot express",
            levels.last()
        )));
    }
    let found: BTreeSet<usize> = down
        .iter()
        .flatten()
        .flatten()
        .copied()
        .chain([mid_depth])
        .collect();
    let per_level = match found.into_iter().collect::<Vec<_>>().as_slice() {
        [d] => OneOrMany::One(OneOrMany::One(*d)),
        _ => OneOrMany::Many(levels.clone()),
    };
    // Up blocks are the mirror of the down blocks unless the file says otherwise.
    let mirrored: Vec<OneOrMany<usize>> = levels.iter().rev().cloned().collect();
    let up_levels: Vec<OneOrMany<usize>> = up
        .iter()
        .zip(&mirrored)
        .map(|(d, m)| d.as_deref().map_or_else(|| m.clone(), per_block))
        .collect();
    let symmetric = up_levels == mirrored && levels.iter().all(|d| matches!(d, OneOrMany::One(_)));
    Ok((per_level, (!symmetric).then_some(up_levels)))
}

fn unet_config(
    s: &Shapes<'_>,
    kind: ModelKind,
    layers: usize,
    pooled_dim: usize,
    hints: &SingleFileHints,
) -> Result<UNetConfig> {
    let [model_channels, in_channels, conv_in_kernel, _] = s.dims("conv_in.weight")?;
    let [out_channels, _, conv_out_kernel, _] = s.dims("conv_out.weight")?;
    let time_embed_dim = s.rows::<2>("time_embedding.linear_1.weight")?;
    let [_, adm_in_channels] = s.dims("add_embedding.linear_1.weight")?;
    let levels = s.count("down_blocks.", ".resnets.0.conv1.weight");
    let block_out_channels = (0..levels)
        .map(|b| s.rows::<4>(&format!("down_blocks.{b}.resnets.0.conv2.weight")))
        .collect::<Result<Vec<_>>>()?;
    let down: Vec<_> = (0..levels)
        .map(|b| s.depths(&format!("down_blocks.{b}"), layers))
        .collect();
    let up: Vec<_> = (0..levels)
        .map(|b| s.depths(&format!("up_blocks.{b}"), layers + 1))
        .collect();
    let mid = "mid_block.attentions.0";
    let mid_depth = s.count(&format!("{mid}.transformer_blocks."), ".attn1.to_q.weight");
    let [_, cross_attention_dim] =
        s.dims(&format!("{mid}.transformer_blocks.0.attn2.to_k.weight"))?;
    let use_linear_projection = s.w.shape_of(&format!("{mid}.proj_in.weight"))?.len() == 2;
    let (transformer_layers_per_block, reverse_transformer_layers_per_block) =
        transformer_depths(&down, &up, mid_depth)?;

    let attention_head_dim = match &hints.unet_attention_heads {
        Some(heads) => heads.clone(),
        None => {
            let width = defaults::unet_head_dim(model_channels);
            let last = levels.saturating_sub(1);
            block_out_channels
                .iter()
                .enumerate()
                .map(|(b, &c)| {
                    let has_attention = b == last
                        || down.get(b).is_some_and(Option::is_some)
                        || up.get(last - b).is_some_and(Option::is_some);
                    if has_attention {
                        divide(c, width, || {
                            format!("UNet level {b}: {c} channels in {width}-wide heads")
                        })
                    } else {
                        Ok((c / width).max(1))
                    }
                })
                .collect::<Result<Vec<_>>>()?
        }
    };
    let n_time_ids = match kind {
        ModelKind::Base => BASE_TIME_IDS,
        ModelKind::Refiner => REFINER_TIME_IDS,
    };
    let time_ids_width = adm_in_channels.saturating_sub(pooled_dim);
    let addition_time_embed_dim = divide(time_ids_width, n_time_ids, || {
        format!(
            "UNet add-embedding input {adm_in_channels} minus the {pooled_dim}-wide pooled text \
             embedding, shared by {n_time_ids} time ids"
        )
    })?;
    let block_types = |blocks: &[Option<Vec<usize>>], with: &str, without: &str| {
        blocks
            .iter()
            .map(|d| if d.is_some() { with } else { without }.to_string())
            .collect()
    };
    Ok(UNetConfig {
        sample_size: None,
        in_channels,
        out_channels,
        down_block_types: block_types(&down, "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types: block_types(&up, "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels,
        layers_per_block: OneOrMany::One(layers),
        norm_num_groups: Some(
            hints
                .unet_norm_num_groups
                .unwrap_or_else(|| defaults::norm_groups(model_channels)),
        ),
        cross_attention_dim: OneOrMany::One(cross_attention_dim),
        transformer_layers_per_block,
        reverse_transformer_layers_per_block,
        attention_head_dim: OneOrMany::Many(attention_head_dim),
        use_linear_projection,
        addition_embed_type: Some("text_time".into()),
        addition_time_embed_dim: Some(addition_time_embed_dim),
        projection_class_embeddings_input_dim: Some(adm_in_channels),
        time_embedding_dim: (time_embed_dim != 4 * model_channels).then_some(time_embed_dim),
        conv_in_kernel,
        conv_out_kernel,
        ..UNetConfig::default()
    })
}

fn vae_config(s: &Shapes<'_>, levels: usize, groups: Option<usize>) -> Result<VaeConfig> {
    let [first_channels, in_channels, _, _] = s.dims("encoder.conv_in.weight")?;
    let block_out_channels = (0..levels)
        .map(|i| s.rows::<4>(&format!("encoder.down_blocks.{i}.resnets.0.conv2.weight")))
        .collect::<Result<Vec<_>>>()?;
    let [_, latent_channels, _, _] = s.dims("decoder.conv_in.weight")?;
    let out_channels = s.rows::<4>("decoder.conv_out.weight")?;
    Ok(VaeConfig {
        in_channels,
        out_channels,
        down_block_types: vec![DOWN_ENCODER_BLOCK.into(); levels],
        up_block_types: vec![UP_DECODER_BLOCK.into(); levels],
        block_out_channels,
        layers_per_block: s.count("encoder.down_blocks.0.resnets.", ".conv1.weight"),
        latent_channels,
        norm_num_groups: groups.unwrap_or_else(|| defaults::norm_groups(first_channels)),
        sample_size: SampleSize::Square(defaults::VAE_SAMPLE_SIZE),
        scaling_factor: defaults::VAE_SCALING_FACTOR,
        force_upcast: true,
        use_quant_conv: s.contains("quant_conv.weight"),
        use_post_quant_conv: s.contains("post_quant_conv.weight"),
        mid_block_add_attention: s.contains("encoder.mid_block.attentions.0.to_q.weight"),
        ..VaeConfig::default()
    })
}
