//! The key mapping between the single-file ("SGM") layout and diffusers' names, in one place.
//!
//! [`SgmSource`] is a [`TensorSource`] that serves a single-file checkpoint under the keys of a
//! diffusers folder, one level per component: `unet.down_blocks.1.attentions.0.proj_in.weight`,
//! `vae.decoder.up_blocks.0.resnets.0.conv1.weight`,
//! `text_encoder.text_model.encoder.layers.0.mlp.fc1.weight`,
//! `text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight`, … so the model
//! constructors load it unchanged. Its table maps each diffusers key to the stored key and the
//! transform that turns the stored tensor into the diffusers one:
//!
//! - OpenCLIP's fused `attn.in_proj_{weight,bias}` (`cat(q, k, v)` along dim 0) is split into
//!   thirds for `self_attn.{q,k,v}_proj`;
//! - OpenCLIP's `text_projection` is used as `x @ P`, so it is the transpose of the
//!   `text_projection.weight` of transformers' `Linear`;
//! - the VAE's attention `q`/`k`/`v`/`proj_out` are 1×1 convolutions `[C, C, 1, 1]`, squeezed to
//!   diffusers' `Linear` shape `[C, C]`.
//!
//! The renaming is the inverse of diffusers' single-file loader
//! (`diffusers/loaders/single_file_utils.py`) and is driven by two counts inferred from the file:
//! the UNet's `layers_per_block` (input block `k ≥ 1` is down block `(k-1) / (L+1)`, slot
//! `(k-1) % (L+1)`, the last slot being the downsampler; output block `k` is up block
//! `k / (L+1)`, slot `k % (L+1)`) and the VAE's number of levels (the decoder's levels are
//! stored in reverse: `decoder.up.i` is `decoder.up_blocks.{n-1-i}`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::matmul::PackedWeight;
use crate::loading::{SafetensorsFiles, TensorSource};

/// Key prefix of the UNet.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Key prefix of the VAE.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Key prefix of CLIP ViT-L (the base's first text encoder), transformers names below it.
pub const CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Key prefix of OpenCLIP ViT-bigG in the base (open_clip names below it).
pub const BIGG_PREFIX_BASE: &str = "conditioner.embedders.1.model.";
/// Key prefix of OpenCLIP ViT-bigG in the refiner, whose only embedder it is.
pub const BIGG_PREFIX_REFINER: &str = "conditioner.embedders.0.model.";

/// First key level of the adapted UNet (as the diffusers subfolder).
pub const UNET: &str = "unet";
/// First key level of the adapted VAE.
pub const VAE: &str = "vae";
/// First key level of the adapted CLIP ViT-L.
pub const TEXT_ENCODER: &str = "text_encoder";
/// First key level of the adapted OpenCLIP ViT-bigG.
pub const TEXT_ENCODER_2: &str = "text_encoder_2";

/// Stored keys that are not weights of the models and are skipped: the CLIP-L `position_ids`
/// buffer old transformers saved, and open_clip's `logit_scale`.
const EXTRAS: [&str; 2] = ["embeddings.position_ids", "logit_scale"];

/// `(SGM name, diffusers name)` of the UNet resnet sub-modules.
const UNET_RESNET: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// `(SGM name, diffusers name)` of the VAE mid-block attention sub-modules.
const VAE_ATTENTION: [(&str, &str); 5] = [
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
];

/// `(open_clip name, transformers name)` inside one OpenCLIP residual block.
const BIGG_BLOCK: [(&str, &str); 5] = [
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
];

/// The counts the mapping depends on, inferred from the stored keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutCounts {
    /// Resnets per UNet down block (`layers_per_block`).
    pub unet_layers_per_block: usize,
    /// Levels of the VAE encoder and decoder.
    pub vae_levels: usize,
    /// Key prefix of OpenCLIP ViT-bigG ([`BIGG_PREFIX_BASE`] or [`BIGG_PREFIX_REFINER`]).
    pub bigg_prefix: &'static str,
}

/// How a diffusers tensor is made from the stored one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Used as stored.
    Same,
    /// Third `i` (0 = q, 1 = k, 2 = v) along dim 0 of a fused `in_proj` tensor.
    Third(usize),
    /// The transpose of a stored matrix.
    Transpose,
    /// A 1×1 convolution kernel `[O, I, 1, 1]` as a `Linear` weight `[O, I]`.
    Squeeze,
}

/// Where one diffusers tensor comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    stored: String,
    transform: Transform,
    shape: Vec<usize>,
}

/// A single-file checkpoint served under diffusers keys (see the module docs).
pub struct SgmSource {
    file: SafetensorsFiles,
    table: HashMap<String, Entry>,
    unmapped: Vec<String>,
}

impl std::fmt::Debug for SgmSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SgmSource")
            .field("file", &self.path())
            .field("tensors", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl SgmSource {
    /// Builds the diffusers view of `file` with the block counts of its models.
    ///
    /// # Errors
    /// [`Error::InvalidCheckpoint`] naming the stored key when a tensor the mapping transforms
    /// has a shape the transform cannot apply to (a fused `in_proj` whose rows are not a multiple
    /// of 3, a `text_projection` that is not a matrix).
    pub fn new(file: SafetensorsFiles, counts: LayoutCounts) -> Result<Self> {
        let mut table = HashMap::new();
        let mut unmapped = Vec::new();
        let path = file.files().first().cloned().unwrap_or_default();
        for stored in file.keys() {
            let Some(found) = diffusers_names(&stored, counts) else {
                continue;
            };
            if found.is_empty() {
                unmapped.push(stored);
                continue;
            }
            let shape = file.shape(&stored).ok_or_else(|| Error::MissingTensor {
                key: stored.clone(),
            })?;
            for (name, transform) in found {
                let shape = transformed_shape(&shape, transform).ok_or_else(|| {
                    Error::InvalidCheckpoint {
                        path: path.clone(),
                        reason: format!(
                            "tensor `{stored}` has shape {shape:?}, which cannot be read as \
                             {transform:?} for `{name}`"
                        ),
                    }
                })?;
                table.insert(
                    name,
                    Entry {
                        stored: stored.clone(),
                        transform,
                        shape,
                    },
                );
            }
        }
        unmapped.sort();
        Ok(Self {
            file,
            table,
            unmapped,
        })
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        self.file
            .files()
            .first()
            .map_or(Path::new(""), PathBuf::as_path)
    }

    /// The stored key a diffusers key is read from.
    pub fn stored_key(&self, key: &str) -> Option<&str> {
        self.table.get(key).map(|e| e.stored.as_str())
    }

    /// Stored keys under a model prefix that no diffusers key maps to (neither weights of the
    /// models nor the known extras), sorted. Empty for a well-formed SDXL file; useful to
    /// diagnose unusual checkpoints.
    pub fn unmapped_keys(&self) -> &[String] {
        &self.unmapped
    }
}

impl SgmSource {
    /// Where `key` lies in the file and how it is transformed.
    fn entry(&self, key: &str) -> Result<&Entry> {
        self.table
            .get(key)
            .ok_or_else(|| Error::MissingTensor { key: key.into() })
    }
}

impl TensorSource for SgmSource {
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.table.get(key).map(|e| e.shape.clone())
    }

    fn load(&self, key: &str, device: &Device) -> Result<Tensor> {
        let entry = self.entry(key)?;
        let stored = self.file.load(&entry.stored, device)?;
        transform(stored, entry)
    }

    fn load_as(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self.entry(key)?;
        let stored = self.file.load_as(&entry.stored, dtype, device)?;
        transform(stored, entry)
    }

    fn load_transposed(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self.entry(key)?;
        if matches!(entry.transform, Transform::Same) {
            return self.file.load_transposed(&entry.stored, dtype, device);
        }
        let t = transform(self.file.load_as(&entry.stored, dtype, device)?, entry)?;
        Ok(crate::kernels::transpose::transpose_2d(&t)?)
    }

    fn load_packed(&self, key: &str, device: &Device) -> Result<Option<PackedWeight>> {
        let entry = self.entry(key)?;
        if matches!(entry.transform, Transform::Same) {
            return self.file.load_packed(&entry.stored, device);
        }
        let weight = transform(
            self.file.load_as(&entry.stored, DType::BF16, device)?,
            entry,
        )?;
        Ok(PackedWeight::pack(&weight.t()?)?)
    }

    fn keys(&self) -> Vec<String> {
        self.table.keys().cloned().collect()
    }
}

/// Applies an entry's transform to the stored tensor.
fn transform(stored: Tensor, entry: &Entry) -> Result<Tensor> {
    Ok(match entry.transform {
        Transform::Same => stored,
        // A fresh buffer per third, so q, k and v do not each keep the whole fused tensor.
        Transform::Third(i) => {
            let rows = entry.shape.first().copied().unwrap_or(0);
            stored.narrow(0, i * rows, rows)?.force_contiguous()?
        }
        // Made contiguous once at load time: layers expect row-major weights.
        Transform::Transpose => stored.t()?.contiguous()?,
        Transform::Squeeze => stored.reshape(entry.shape.as_slice())?,
    })
}

/// The shape of a stored tensor after `transform`, or `None` when it does not apply.
fn transformed_shape(stored: &[usize], transform: Transform) -> Option<Vec<usize>> {
    match (transform, stored) {
        (Transform::Same, _) => Some(stored.to_vec()),
        (Transform::Third(_), [rows, rest @ ..]) if rows % 3 == 0 => {
            Some([&[rows / 3], rest].concat())
        }
        (Transform::Transpose, [a, b]) => Some(vec![*b, *a]),
        (Transform::Squeeze, [o, i, 1, 1]) => Some(vec![*o, *i]),
        (Transform::Squeeze, [_, _]) => Some(stored.to_vec()),
        _ => None,
    }
}

/// The diffusers keys (with their component level) a stored key provides: `None` for keys
/// outside the four model prefixes, an empty list for keys under them that map to nothing.
fn diffusers_names(stored: &str, counts: LayoutCounts) -> Option<Vec<(String, Transform)>> {
    let one = |component: &str, name: Option<String>| {
        name.map(|n| vec![(format!("{component}.{n}"), Transform::Same)])
            .unwrap_or_default()
    };
    if let Some(rest) = stored.strip_prefix(UNET_PREFIX) {
        return Some(one(UNET, unet_name(rest, counts.unet_layers_per_block)));
    }
    if let Some(rest) = stored.strip_prefix(VAE_PREFIX) {
        return Some(
            vae_name(rest, counts.vae_levels)
                .map(|(n, t)| vec![(format!("{VAE}.{n}"), t)])
                .unwrap_or_default(),
        );
    }
    if let Some(rest) = stored.strip_prefix(counts.bigg_prefix) {
        if EXTRAS.contains(&rest) {
            return None;
        }
        return Some(
            bigg_names(rest)
                .into_iter()
                .map(|(n, t)| (format!("{TEXT_ENCODER_2}.{n}"), t))
                .collect(),
        );
    }
    if let Some(rest) = stored.strip_prefix(CLIP_L_PREFIX) {
        let inner = rest.strip_prefix("text_model.").unwrap_or(rest);
        if EXTRAS.contains(&inner) {
            return None;
        }
        // transformers names, as diffusers' `text_encoder/` stores them.
        return Some(one(TEXT_ENCODER, Some(rest.to_string())));
    }
    None
}

/// `(first, second, rest)` of a dotted key.
fn split3(key: &str) -> Option<(&str, &str, &str)> {
    let (a, rest) = key.split_once('.')?;
    let (b, rest) = rest.split_once('.')?;
    Some((a, b, rest))
}

/// Renames a sub-module path through a `(from, to)` table: `from.tail` → `to.tail`.
fn rename(path: &str, table: &[(&str, &str)]) -> Option<String> {
    table.iter().find_map(|(from, to)| {
        path.strip_prefix(from)
            .and_then(|tail| tail.strip_prefix('.'))
            .map(|tail| format!("{to}.{tail}"))
    })
}

/// The diffusers UNet name of `rest` (the key after [`UNET_PREFIX`]).
fn unet_name(rest: &str, layers: usize) -> Option<String> {
    let per_block = layers + 1;
    let (first, second, tail) = split3(rest)?;
    let index = || second.parse::<usize>().ok();
    match first {
        "time_embed" | "out" => {
            let name = match (first, second) {
                ("time_embed", "0") => "time_embedding.linear_1",
                ("time_embed", "2") => "time_embedding.linear_2",
                ("out", "0") => "conv_norm_out",
                ("out", "2") => "conv_out",
                _ => return None,
            };
            Some(format!("{name}.{tail}"))
        }
        "label_emb" => {
            let (slot, param) = tail.split_once('.')?;
            let name = match (second, slot) {
                ("0", "0") => "add_embedding.linear_1",
                ("0", "2") => "add_embedding.linear_2",
                _ => return None,
            };
            Some(format!("{name}.{param}"))
        }
        "input_blocks" => {
            let k = index()?;
            let (slot, rest) = tail.split_once('.')?;
            if k == 0 {
                return (slot == "0").then(|| format!("conv_in.{rest}"));
            }
            let (block, j) = ((k - 1) / per_block, (k - 1) % per_block);
            match slot {
                "0" if j == layers => rest
                    .strip_prefix("op.")
                    .map(|p| format!("down_blocks.{block}.downsamplers.0.conv.{p}")),
                "0" => rename(rest, &UNET_RESNET)
                    .map(|r| format!("down_blocks.{block}.resnets.{j}.{r}")),
                "1" if j < layers => Some(format!("down_blocks.{block}.attentions.{j}.{rest}")),
                _ => None,
            }
        }
        "middle_block" => match second {
            "0" => rename(tail, &UNET_RESNET).map(|r| format!("mid_block.resnets.0.{r}")),
            "1" => Some(format!("mid_block.attentions.0.{tail}")),
            "2" => rename(tail, &UNET_RESNET).map(|r| format!("mid_block.resnets.1.{r}")),
            _ => None,
        },
        "output_blocks" => {
            let k = index()?;
            let (slot, rest) = tail.split_once('.')?;
            let (block, j) = (k / per_block, k % per_block);
            let upsampler = || {
                rest.strip_prefix("conv.")
                    .filter(|_| j == layers)
                    .map(|p| format!("up_blocks.{block}.upsamplers.0.conv.{p}"))
            };
            match slot {
                "0" => {
                    rename(rest, &UNET_RESNET).map(|r| format!("up_blocks.{block}.resnets.{j}.{r}"))
                }
                // An up block without attention has its upsampler in slot 1.
                "1" if rest.starts_with("conv.") => upsampler(),
                "1" => Some(format!("up_blocks.{block}.attentions.{j}.{rest}")),
                "2" => upsampler(),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The diffusers VAE name and transform of `rest` (the key after [`VAE_PREFIX`]).
fn vae_name(rest: &str, levels: usize) -> Option<(String, Transform)> {
    let same = |name: String| Some((name, Transform::Same));
    if rest.starts_with("quant_conv.") || rest.starts_with("post_quant_conv.") {
        return same(rest.to_string());
    }
    let (side, tail) = rest.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let resnet = |path: &str| path.replace("nin_shortcut", "conv_shortcut");
    let (first, second, inner) = match split3(tail) {
        Some(parts) => parts,
        None => {
            let (module, param) = tail.split_once('.')?;
            let module = match module {
                "conv_in" | "conv_out" => module,
                "norm_out" => "conv_norm_out",
                _ => return None,
            };
            return same(format!("{side}.{module}.{param}"));
        }
    };
    match (side, first) {
        ("encoder", "down") | ("decoder", "up") => {
            let i = second.parse::<usize>().ok()?;
            let (blocks, level, sampler, samplers) = if side == "encoder" {
                ("down_blocks", i, "downsample.conv.", "downsamplers")
            } else {
                (
                    "up_blocks",
                    levels.checked_sub(i + 1)?,
                    "upsample.conv.",
                    "upsamplers",
                )
            };
            if let Some(r) = inner.strip_prefix("block.") {
                let (j, r) = r.split_once('.')?;
                same(format!("{side}.{blocks}.{level}.resnets.{j}.{}", resnet(r)))
            } else {
                let p = inner.strip_prefix(sampler)?;
                same(format!("{side}.{blocks}.{level}.{samplers}.0.conv.{p}"))
            }
        }
        (_, "mid") => {
            let (module, param) = inner.rsplit_once('.')?;
            match second {
                "block_1" => same(format!("{side}.mid_block.resnets.0.{}", resnet(inner))),
                "block_2" => same(format!("{side}.mid_block.resnets.1.{}", resnet(inner))),
                "attn_1" => {
                    let (_, to) = VAE_ATTENTION.iter().find(|(from, _)| *from == module)?;
                    let transform = if module != "norm" && param == "weight" {
                        Transform::Squeeze
                    } else {
                        Transform::Same
                    };
                    Some((
                        format!("{side}.mid_block.attentions.0.{to}.{param}"),
                        transform,
                    ))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The transformers names and transforms of `rest` (the key after the OpenCLIP prefix).
fn bigg_names(rest: &str) -> Vec<(String, Transform)> {
    let same = |name: String| vec![(name, Transform::Same)];
    match rest {
        "token_embedding.weight" => {
            return same("text_model.embeddings.token_embedding.weight".into())
        }
        "positional_embedding" => {
            return same("text_model.embeddings.position_embedding.weight".into())
        }
        "text_projection" => return vec![("text_projection.weight".into(), Transform::Transpose)],
        _ => {}
    }
    if let Some(param) = rest.strip_prefix("ln_final.") {
        return same(format!("text_model.final_layer_norm.{param}"));
    }
    let Some((n, inner)) = rest
        .strip_prefix("transformer.resblocks.")
        .and_then(|r| r.split_once('.'))
    else {
        return Vec::new();
    };
    let layer = format!("text_model.encoder.layers.{n}");
    if let Some(param) = inner.strip_prefix("attn.in_proj_") {
        return ["q", "k", "v"]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    format!("{layer}.self_attn.{p}_proj.{param}"),
                    Transform::Third(i),
                )
            })
            .collect();
    }
    rename(inner, &BIGG_BLOCK)
        .map(|r| same(format!("{layer}.{r}")))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BASE: LayoutCounts = LayoutCounts {
        unet_layers_per_block: 2,
        vae_levels: 4,
        bigg_prefix: BIGG_PREFIX_BASE,
    };

    fn name(stored: &str) -> Vec<(String, Transform)> {
        diffusers_names(stored, BASE).unwrap()
    }

    fn same(stored: &str) -> String {
        let found = name(stored);
        assert_eq!(found.len(), 1, "{stored}: {found:?}");
        assert_eq!(found[0].1, Transform::Same, "{stored}");
        found[0].0.clone()
    }

    #[test]
    fn unet_blocks_follow_layers_per_block() {
        let u = |k: &str| same(&format!("{UNET_PREFIX}{k}"));
        assert_eq!(u("input_blocks.0.0.weight"), "unet.conv_in.weight");
        assert_eq!(u("time_embed.2.bias"), "unet.time_embedding.linear_2.bias");
        assert_eq!(
            u("label_emb.0.0.weight"),
            "unet.add_embedding.linear_1.weight"
        );
        assert_eq!(u("out.0.weight"), "unet.conv_norm_out.weight");
        assert_eq!(
            u("input_blocks.4.0.skip_connection.weight"),
            "unet.down_blocks.1.resnets.0.conv_shortcut.weight"
        );
        assert_eq!(
            u("input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight"),
            "unet.down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k.weight"
        );
        assert_eq!(
            u("input_blocks.6.0.op.bias"),
            "unet.down_blocks.1.downsamplers.0.conv.bias"
        );
        assert_eq!(
            u("middle_block.2.emb_layers.1.weight"),
            "unet.mid_block.resnets.1.time_emb_proj.weight"
        );
        assert_eq!(
            u("output_blocks.5.2.conv.weight"),
            "unet.up_blocks.1.upsamplers.0.conv.weight"
        );
        assert_eq!(
            u("output_blocks.2.1.conv.weight"),
            "unet.up_blocks.0.upsamplers.0.conv.weight"
        );
        assert_eq!(
            u("output_blocks.7.1.proj_in.weight"),
            "unet.up_blocks.2.attentions.1.proj_in.weight"
        );
        assert_eq!(
            u("output_blocks.8.0.out_layers.3.weight"),
            "unet.up_blocks.2.resnets.2.conv2.weight"
        );
        // Two-digit block indices are not confused with one-digit prefixes.
        let three = LayoutCounts {
            unet_layers_per_block: 3,
            ..BASE
        };
        let found =
            diffusers_names(&format!("{UNET_PREFIX}input_blocks.12.0.op.weight"), three).unwrap();
        assert_eq!(found[0].0, "unet.down_blocks.2.downsamplers.0.conv.weight");
        assert!(name(&format!("{UNET_PREFIX}input_blocks.3.1.proj_in.weight")).is_empty());
    }

    #[test]
    fn vae_decoder_levels_are_reversed_and_attention_squeezed() {
        let v = |k: &str| name(&format!("{VAE_PREFIX}{k}"));
        assert_eq!(
            v("decoder.up.3.block.0.nin_shortcut.weight")[0].0,
            "vae.decoder.up_blocks.0.resnets.0.conv_shortcut.weight"
        );
        assert_eq!(
            v("decoder.up.1.upsample.conv.bias")[0].0,
            "vae.decoder.up_blocks.2.upsamplers.0.conv.bias"
        );
        assert_eq!(
            v("encoder.down.0.downsample.conv.weight")[0].0,
            "vae.encoder.down_blocks.0.downsamplers.0.conv.weight"
        );
        assert_eq!(
            v("encoder.mid.attn_1.proj_out.weight")[0],
            (
                "vae.encoder.mid_block.attentions.0.to_out.0.weight".to_string(),
                Transform::Squeeze
            )
        );
        assert_eq!(
            v("decoder.mid.attn_1.norm.weight")[0],
            (
                "vae.decoder.mid_block.attentions.0.group_norm.weight".to_string(),
                Transform::Same
            )
        );
        assert_eq!(
            v("decoder.norm_out.bias")[0].0,
            "vae.decoder.conv_norm_out.bias"
        );
        assert_eq!(
            v("post_quant_conv.weight")[0].0,
            "vae.post_quant_conv.weight"
        );
        assert!(v("decoder.up.4.upsample.conv.bias").is_empty());
    }

    #[test]
    fn open_clip_names_split_fused_projections() {
        let found = name(&format!(
            "{BIGG_PREFIX_BASE}transformer.resblocks.3.attn.in_proj_weight"
        ));
        let names: Vec<_> = found.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        assert_eq!(
            names,
            [
                (
                    "text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj.weight",
                    Transform::Third(0)
                ),
                (
                    "text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj.weight",
                    Transform::Third(1)
                ),
                (
                    "text_encoder_2.text_model.encoder.layers.3.self_attn.v_proj.weight",
                    Transform::Third(2)
                ),
            ]
        );
        assert_eq!(
            name(&format!("{BIGG_PREFIX_BASE}text_projection")),
            [(
                "text_encoder_2.text_projection.weight".to_string(),
                Transform::Transpose
            )]
        );
        assert_eq!(
            same(&format!(
                "{BIGG_PREFIX_BASE}transformer.resblocks.0.mlp.c_proj.bias"
            )),
            "text_encoder_2.text_model.encoder.layers.0.mlp.fc2.bias"
        );
        assert_eq!(
            same(&format!("{BIGG_PREFIX_BASE}positional_embedding")),
            "text_encoder_2.text_model.embeddings.position_embedding.weight"
        );
        assert!(diffusers_names(&format!("{BIGG_PREFIX_BASE}logit_scale"), BASE).is_none());
        assert!(diffusers_names(
            &format!("{CLIP_L_PREFIX}text_model.embeddings.position_ids"),
            BASE
        )
        .is_none());
        assert_eq!(
            same(&format!(
                "{CLIP_L_PREFIX}text_model.final_layer_norm.weight"
            )),
            "text_encoder.text_model.final_layer_norm.weight"
        );
    }

    #[test]
    fn transforms_check_stored_shapes() {
        assert_eq!(
            transformed_shape(&[96, 32], Transform::Third(2)),
            Some(vec![32, 32])
        );
        assert_eq!(transformed_shape(&[95, 32], Transform::Third(0)), None);
        assert_eq!(
            transformed_shape(&[32, 16], Transform::Transpose),
            Some(vec![16, 32])
        );
        assert_eq!(transformed_shape(&[32], Transform::Transpose), None);
        assert_eq!(
            transformed_shape(&[8, 8, 1, 1], Transform::Squeeze),
            Some(vec![8, 8])
        );
        assert_eq!(transformed_shape(&[8, 8, 3, 3], Transform::Squeeze), None);
    }
}
