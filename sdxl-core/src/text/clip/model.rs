//! The CLIP text transformer: token and position embeddings, pre-norm encoder layers with causal
//! self-attention, a final layer norm, EOS pooling and the optional text projection.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use crate::kernels::attention::{self, AttentionSpec};
use crate::kernels::matmul::matmul;
use crate::kernels::parallel::on_pool;
use crate::layers::Linear;

use super::config::{Activation, ClipTextConfig};
use crate::error::{Error, Result};
use crate::layers::{layer_norm, linear, LayerNorm};
use crate::loading::{component_weight_files, read_json, Weights};

/// Key of the token table under the text transformer's prefix, used to find that prefix.
const TOKEN_EMBEDDING_KEY: &str = "embeddings.token_embedding.weight";

/// The legacy `eos_token_id` of configs that pool at the largest token id.
const LEGACY_EOS_TOKEN_ID: i64 = 2;

/// What one pass of a [`ClipTextModel`] produces, for token ids `[B, S]`.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// The input of the last encoder layer (`hidden_states[-2]`), `[B, S, hidden_size]`: SDXL's
    /// prompt embeddings.
    pub penultimate: Tensor,
    /// The last encoder layer's output after `final_layer_norm`, `[B, S, hidden_size]`.
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at each row's end-of-text position, `[B, hidden_size]` (transformers'
    /// `pooler_output`).
    pub pooled: Tensor,
    /// `pooled` through `text_projection`, `[B, projection_dim]`, for encoders with a projection:
    /// SDXL's pooled prompt embedding.
    pub text_embeds: Option<Tensor>,
    /// Every hidden state, `num_hidden_layers + 1` tensors `[B, S, hidden_size]`: the embeddings,
    /// then each layer's output (without the final layer norm). Only filled by
    /// [`ClipTextModel::forward_with_hidden_states`].
    pub hidden_states: Option<Vec<Tensor>>,
}

/// What SDXL reads from one text encoder for token ids `[B, S]`, computed by
/// [`ClipTextModel::prompt_embeddings`].
#[derive(Debug, Clone)]
pub struct ClipPromptEmbeddings {
    /// The input of the last encoder layer (`hidden_states[-2]`), `[B, S, hidden_size]`: the
    /// same tensor as [`ClipTextOutput::penultimate`].
    pub penultimate: Tensor,
    /// For encoders with a projection, the projected pooled embedding `[B, projection_dim]`:
    /// [`ClipTextOutput::text_embeds`], computed from the pooling positions only.
    pub text_embeds: Option<Tensor>,
}

/// A CLIP text encoder: transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` when it
/// has a `text_projection`.
///
/// SDXL uses OpenAI CLIP ViT-L (`text_encoder`, no projection) and OpenCLIP ViT-bigG
/// (`text_encoder_2`, with projection). Tensors stay in the weights' dtype; softmax and layer norms
/// accumulate in f32, so f16 and bf16 weights are safe.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    /// `[P, P]` f32, `-inf` above the diagonal, for `P = max_position_embeddings`.
    causal_mask: Tensor,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the encoder from a checkpoint's root.
    ///
    /// The text transformer is read under `text_model.` (the diffusers layout) or, when the
    /// checkpoint has no such prefix (transformers 5 saves `CLIPTextModel` without it), at the
    /// root. `text_projection` is loaded when the config's `architectures` names
    /// `CLIPTextModelWithProjection`, and, for configs that name no architecture, when the
    /// checkpoint has `text_projection.weight`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for an invalid config (see [`ClipTextConfig::validate`]),
    /// [`Error::InvalidArgument`] for a non-float dtype, [`Error::MissingTensor`] or
    /// [`Error::ShapeMismatch`] naming the full key.
    pub fn new(w: &Weights, cfg: &ClipTextConfig) -> Result<Self> {
        let with_projection = cfg
            .declares_projection()
            .unwrap_or_else(|| w.contains("text_projection.weight"));
        Self::new_with_projection(w, cfg, with_projection)
    }

    /// Like [`ClipTextModel::new`], with the caller deciding whether `text_projection.weight`
    /// (`[projection_dim, hidden_size]`, no bias) is loaded.
    ///
    /// # Errors
    /// As [`ClipTextModel::new`].
    pub fn new_with_projection(
        w: &Weights,
        cfg: &ClipTextConfig,
        with_projection: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        if !w.dtype().is_float() {
            return Err(Error::invalid(format!(
                "CLIP text encoder weights must be read as a float dtype, not {:?}",
                w.dtype()
            )));
        }
        let tm = text_model_root(w);
        let h = cfg.hidden_size;
        let emb = tm.pp("embeddings");
        let token_embedding = emb
            .pp("token_embedding")
            .get((cfg.vocab_size, h), "weight")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, h), "weight")?;
        let activation = Activation::parse(&cfg.hidden_act)?;
        let layers_w = tm.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&layers_w.pp(i), cfg, activation))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(h, cfg.layer_norm_eps, &tm.pp("final_layer_norm"))?;
        let text_projection = if with_projection {
            Some(linear(
                h,
                cfg.projection_dim,
                false,
                &w.pp("text_projection"),
            )?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            causal_mask: causal_mask(cfg.max_position_embeddings, w.device())?,
            config: cfg.clone(),
        })
    }

    /// Loads a diffusers component folder (`text_encoder/` or `text_encoder_2/`): its
    /// `config.json` and `model[.<variant>].safetensors` (or its shards), as `dtype` on `device`.
    ///
    /// # Errors
    /// [`Error::NotFound`] when `dir`, its config or its weights are absent; [`Error::Json`],
    /// [`Error::InvalidCheckpoint`], and the errors of [`ClipTextModel::new`].
    pub fn load(dir: &Path, dtype: DType, device: &Device, variant: Option<&str>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                what: "CLIP text encoder folder".into(),
            });
        }
        let cfg: ClipTextConfig = read_json(&dir.join("config.json"), "CLIP text encoder config")?;
        let files = component_weight_files(dir, "model", variant)?;
        let w = Weights::from_safetensors(&files, dtype, device)?;
        Self::new(&w, &cfg)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Whether the model has a `text_projection` (and so produces `text_embeds`).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Calls `f` on every linear layer with its transformers module name (the checkpoint key
    /// without `.weight`, in the `text_model.` layout that SDXL checkpoints and LoRA files use):
    /// `text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj`,
    /// `text_model.encoder.layers.N.mlp.fc1/fc2` and, when present, `text_projection`. This is how
    /// weights are edited in place (e.g. fusing a LoRA).
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_linears_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Linear) -> Result<()>,
    ) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("text_model.encoder.layers.{i}");
            let attn = &mut layer.self_attn;
            f(&format!("{prefix}.self_attn.q_proj"), &mut attn.q_proj)?;
            f(&format!("{prefix}.self_attn.k_proj"), &mut attn.k_proj)?;
            f(&format!("{prefix}.self_attn.v_proj"), &mut attn.v_proj)?;
            f(&format!("{prefix}.self_attn.out_proj"), &mut attn.out_proj)?;
            f(&format!("{prefix}.mlp.fc1"), &mut layer.fc1)?;
            f(&format!("{prefix}.mlp.fc2"), &mut layer.fc2)?;
        }
        if let Some(p) = &mut self.text_projection {
            f("text_projection", p)?;
        }
        Ok(())
    }

    /// Encodes token ids `[B, S]` (u32 or i64, on any device), `S <= max_position_embeddings`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for ids of another rank or dtype, an empty batch or sequence, a
    /// sequence longer than the position table, or an id outside the vocabulary; tensor
    /// failures.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        self.run(input_ids, false)
    }

    /// Like [`ClipTextModel::forward`], also returning every hidden state in
    /// [`ClipTextOutput::hidden_states`] (e.g. for `clip_skip`: `hidden_states[-(skip + 2)]`).
    ///
    /// # Errors
    /// As [`ClipTextModel::forward`].
    pub fn forward_with_hidden_states(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        self.run(input_ids, true)
    }

    /// What SDXL reads from this encoder, with less work than [`ClipTextModel::forward`]: the
    /// penultimate hidden states and, for an encoder with a projection, the projected pooled
    /// embedding.
    ///
    /// The last layer's output is read only at each row's pooling position, and only through
    /// the projection. So without a projection (SDXL's CLIP-L) the last layer does not run, and
    /// with one (OpenCLIP bigG) it runs for the pooling positions alone: their queries attend
    /// to keys and values of every position, as in the full pass. At SDXL's 77 tokens this
    /// skips a twelfth of CLIP-L's work and most of bigG's last layer. `penultimate` is
    /// bit-identical to the full pass's; `text_embeds` agrees up to the rounding of a
    /// different attention kernel.
    ///
    /// # Errors
    /// As [`ClipTextModel::forward`].
    pub fn prompt_embeddings(&self, input_ids: &Tensor) -> Result<ClipPromptEmbeddings> {
        on_pool(|| self.prompt_embeddings_here(input_ids))
    }

    /// One full pass, on the compute pool ([`on_pool`]).
    fn run(&self, input_ids: &Tensor, keep_all: bool) -> Result<ClipTextOutput> {
        on_pool(|| self.run_here(input_ids, keep_all))
    }

    /// The token and position embeddings `[B, S, hidden_size]` of checked ids, and the causal
    /// mask `[S, S]`.
    fn embed(&self, ids: &TokenIds) -> Result<(Tensor, Tensor)> {
        let (b, s, h) = (ids.batch, ids.seq, self.config.hidden_size);
        let device = self.token_embedding.device();
        let index = Tensor::new(ids.ids.as_slice(), device)?;
        let tokens = self
            .token_embedding
            .index_select(&index, 0)?
            .reshape((b, s, h))?;
        let hidden = tokens.broadcast_add(&self.position_embedding.narrow(0, 0, s)?)?;
        let mask = self.causal_mask.narrow(0, 0, s)?.narrow(1, 0, s)?;
        Ok((hidden, mask))
    }

    fn prompt_embeddings_here(&self, input_ids: &Tensor) -> Result<ClipPromptEmbeddings> {
        let ids = TokenIds::read(input_ids, &self.config)?;
        let (mut hidden, mask) = self.embed(&ids)?;
        // `validate` guarantees at least one layer.
        let Some((last, earlier)) = self.layers.split_last() else {
            return Err(Error::unsupported("CLIP text encoder without layers"));
        };
        for layer in earlier {
            hidden = layer.forward(&hidden, &mask)?;
        }
        let text_embeds = match &self.text_projection {
            Some(projection) => {
                let pooled = last.forward_at(&hidden, &ids.pool_positions, &mask)?;
                Some(projection.forward(&self.final_layer_norm.forward(&pooled)?)?)
            }
            None => None,
        };
        Ok(ClipPromptEmbeddings {
            penultimate: hidden,
            text_embeds,
        })
    }

    fn run_here(&self, input_ids: &Tensor, keep_all: bool) -> Result<ClipTextOutput> {
        let ids = TokenIds::read(input_ids, &self.config)?;
        let (mut hidden, mask) = self.embed(&ids)?;

        let mut all = keep_all.then(|| Vec::with_capacity(self.layers.len() + 1));
        let mut penultimate = hidden.clone();
        for layer in &self.layers {
            if let Some(all) = all.as_mut() {
                all.push(hidden.clone());
            }
            penultimate = hidden;
            hidden = layer.forward(&penultimate, &mask)?;
        }
        if let Some(all) = all.as_mut() {
            all.push(hidden.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&hidden)?;

        let pooled = rows_at(&last_hidden_state, &ids.pool_positions)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput {
            penultimate,
            last_hidden_state,
            pooled,
            text_embeds,
            hidden_states: all,
        })
    }
}

/// The text transformer's prefix: `text_model`, or the root when only the root has the
/// embeddings.
fn text_model_root(w: &Weights) -> Weights {
    let nested = w.pp("text_model");
    if !nested.contains(TOKEN_EMBEDDING_KEY) && w.contains(TOKEN_EMBEDDING_KEY) {
        w.clone()
    } else {
        nested
    }
}

/// `[n, n]` f32 with `-inf` above the diagonal and zeros elsewhere.
fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (n, n), device)?)
}

fn flat_index(i: usize) -> Result<u32> {
    u32::try_from(i).map_err(|_| Error::invalid(format!("token batch too large ({i} tokens)")))
}

/// Row `positions[b]` of each batch entry of `x` `[B, S, H]`, as `[B, H]`.
fn rows_at(x: &Tensor, positions: &[usize]) -> Result<Tensor> {
    let (b, s, h) = x.dims3()?;
    let rows = positions
        .iter()
        .enumerate()
        .map(|(row, &pos)| flat_index(row * s + pos))
        .collect::<Result<Vec<u32>>>()?;
    let index = Tensor::from_vec(rows, b, x.device())?;
    Ok(x.reshape((b * s, h))?.index_select(&index, 0)?)
}

/// Token ids read to the host and checked, with each row's pooling position.
struct TokenIds {
    /// Row-major ids, `batch * seq`.
    ids: Vec<u32>,
    batch: usize,
    seq: usize,
    pool_positions: Vec<usize>,
}

impl TokenIds {
    fn read(input_ids: &Tensor, cfg: &ClipTextConfig) -> Result<Self> {
        let (batch, seq) = match *input_ids.dims() {
            [b, s] if b > 0 && s > 0 && s <= cfg.max_position_embeddings => (b, s),
            _ => {
                return Err(Error::invalid(format!(
                    "CLIP input ids must be [1.., 1..={}], got {:?}",
                    cfg.max_position_embeddings,
                    input_ids.dims()
                )))
            }
        };
        let rows: Vec<Vec<i64>> = match input_ids.dtype() {
            DType::I64 => input_ids.to_vec2::<i64>()?,
            DType::U32 => input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?,
            other => {
                return Err(Error::invalid(format!(
                    "CLIP input ids must be u32 or i64, got {other:?}"
                )))
            }
        };
        let mut ids = Vec::with_capacity(batch * seq);
        for &id in rows.iter().flatten() {
            match u32::try_from(id) {
                Ok(v) if (v as usize) < cfg.vocab_size => ids.push(v),
                _ => {
                    return Err(Error::invalid(format!(
                        "token id {id} is outside the vocabulary of {} tokens",
                        cfg.vocab_size
                    )))
                }
            }
        }
        let pool_positions = rows
            .iter()
            .map(|row| pool_position(row, cfg.eos_token_id))
            .collect();
        Ok(Self {
            ids,
            batch,
            seq,
            pool_positions,
        })
    }
}

/// The position transformers pools at: with the legacy `eos_token_id == 2`, the first largest
/// id (the end-of-text token has the largest id); otherwise the first `eos_token_id`, or 0 when
/// the row has none.
fn pool_position(row: &[i64], eos_token_id: i64) -> usize {
    if eos_token_id == LEGACY_EOS_TOKEN_ID {
        let mut best = (0, i64::MIN);
        for (i, &id) in row.iter().enumerate() {
            if id > best.1 {
                best = (i, id);
            }
        }
        best.0
    } else {
        row.iter().position(|&id| id == eos_token_id).unwrap_or(0)
    }
}

/// One pre-norm encoder layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    activation: Activation,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(w: &Weights, cfg: &ClipTextConfig, activation: Activation) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let mlp = w.pp("mlp");
        Ok(Self {
            layer_norm1: layer_norm(h, eps, &w.pp("layer_norm1"))?,
            self_attn: Attention::new(&w.pp("self_attn"), cfg)?,
            layer_norm2: layer_norm(h, eps, &w.pp("layer_norm2"))?,
            fc1: linear(h, i, true, &mlp.pp("fc1"))?,
            activation,
            fc2: linear(i, h, true, &mlp.pp("fc2"))?,
        })
    }

    /// The residual adds happen inside `out_proj` and `fc2` (see [`Linear::forward_residual`]).
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask, x)?;
        let mlp = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        Ok(self
            .fc2
            .forward_residual(&self.activation.forward(&mlp)?, &x)?)
    }

    /// The layer's output `[B, H]` at one position per batch entry (`positions[b]`) of `x`
    /// `[B, S, H]`: the queries of those positions attend to every position's keys and values
    /// under `mask` `[S, S]`, and the rest of the layer runs on those rows alone.
    fn forward_at(&self, x: &Tensor, positions: &[usize], mask: &Tensor) -> Result<Tensor> {
        let (b, _, h) = x.dims3()?;
        let normed = self.layer_norm1.forward(x)?;
        let index = Tensor::from_vec(
            positions
                .iter()
                .map(|&p| flat_index(p))
                .collect::<Result<Vec<u32>>>()?,
            b,
            x.device(),
        )?;
        // Each query row's mask row, `[B, 1, 1, S]` to broadcast over heads.
        let row_mask = mask.index_select(&index, 0)?.unsqueeze(1)?.unsqueeze(1)?;
        let at = |t: &Tensor| -> Result<Tensor> { Ok(rows_at(t, positions)?.reshape((b, 1, h))?) };
        let x = self
            .self_attn
            .forward_queries(&at(&normed)?, &normed, &row_mask, &at(x)?)?;
        let mlp = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        Ok(self
            .fc2
            .forward_residual(&self.activation.forward(&mlp)?, &x)?
            .reshape((b, h))?)
    }
}

/// Multi-head causal self-attention: the fused kernel on the CPU, elsewhere all heads in one
/// batched matmul.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(w: &Weights, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = cfg.head_dim()?;
        Ok(Self {
            q_proj: linear(h, h, true, &w.pp("q_proj"))?,
            k_proj: linear(h, h, true, &w.pp("k_proj"))?,
            v_proj: linear(h, h, true, &w.pp("v_proj"))?,
            out_proj: linear(h, h, true, &w.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `residual + attention(x)` for `x` and `residual` `[B, S, H]`; `mask` `[S, S]` f32 is
    /// added to the scores: the causal mask, which the fused CPU kernel
    /// ([`crate::kernels::attention`]) applies itself where it runs.
    fn forward(&self, x: &Tensor, mask: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (
            self.q_proj.forward(x)?,
            self.k_proj.forward(x)?,
            self.v_proj.forward(x)?,
        );
        if attention::supports(&q, &k, &v) {
            let spec = AttentionSpec {
                heads: self.heads,
                scale: self.scale as f32,
                causal: true,
            };
            let out = attention::attention(&q, &k, &v, spec)?;
            return Ok(self.out_proj.forward_residual(&out, residual)?);
        }
        let out = self.attend(q, k, v, mask)?;
        Ok(self.out_proj.forward_residual(&out, residual)?)
    }

    /// `residual + attention` for the queries of `x` `[B, T, H]` over the keys and values of
    /// `context` `[B, S, H]`, with `mask` (broadcast to `[B, heads, T, S]`) added to the scores.
    fn forward_queries(
        &self,
        x: &Tensor,
        context: &Tensor,
        mask: &Tensor,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let q = self.q_proj.forward(x)?;
        let (k, v) = (self.k_proj.forward(context)?, self.v_proj.forward(context)?);
        let out = self.attend(q, k, v, mask)?;
        Ok(self.out_proj.forward_residual(&out, residual)?)
    }

    /// Softmax attention of projected `q` `[B, T, H]` over `k` and `v` `[B, S, H]`, all heads in
    /// one batched matmul, `mask` added to the f32 scores; `[B, T, H]`.
    fn attend(&self, q: Tensor, k: Tensor, v: Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, h) = q.dims3()?;
        let heads = |x: Tensor| -> Result<Tensor> {
            let rows = x.dim(1)?;
            Ok(x.reshape((b, rows, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads((q * self.scale)?)?;
        let k = heads(k)?;
        let v = heads(v)?;
        let scores = matmul(&q, &k.t()?)?
            .to_dtype(DType::F32)?
            .broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        Ok(matmul(&probs, &v)?.transpose(1, 2)?.reshape((b, t, h))?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn legacy_pooling_takes_first_largest_id() {
        let row = [49406, 320, 49407, 49407, 49407];
        assert_eq!(pool_position(&row, LEGACY_EOS_TOKEN_ID), 2);
        assert_eq!(pool_position(&[5, 9, 9, 1], LEGACY_EOS_TOKEN_ID), 1);
    }

    #[test]
    fn eos_pooling_takes_first_eos_or_zero() {
        assert_eq!(pool_position(&[49406, 320, 49407, 0, 0], 49407), 2);
        assert_eq!(pool_position(&[49406, 320, 7], 49407), 0);
        // Not the largest id: a literal id above EOS does not move the pooling position.
        assert_eq!(pool_position(&[49406, 49407, 49500], 49407), 1);
    }

    #[test]
    fn causal_mask_hides_the_future() {
        let m = causal_mask(3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0][0], 0.0);
        assert_eq!(m[0][1], f32::NEG_INFINITY);
        assert_eq!(m[2][1], 0.0);
        assert_eq!(m[1][2], f32::NEG_INFINITY);
    }
}
