//! The UNet's spatial transformer: [`Attention`], the GEGLU [`FeedForward`],
//! [`BasicTransformerBlock`] and [`Transformer2DModel`] (diffusers' names and checkpoint keys).

use candle_core::{DType, Module, Tensor};

use super::config::TransformerSpec;
use crate::error::{Error, Result};
use crate::kernels::activation;
use crate::kernels::attention::{self, AttentionSpec};
use crate::kernels::matmul::matmul;
use crate::layers::{group_norm, layer_norm, linear, GroupNorm, LayerNorm, Linear};
use crate::loading::Weights;

/// Receives each linear layer with its full checkpoint name (without `.weight`), e.g.
/// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
pub type LinearVisitor<'a> = dyn FnMut(&str, &mut Linear) -> Result<()> + 'a;

/// Epsilon of the transformer's input group norm (fixed in diffusers).
const TRANSFORMER_NORM_EPS: f64 = 1e-6;
/// Epsilon of the block's layer norms (diffusers' default).
const LAYER_NORM_EPS: f64 = 1e-5;
/// Feed-forward expansion factor (diffusers' default `mult`).
const FF_MULT: usize = 4;

/// Multi-head attention: `to_q`, `to_k`, `to_v` (no bias) and `to_out.0` (with bias).
///
/// Self-attention when no context is given, cross-attention over `encoder_hidden_states`
/// otherwise. On the CPU the fused kernel ([`crate::kernels::attention`]) attends in f32 and
/// (where it runs natively) bf16; elsewhere heads are folded into the batch so that scores are
/// one batched matmul.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection `[heads * head_dim, query_dim]`.
    pub to_q: Linear,
    /// Key projection `[heads * head_dim, context_dim]`.
    pub to_k: Linear,
    /// Value projection `[heads * head_dim, context_dim]`.
    pub to_v: Linear,
    /// Output projection `to_out.0` `[query_dim, heads * head_dim]`.
    pub to_out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    /// Loads the projections from `w` (e.g. `…transformer_blocks.0.attn2`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(
        w: &Weights,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: linear(query_dim, inner, false, &w.pp("to_q"))?,
            to_k: linear(context_dim, inner, false, &w.pp("to_k"))?,
            to_v: linear(context_dim, inner, false, &w.pp("to_v"))?,
            to_out: linear(inner, query_dim, true, &w.pp("to_out").pp(0))?,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// Calls `f` on `to_q`, `to_k`, `to_v` and `to_out.0`, named under `prefix`.
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_linears_mut(&mut self, prefix: &str, f: &mut LinearVisitor<'_>) -> Result<()> {
        f(&format!("{prefix}.to_q"), &mut self.to_q)?;
        f(&format!("{prefix}.to_k"), &mut self.to_k)?;
        f(&format!("{prefix}.to_v"), &mut self.to_v)?;
        f(&format!("{prefix}.to_out.0"), &mut self.to_out)
    }

    /// `[B, N, C] → [B * heads, N, head_dim]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        Ok(x.reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * self.heads, n, self.head_dim))?)
    }

    /// Attends from `x` `[B, N, query_dim]` to `context` `[B, M, context_dim]` (to `x` itself
    /// when `None`).
    ///
    /// # Errors
    /// Tensor shape or device failures.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with(x, context, None)
    }

    /// [`forward`](Self::forward) plus `residual` (`[B, N, query_dim]`), added inside the
    /// output projection.
    ///
    /// # Errors
    /// Tensor shape or device failures.
    pub fn forward_residual(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(x, context, Some(residual))
    }

    /// The attention, with `residual` added by the output projection when given.
    fn forward_with(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let context = context.unwrap_or(x);
        #[cfg(feature = "flash-attn")]
        if x.device().is_cuda() && matches!(x.dtype(), DType::F16 | DType::BF16) {
            return self.forward_flash(x, context, residual);
        }
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        if attention::supports(&q, &k, &v) {
            let spec = AttentionSpec {
                heads: self.heads,
                scale: self.scale as f32,
                causal: false,
            };
            let out = attention::attention(&q, &k, &v, spec)?;
            return self.project_out(&out, residual);
        }
        let q = self.split_heads(&q)?;
        let k = self.split_heads(&k)?;
        let v = self.split_heads(&v)?;
        let scores = (matmul(&q, &k.t()?)? * self.scale)?;
        let probs = softmax_f32(&scores)?;
        let out = matmul(&probs, &v)?
            .reshape((b, self.heads, n, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.head_dim))?;
        self.project_out(&out, residual)
    }

    /// `to_out.0` (plus the residual).
    fn project_out(&self, out: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        Ok(match residual {
            Some(r) => self.to_out.forward_residual(out, r)?,
            None => self.to_out.forward(out)?,
        })
    }
}

#[cfg(feature = "flash-attn")]
impl Attention {
    /// The fused flash-attention kernel (CUDA, f16/bf16): `[B, N, heads, head_dim]` layout, no
    /// score matrix in memory.
    fn forward_flash(
        &self,
        x: &Tensor,
        context: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let m = context.dim(1)?;
        let q = self
            .to_q
            .forward(x)?
            .reshape((b, n, self.heads, self.head_dim))?;
        let k = self
            .to_k
            .forward(context)?
            .reshape((b, m, self.heads, self.head_dim))?;
        let v = self
            .to_v
            .forward(context)?
            .reshape((b, m, self.heads, self.head_dim))?;
        let out = candle_flash_attn::flash_attn(&q, &k, &v, self.scale as f32, false)?;
        self.project_out(&out.reshape((b, n, self.heads * self.head_dim))?, residual)
    }
}

/// Softmax over the last dimension. On the CPU, half-precision scores are upcast to f32 first
/// (candle's CPU kernel accumulates in the input dtype; its GPU kernels accumulate in f32).
fn softmax_f32(scores: &Tensor) -> Result<Tensor> {
    let dtype = scores.dtype();
    if scores.device().is_cpu() && matches!(dtype, DType::F16 | DType::BF16) {
        let p = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
        Ok(p.to_dtype(dtype)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(scores)?)
    }
}

/// `ff.net.0` (GEGLU: `proj` to twice the inner width, `value * gelu(gate)`) → `ff.net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    /// `net.0.proj` `[2 * inner, dim]`.
    pub proj_in: Linear,
    /// `net.2` `[dim, inner]`.
    pub proj_out: Linear,
    inner: usize,
}

impl FeedForward {
    /// Loads `net.0.proj` and `net.2` from `w` (e.g. `…transformer_blocks.0.ff`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(w: &Weights, dim: usize) -> Result<Self> {
        let inner = dim * FF_MULT;
        let net = w.pp("net");
        Ok(Self {
            proj_in: linear(dim, 2 * inner, true, &net.pp(0).pp("proj"))?,
            proj_out: linear(inner, dim, true, &net.pp(2))?,
            inner,
        })
    }

    /// Calls `f` on `net.0.proj` and `net.2`, named under `prefix`.
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_linears_mut(&mut self, prefix: &str, f: &mut LinearVisitor<'_>) -> Result<()> {
        f(&format!("{prefix}.net.0.proj"), &mut self.proj_in)?;
        f(&format!("{prefix}.net.2"), &mut self.proj_out)
    }

    /// Applies the feed-forward network to `x` `[B, N, dim]` and adds `residual` (same
    /// shape) inside the last projection.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        let gated = if activation::supports(&h) {
            // One fused, vectorised, multi-threaded pass on the CPU.
            activation::geglu(&h)?
        } else {
            let value = h.narrow(2, 0, self.inner)?;
            let gate = h.narrow(2, self.inner, self.inner)?.gelu_erf()?;
            (value * gate)?
        };
        Ok(self.proj_out.forward_residual(&gated, residual)?)
    }
}

/// `x + attn1(norm1(x))`, `+ attn2(norm2(x), context)`, `+ ff(norm3(x))`.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    /// Self-attention.
    pub attn1: Attention,
    norm2: LayerNorm,
    /// Cross-attention over the text conditioning.
    pub attn2: Attention,
    norm3: LayerNorm,
    /// GEGLU feed-forward network.
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    /// Loads one block from `w` (e.g. `…attentions.0.transformer_blocks.1`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(
        w: &Weights,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, LAYER_NORM_EPS, &w.pp("norm1"))?,
            attn1: Attention::new(&w.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: layer_norm(dim, LAYER_NORM_EPS, &w.pp("norm2"))?,
            attn2: Attention::new(&w.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: layer_norm(dim, LAYER_NORM_EPS, &w.pp("norm3"))?,
            ff: FeedForward::new(&w.pp("ff"), dim)?,
        })
    }

    /// Calls `f` on every linear layer of the block, named under `prefix`.
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_linears_mut(&mut self, prefix: &str, f: &mut LinearVisitor<'_>) -> Result<()> {
        self.attn1
            .visit_linears_mut(&format!("{prefix}.attn1"), f)?;
        self.attn2
            .visit_linears_mut(&format!("{prefix}.attn2"), f)?;
        self.ff.visit_linears_mut(&format!("{prefix}.ff"), f)
    }

    /// Applies the block to `x` `[B, N, dim]` with `context` `[B, M, context_dim]`.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self
            .attn1
            .forward_residual(&self.norm1.forward(x)?, None, x)?;
        let x = self
            .attn2
            .forward_residual(&self.norm2.forward(&x)?, Some(context), &x)?;
        self.ff.forward_residual(&self.norm3.forward(&x)?, &x)
    }
}

/// The spatial transformer of a cross-attention block (linear projections, as in SDXL):
/// `GroupNorm → proj_in → BasicTransformerBlock × layers → proj_out`, plus the input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    /// `proj_in` `[inner, channels]`.
    pub proj_in: Linear,
    /// The stacked blocks (`transformer_blocks.i`).
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    /// `proj_out` `[channels, inner]`.
    pub proj_out: Linear,
}

impl Transformer2DModel {
    /// Loads the transformer from `w` (e.g. `down_blocks.1.attentions.0`); `groups` is the UNet's
    /// `norm_num_groups`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the head count exceeds the channels; missing or misshapen
    /// tensors.
    pub fn new(w: &Weights, spec: &TransformerSpec, groups: usize) -> Result<Self> {
        let c = spec.channels;
        let head_dim = c / spec.heads.max(1);
        if head_dim == 0 {
            return Err(Error::unsupported(format!(
                "`{}`: {} attention heads for {c} channels",
                w.key("norm"),
                spec.heads
            )));
        }
        let inner = spec.heads * head_dim;
        let blocks = w.pp("transformer_blocks");
        let transformer_blocks = (0..spec.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &blocks.pp(i),
                    inner,
                    spec.heads,
                    head_dim,
                    spec.cross_attention_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(groups, c, TRANSFORMER_NORM_EPS, &w.pp("norm"))?,
            proj_in: linear(c, inner, true, &w.pp("proj_in"))?,
            transformer_blocks,
            proj_out: linear(inner, c, true, &w.pp("proj_out"))?,
        })
    }

    /// Calls `f` on `proj_in`, every block's linear layers and `proj_out`, named under
    /// `prefix`.
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_linears_mut(&mut self, prefix: &str, f: &mut LinearVisitor<'_>) -> Result<()> {
        f(&format!("{prefix}.proj_in"), &mut self.proj_in)?;
        for (i, block) in self.transformer_blocks.iter_mut().enumerate() {
            block.visit_linears_mut(&format!("{prefix}.transformer_blocks.{i}"), f)?;
        }
        f(&format!("{prefix}.proj_out"), &mut self.proj_out)
    }

    /// Applies the transformer to the feature map `x` `[B, C, H, W]` with `context`
    /// `[B, M, cross_attention_dim]`.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // [B, C, H, W] → [B, HW, C] tokens. The copy is the one torch's permute+reshape makes;
        // it is also required: candle 0.11.1's CPU matmul folds the batch of a batch-invariant
        // rhs into the rows of lhs without checking that lhs rows are contiguous, so a
        // transposed view fed to `Linear` gives wrong results.
        let tokens = self
            .norm
            .forward(x)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let mut hidden = self.proj_in.forward(&tokens)?;
        for block in &self.transformer_blocks {
            hidden = block.forward(&hidden, context)?;
        }
        let out = self.proj_out.forward(&hidden)?.transpose(1, 2)?;
        Ok((out + x.flatten_from(2)?)?.reshape((b, c, h, w))?)
    }
}
