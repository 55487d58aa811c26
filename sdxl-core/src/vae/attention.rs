//! The VAE mid-block self-attention (diffusers' `Attention` built with
//! `_from_deprecated_attn_block=True`): one head as wide as the channel count, over the
//! flattened `H*W` pixels, with a group norm in front and a residual connection.

use candle_core::{DType, Module, Tensor};

use crate::error::Result;
use crate::kernels::attention::{self, AttentionSpec};
use crate::kernels::matmul::matmul;
use crate::layers::{group_norm, GroupNorm, Linear};
use crate::loading::Weights;

/// Most attention-score elements materialised at once (per forward call, over the batch) where
/// the fused CPU kernel does not run: 2^24, 64 MiB in float32. Larger inputs are processed in
/// chunks of query tokens, with the same numerics as one big softmax since every query row is
/// independent.
const MAX_SCORE_ELEMENTS: usize = 1 << 24;

/// Group-normalised single-head self-attention with a residual connection.
///
/// Weights are read under the current names (`to_q`, `to_k`, `to_v`, `to_out.0`) or the older
/// ones (`query`, `key`, `value`, `proj_attn`), each either Linear-shaped `[C, C]` or stored as a
/// 1×1 convolution `[C, C, 1, 1]`, as single-file checkpoints do.
#[derive(Debug, Clone)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
}

impl VaeAttention {
    /// Loads the layer from `w` (e.g. `decoder.mid_block.attentions.0`).
    ///
    /// # Errors
    /// Missing or misshapen tensors (named by their full key), or `groups` not dividing
    /// `channels`.
    pub fn new(w: &Weights, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, eps, &w.pp("group_norm"))?,
            to_q: projection(w, channels, "to_q", "query")?,
            to_k: projection(w, channels, "to_k", "key")?,
            to_v: projection(w, channels, "to_v", "value")?,
            to_out: projection(w, channels, "to_out.0", "proj_attn")?,
            scale: 1.0 / (channels as f64).sqrt(),
        })
    }

    /// `x + to_out(attention(group_norm(x)))` for `x` `[B, C, H, W]`.
    ///
    /// On the CPU the fused kernel ([`crate::kernels::attention`]) attends, keeping only a
    /// block of scores per thread; elsewhere (and for dtypes it does not run) the scores are
    /// materialised in chunks of query tokens.
    ///
    /// # Errors
    /// Tensor shape or device failures.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // [B, C, H, W] -> [B, H*W, C]. Made contiguous: candle 0.11.1's CPU matmul can
        // mis-read a transposed lhs whose rhs is shared across the batch (as in `Linear`).
        let hidden = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&hidden)?;
        let k = self.to_k.forward(&hidden)?;
        let v = self.to_v.forward(&hidden)?;
        let attended = if attention::supports(&q, &k, &v) {
            let spec = AttentionSpec {
                heads: 1,
                scale: self.scale as f32,
                causal: false,
            };
            attention::attention(&q, &k, &v, spec)?
        } else {
            attend_chunked(&(q * self.scale)?, &k.t()?, &v, MAX_SCORE_ELEMENTS)?
        };
        let out = self
            .to_out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok((out + x)?)
    }
}

/// `softmax(q · k_t) · v` for a pre-scaled `q` `[B, N, C]`, materialising at most `max_scores`
/// scores at a time (over the batch) by chunks of query tokens.
fn attend_chunked(q: &Tensor, k_t: &Tensor, v: &Tensor, max_scores: usize) -> Result<Tensor> {
    let (b, tokens, _) = q.dims3()?;
    let chunk = (max_scores / (b * tokens).max(1)).clamp(1, tokens.max(1));
    let mut outputs = Vec::with_capacity(tokens.div_ceil(chunk));
    let mut start = 0;
    while start < tokens {
        let len = chunk.min(tokens - start);
        let scores = matmul(&q.narrow(1, start, len)?, k_t)?;
        outputs.push(matmul(&softmax_last_dim(&scores)?, v)?);
        start += len;
    }
    Ok(Tensor::cat(&outputs, 1)?)
}

/// Softmax over the last dimension, computed in float32 for half-precision inputs (diffusers'
/// `upcast_softmax`).
fn softmax_last_dim(scores: &Tensor) -> Result<Tensor> {
    let dtype = scores.dtype();
    if matches!(dtype, DType::F16 | DType::BF16) {
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
        Ok(probs.to_dtype(dtype)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(scores)?)
    }
}

/// A `[C, C]` projection under `name`, or under the legacy `legacy` name when only that one is
/// present; 1×1-convolution shaped weights `[C, C, 1, 1]` are reshaped to `[C, C]`.
fn projection(w: &Weights, channels: usize, name: &str, legacy: &str) -> Result<Linear> {
    let weight_key = |n: &str| format!("{n}.weight");
    let w = if !w.contains(&weight_key(name)) && w.contains(&weight_key(legacy)) {
        w.pp(legacy)
    } else {
        w.pp(name)
    };
    let weight = if w.shape_of("weight")?.len() == 4 {
        w.get((channels, channels, 1, 1), "weight")?
            .reshape((channels, channels))?
    } else {
        w.get((channels, channels), "weight")?
    };
    let bias = w.get(channels, "bias")?;
    Ok(Linear::new(weight, Some(bias))?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use candle_core::Device;

    use super::*;
    use crate::error::Error;
    use crate::test_support::max_abs_diff;

    const C: usize = 8;

    fn random_weights(names: [&str; 4], conv_shaped: bool) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        map.insert(
            "attn.group_norm.weight".into(),
            (Tensor::randn(0f32, 0.1, C, &dev).unwrap() + 1.0).unwrap(),
        );
        map.insert(
            "attn.group_norm.bias".into(),
            Tensor::randn(0f32, 0.1, C, &dev).unwrap(),
        );
        for n in names {
            let weight = Tensor::randn(0f32, 0.5, (C, C), &dev).unwrap();
            let weight = if conv_shaped {
                weight.reshape((C, C, 1, 1)).unwrap()
            } else {
                weight
            };
            map.insert(format!("attn.{n}.weight"), weight);
            map.insert(
                format!("attn.{n}.bias"),
                Tensor::randn(0f32, 0.1, C, &dev).unwrap(),
            );
        }
        map
    }

    fn load(map: HashMap<String, Tensor>) -> Result<VaeAttention> {
        let w = Weights::new(Arc::new(map), DType::F32, &Device::Cpu);
        VaeAttention::new(&w.pp("attn"), C, 2, 1e-6)
    }

    /// Random q, k, v `[2, 35, C]`.
    fn qkv() -> [Tensor; 3] {
        [0, 1, 2].map(|_| Tensor::randn(0f32, 1.0, (2, 35, C), &Device::Cpu).unwrap())
    }

    #[test]
    fn chunked_matches_unchunked() {
        let [q, k, v] = qkv();
        let k_t = k.t().unwrap();
        let full = attend_chunked(&q, &k_t, &v, usize::MAX).unwrap();
        for budget in [1, 70, 2 * 35 * 6, 1000] {
            let chunked = attend_chunked(&q, &k_t, &v, budget).unwrap();
            // Chunking changes the matmul blocking, hence the last bits: allow a few f32 ulps of
            // the output's magnitude (random inputs have shown up to 6).
            let scale = full
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_abs_diff(&full, &chunked);
            assert!(
                d <= 16.0 * f32::EPSILON * scale.max(1.0),
                "budget {budget}: {d:e}"
            );
        }
    }

    #[test]
    fn fused_kernel_matches_the_chunked_path() {
        let [q, k, v] = qkv();
        let scale = 1.0 / (C as f64).sqrt();
        let spec = AttentionSpec {
            heads: 1,
            scale: scale as f32,
            causal: false,
        };
        let fused = attention::attention(&q, &k, &v, spec).unwrap();
        let chunked =
            attend_chunked(&(&q * scale).unwrap(), &k.t().unwrap(), &v, usize::MAX).unwrap();
        let d = max_abs_diff(&fused, &chunked);
        assert!(d <= 1e-5, "{d:e}");
    }

    #[test]
    fn legacy_names_and_conv_shapes_load_the_same_layer() {
        let current = random_weights(["to_q", "to_k", "to_v", "to_out.0"], false);
        let renames = [
            ("to_q", "query"),
            ("to_k", "key"),
            ("to_v", "value"),
            ("to_out.0", "proj_attn"),
        ];
        let mut legacy = HashMap::new();
        for (k, t) in &current {
            let mut key = k.clone();
            for (new, old) in renames {
                key = key.replace(&format!(".{new}."), &format!(".{old}."));
            }
            let t = if t.rank() == 2 {
                t.reshape((C, C, 1, 1)).unwrap()
            } else {
                t.clone()
            };
            legacy.insert(key, t);
        }
        let x = Tensor::randn(0f32, 1.0, (1, C, 4, 4), &Device::Cpu).unwrap();
        let a = load(current).unwrap().forward(&x).unwrap();
        let b = load(legacy).unwrap().forward(&x).unwrap();
        assert!(max_abs_diff(&a, &b) == 0.0);
    }

    #[test]
    fn missing_projection_names_the_current_key() {
        let mut map = random_weights(["to_q", "to_k", "to_v", "to_out.0"], true);
        map.remove("attn.to_v.weight");
        let err = load(map).unwrap_err();
        assert!(matches!(err, Error::MissingTensor { key } if key == "attn.to_v.weight"));
    }
}
