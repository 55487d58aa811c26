//! Fused scaled dot-product attention for CPU tensors: f32, and bf16 on CPUs with AVX512-BF16.
//!
//! candle runs attention as a chain of whole-tensor ops: a copy that splits the heads, the
//! scores of all heads materialised, a serial scaling pass, a softmax with two serial
//! conversion passes for bf16, a second batched matmul and a copy that merges the heads. Here
//! q `[B, N, heads·head_dim]` and k, v `[B, M, heads·head_dim]` are read where the projections
//! left them (each head is a strided view), and the work is split into tasks of one batch
//! entry, one head and one block of query rows. A task walks the keys in blocks (as flash
//! attention does), so that its scores stay in cache however long the sequence; for each key
//! block it computes
//!
//! 1. `S = Q_blk · K_blkᵀ` in f32 into a per-thread buffer;
//! 2. per row, the running maximum of `scale·S` over the keys so far, `P = exp(scale·S − max)`
//!    (masked entries 0) and the running sum of `P` in f32; when the maximum grows, the sum
//!    and the output row so far are first scaled by `exp(old max − new max)`;
//! 3. `O += P · V_blk` with f32 accumulation;
//!
//! and stores `O / sum` straight into the output row segment of the head, in the input dtype
//! (the layout the output projection reads). With a single key block (text encoders, the
//! UNet's cross-attention) nothing is rescaled: the softmax is the exact two-pass one.
//!
//! In f32 both products use the `gemm` crate (the GEMM candle's CPU matmul uses), in bf16
//! [`bf16_gemm`], with every key block's keys and values packed once per call for all the tasks
//! that read them, and each task's queries packed once. `P` is rounded to bf16 before the
//! second product, as PyTorch's CPU flash attention does for reduced types, and the output is
//! rounded once at the store. Tasks run on rayon's global pool, at most candle's thread count
//! at a time, each product single-threaded; a task's arithmetic depends only on the shapes, so
//! results do not depend on the thread count.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Layout, Storage, Tensor, WithDType};
use half::bf16;
use rayon::prelude::*;

use super::bf16_gemm::{self, Bias, Lhs, MatMut, MatRef, PackedA, PackedB, Rhs};
use super::math::{exp, round_bf16};
use super::parallel::for_each_run;
use crate::error::{Error, Result};

/// What [`attention`] computes, besides its operands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// Number of heads: the channels of q, k and v are `heads · head_dim`, head by head.
    pub heads: usize,
    /// Factor applied to the scores `q · kᵀ` before the softmax (usually `head_dim^-0.5`).
    pub scale: f32,
    /// Query `i` attends only to keys `j <= i` (a lower-triangular mask aligned at the top left,
    /// as CLIP's causal mask and PyTorch's `is_causal`).
    pub causal: bool,
}

/// Whether [`attention`] runs these operands: CPU tensors of one dtype, f32, or bf16 where the
/// CPU has AVX512-BF16 ([`bf16_gemm::native_available`]). Shapes are checked by [`attention`].
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let dtype_ok = match q.dtype() {
        DType::F32 => true,
        DType::BF16 => bf16_gemm::native_available(),
        _ => false,
    };
    dtype_ok
        && [q, k, v]
            .iter()
            .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == q.dtype() && t.rank() == 3)
}

/// `softmax(scale · q·kᵀ [+ causal mask]) · v` per head, for q `[B, N, heads·head_dim]` and k, v
/// `[B, M, heads·head_dim]`, returned as `[B, N, heads·head_dim]` (heads merged, as the output
/// projection reads them) in the input dtype, on candle's thread count
/// ([`candle_core::utils::get_num_threads`]).
///
/// Any strides are accepted (each head is read in place). bf16 rounds the probabilities to
/// bf16 before multiplying by v, accumulates in f32 and rounds the output once.
///
/// # Errors
/// [`Error::InvalidArgument`] for operands that are not 3-D, disagree in batch, length or
/// channels, channels not divisible by `heads`, or no keys for a non-empty query;
/// [`Error::Unsupported`] for operands [`supports`] refuses.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: AttentionSpec) -> Result<Tensor> {
    attention_on(q, k, v, spec, candle_core::utils::get_num_threads())
}

/// [`attention`] with at most `threads` tasks running at once (`<= 1`: on the calling thread).
fn attention_on(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: AttentionSpec,
    threads: usize,
) -> Result<Tensor> {
    let shape = Shape::new(q, k, v, spec)?;
    if !supports(q, k, v) {
        return Err(Error::unsupported(format!(
            "fused attention runs CPU f32 (or bf16 with AVX512-BF16) tensors of one dtype, got \
             q {:?} on {:?}, k {:?} on {:?}, v {:?} on {:?}",
            q.dtype(),
            q.device(),
            k.dtype(),
            k.device(),
            v.dtype(),
            v.device()
        )));
    }
    match q.dtype() {
        DType::F32 => run::<f32>(q, k, v, &shape, threads),
        DType::BF16 => run::<bf16>(q, k, v, &shape, threads),
        other => Err(Error::unsupported(format!(
            "fused attention does not run {other:?}"
        ))),
    }
}

/// Most query rows per bf16 task: twelve of the bf16 GEMM's 12-row panels, one of its
/// M-blocks. Keys and values are packed once per call, so a task's fixed cost is small and its
/// score block (`MAX_ROWS x` [`MAX_KEY_BLOCK`] f32, 288 KiB) stays in L2 with its operands.
/// Measured on Zen 4 (1 MiB L2) against the unblocked kernel with 256-row tasks: ten 64-wide
/// heads over 4096 keys (the UNet at 1024 px) take 0.61x the time, the VAE's one 512-wide head
/// 0.8-0.95x.
const MAX_ROWS: usize = 144;
/// Most keys per bf16 key block.
const MAX_KEY_BLOCK: usize = 512;
/// Most bytes of one bf16 key block's keys: wide heads (the VAE's 512) get fewer keys per block.
const KEY_BLOCK_BYTES: usize = 128 << 10;
/// Key blocks of several are a multiple of this many keys (the bf16 GEMM's panel width).
const KEY_BLOCK_ALIGN: usize = 32;
/// Most query rows per f32 task. In f32 the `gemm` crate packs K and V again for every product,
/// and keys are not blocked (short products cost it more than they save), so the more rows
/// share that packing the better: on Zen 4, 256 rows against 64 take 0.63x the time for one
/// 512-wide head over 1024 keys and 0.64x for ten 64-wide heads over 4096 keys.
const MAX_F32_ROWS: usize = 256;
/// Most bytes of f32 scores per f32 task (and thread): longer key sequences get fewer rows.
const MAX_SCORE_BYTES: usize = 16 << 20;
/// Fewest rows per f32 block, whatever the two limits above say.
const MIN_F32_ROWS: usize = 16;
/// Tasks a call aims for, so that more threads than (batch x heads) find work: blocks shrink
/// towards [`MIN_SPLIT_ROWS`] until there are this many.
const MIN_TASKS: usize = 8;
/// Fewest rows a block is split to for [`MIN_TASKS`].
const MIN_SPLIT_ROWS: usize = 64;

/// Query rows per task and keys per key block for `heads` (batch x heads) heads of `n`
/// queries over `m` keys of width `head_dim` in `dtype`. They depend on the shapes alone
/// (never on the thread count), so results do not either.
fn blocking(heads: usize, n: usize, m: usize, head_dim: usize, dtype: DType) -> (usize, usize) {
    let per_head_blocks = MIN_TASKS.div_ceil(heads.max(1));
    let by_tasks = n.div_ceil(per_head_blocks).max(MIN_SPLIT_ROWS);
    let (rows, keys) = if dtype == DType::BF16 {
        let by_bytes = KEY_BLOCK_BYTES / (2 * head_dim.max(1));
        let block =
            by_bytes.clamp(KEY_BLOCK_ALIGN, MAX_KEY_BLOCK) / KEY_BLOCK_ALIGN * KEY_BLOCK_ALIGN;
        (MAX_ROWS, if m <= block { m } else { block })
    } else {
        let by_size = (MAX_SCORE_BYTES / (4 * m.max(1))).clamp(MIN_F32_ROWS, MAX_F32_ROWS);
        (by_size, m)
    };
    (rows.min(by_tasks).min(n).max(1), keys.max(1))
}

/// The validated geometry of one call.
#[derive(Debug, Clone, Copy)]
struct Shape {
    batch: usize,
    /// Query rows.
    n: usize,
    /// Keys.
    m: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
    causal: bool,
    /// Query rows per task.
    block_rows: usize,
    /// Keys per key block (the last block may hold fewer).
    key_block: usize,
}

impl Shape {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor, spec: AttentionSpec) -> Result<Self> {
        let (&[batch, n, channels], &[kb, m, kc], &[vb, vm, vc]) = (q.dims(), k.dims(), v.dims())
        else {
            return Err(Error::invalid(format!(
                "attention needs 3-D q, k and v ([batch, tokens, channels]), got {:?}, {:?}, {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )));
        };
        if (kb, kc) != (batch, channels) || (vb, vm, vc) != (batch, m, channels) {
            return Err(Error::invalid(format!(
                "attention operands disagree: q {:?}, k {:?}, v {:?} (k and v must be \
                 [{batch}, M, {channels}])",
                q.dims(),
                k.dims(),
                v.dims()
            )));
        }
        if spec.heads == 0 || channels % spec.heads != 0 {
            return Err(Error::invalid(format!(
                "{channels} attention channels do not split into {} heads",
                spec.heads
            )));
        }
        if m == 0 && batch * n * channels > 0 {
            return Err(Error::invalid(format!(
                "attention of {n} queries over no keys (k {:?})",
                k.dims()
            )));
        }
        let head_dim = channels / spec.heads;
        let (block_rows, key_block) = blocking(batch * spec.heads, n, m, head_dim, q.dtype());
        Ok(Self {
            batch,
            n,
            m,
            heads: spec.heads,
            head_dim,
            scale: spec.scale,
            causal: spec.causal,
            block_rows,
            key_block,
        })
    }

    fn channels(&self) -> usize {
        self.heads * self.head_dim
    }

    fn blocks(&self) -> usize {
        self.n.div_ceil(self.block_rows)
    }

    fn tasks(&self) -> usize {
        self.batch * self.heads * self.blocks()
    }

    /// Key blocks per head.
    fn key_blocks(&self) -> usize {
        self.m.div_ceil(self.key_block)
    }
}

/// An element type the kernel attends in.
/// Its zeroed buffers and rounding come from [`super::convert::Element`].
trait Element: super::convert::Element {
    /// Packs what the products read of the keys and values once per call, with at most
    /// `threads` threads (bf16: every key block's `kᵀ` and `v`; f32 reads them in place).
    fn pack_keys(
        k: &Operand<'_, Self>,
        v: &Operand<'_, Self>,
        shape: &Shape,
        threads: usize,
    ) -> Result<PackedKeys>;

    /// Prepares a task's query block `q [rows, d]` for [`Element::scores`] (bf16 packs it
    /// into `query`).
    fn prepare_query(q: Head<'_, Self>, query: &mut Vec<u32>) -> Result<()>;

    /// `s = q · kᵀ` for the task's queries `q [rows, d]` (prepared into `query`) and one key
    /// block, into row-major `s [rows, cols]`.
    fn scores(
        q: Head<'_, Self>,
        query: &[u32],
        keys: &KeyBlock<'_, Self>,
        s: &mut [f32],
    ) -> Result<()>;

    /// `o = P · v` (`o += P · v` unless `first`) for the probabilities of one key block
    /// (`s [rows, cols]` in f32, or `probs` in bf16, as [`Element::probs`] says) into row-major
    /// `o [rows, d]` in f32.
    fn accumulate(
        s: &[f32],
        probs: &[bf16],
        keys: &KeyBlock<'_, Self>,
        o: &mut [f32],
        first: bool,
    ) -> Result<()>;

    /// Where the softmax puts the probabilities of `len` scores: over the scores, or rounded
    /// into the start of `probs`.
    fn probs(probs: &mut [bf16], len: usize) -> Result<Probs<'_>>;
}

/// One key block of one head: `cols` keys and values (each a `[cols, d]` view), and for
/// element types that pack them ([`Element::pack_keys`]), `kᵀ` and `v` packed.
struct KeyBlock<'a, T> {
    k: Head<'a, T>,
    v: Head<'a, T>,
    packed_k: &'a [u32],
    packed_v: &'a [u32],
}

/// A head's block of rows: `rows x cols` values at `data[i * row_stride + j * col_stride]`,
/// every one inside `data` (checked by [`Operand::new`] for the whole tensor).
#[derive(Debug, Clone, Copy)]
struct Head<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Head<'a, bf16> {
    /// The block as a bf16 GEMM operand.
    fn mat(self) -> Result<MatRef<'a, bf16>> {
        MatRef::new(
            self.data,
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
        )
    }
}

/// A stride as the `gemm` crate takes it.
fn istride(stride: usize) -> Result<isize> {
    isize::try_from(stride).map_err(|_| Error::invalid(format!("stride {stride} overflows isize")))
}

/// Checks that a `rows x cols` matrix with these strides lies inside `len` elements (so that
/// the `gemm` crate's raw reads stay inside the slice).
fn fits(len: usize, rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1).checked_mul(row_stride).and_then(|r| {
        (cols - 1)
            .checked_mul(col_stride)
            .and_then(|c| r.checked_add(c))
    });
    match last {
        Some(last) if last < len => Ok(()),
        _ => Err(internal()),
    }
}

impl Element for f32 {
    fn pack_keys(
        _: &Operand<'_, Self>,
        _: &Operand<'_, Self>,
        _: &Shape,
        _: usize,
    ) -> Result<PackedKeys> {
        Ok(PackedKeys::none())
    }

    fn prepare_query(_: Head<'_, Self>, _: &mut Vec<u32>) -> Result<()> {
        Ok(())
    }

    fn scores(
        q: Head<'_, Self>,
        _: &[u32],
        keys: &KeyBlock<'_, Self>,
        s: &mut [f32],
    ) -> Result<()> {
        let k = keys.k;
        let (rows, cols, d) = (q.rows, k.rows, q.cols);
        fits(q.data.len(), rows, d, q.row_stride, q.col_stride)?;
        fits(k.data.len(), cols, d, k.row_stride, k.col_stride)?;
        fits(s.len(), rows, cols, cols, 1)?;
        let strides = [q.col_stride, q.row_stride, k.row_stride, k.col_stride, cols].map(istride);
        let [q_cs, q_rs, k_rs, k_cs, s_rs] = strides;
        // SAFETY: `fits` keeps every element the GEMM reads (q, k) or writes (s) inside its
        // slice; `s` is borrowed mutably for the call.
        unsafe {
            gemm::gemm(
                rows,
                cols,
                d,
                s.as_mut_ptr(),
                1,
                s_rs?,
                false,
                q.data.as_ptr(),
                q_cs?,
                q_rs?,
                k.data.as_ptr(),
                k_rs?,
                k_cs?,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        Ok(())
    }

    fn accumulate(
        s: &[f32],
        _: &[bf16],
        keys: &KeyBlock<'_, Self>,
        o: &mut [f32],
        first: bool,
    ) -> Result<()> {
        let v = keys.v;
        let (cols, d) = (v.rows, v.cols);
        let rows = o.len() / d.max(1);
        fits(s.len(), rows, cols, cols, 1)?;
        fits(v.data.len(), cols, d, v.row_stride, v.col_stride)?;
        let [v_rs, v_cs, s_rs, o_rs] = [v.row_stride, v.col_stride, cols, d].map(istride);
        // SAFETY: `fits` keeps the reads of s and v inside their slices, and `o` holds
        // `rows * d` values; `o` is borrowed mutably for the call.
        unsafe {
            gemm::gemm(
                rows,
                d,
                cols,
                o.as_mut_ptr(),
                1,
                o_rs?,
                !first,
                s.as_ptr(),
                1,
                s_rs?,
                v.data.as_ptr(),
                v_cs?,
                v_rs?,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        Ok(())
    }

    fn probs(_: &mut [bf16], _: usize) -> Result<Probs<'_>> {
        Ok(Probs::InPlace)
    }
}

impl Element for bf16 {
    fn pack_keys(
        k: &Operand<'_, Self>,
        v: &Operand<'_, Self>,
        shape: &Shape,
        threads: usize,
    ) -> Result<PackedKeys> {
        PackedKeys::pack(k, v, shape, threads)
    }

    fn prepare_query(q: Head<'_, Self>, query: &mut Vec<u32>) -> Result<()> {
        let len = bf16_gemm::packed_a_len(q.rows, q.cols).ok_or_else(internal)?;
        grow(query, len, "packed attention queries")?;
        let dst = query.get_mut(..len).ok_or_else(internal)?;
        bf16_gemm::pack_a_into(q.mat()?, dst)
    }

    fn scores(
        q: Head<'_, Self>,
        query: &[u32],
        keys: &KeyBlock<'_, Self>,
        s: &mut [f32],
    ) -> Result<()> {
        let (rows, cols, d) = (q.rows, keys.k.rows, q.cols);
        let len = bf16_gemm::packed_a_len(rows, d).ok_or_else(internal)?;
        let a = PackedA::new(query.get(..len).ok_or_else(internal)?, rows, d)?;
        let b = PackedB::new(keys.packed_k, d, cols)?;
        let c = MatMut::row_major(s, rows, cols)?;
        bf16_gemm::gemm_bf16_operands(Lhs::Packed(a), Rhs::Packed(b), Bias::None, c, false, 1)
    }

    fn accumulate(
        _: &[f32],
        probs: &[bf16],
        keys: &KeyBlock<'_, Self>,
        o: &mut [f32],
        first: bool,
    ) -> Result<()> {
        let (cols, d) = (keys.v.rows, keys.v.cols);
        let rows = o.len() / d.max(1);
        let p = MatRef::row_major(probs.get(..rows * cols).ok_or_else(internal)?, rows, cols)?;
        let v = PackedB::new(keys.packed_v, cols, d)?;
        let o = MatMut::row_major(o, rows, d)?;
        bf16_gemm::gemm_bf16_operands(Lhs::Matrix(p), Rhs::Packed(v), Bias::None, o, !first, 1)
    }

    fn probs(probs: &mut [bf16], len: usize) -> Result<Probs<'_>> {
        Ok(Probs::Bf16(probs.get_mut(..len).ok_or_else(internal)?))
    }
}

/// The error for an internal sizing bug (never expected).
fn internal() -> Error {
    Error::invalid("fused attention: internal buffer too small")
}

/// Where [`softmax_block`] puts the exponentials.
enum Probs<'a> {
    /// Over the scores (f32).
    InPlace,
    /// Rounded to bf16, row-major like the scores.
    Bf16(&'a mut [bf16]),
}

/// The running softmax of a task's rows: per row, the largest `scale · score` so far, the sum
/// of the exponentials so far (relative to that maximum), and the output rows `o [rows, d]`
/// accumulated so far.
struct RunningRows<'a> {
    max: &'a mut [f32],
    sum: &'a mut [f32],
    out: &'a mut [f32],
    head_dim: usize,
}

/// One key block's softmax step for the row-major scores `s [rows, cols]` of keys
/// `first_key ..`: for each row `i` (query `first_row + i`), over the keys of the block it sees,
/// the new maximum `max = max(old, max_j(scale · s[i, j]))`,
/// `p[i, j] = exp(scale · s[i, j] − max)` (0 for masked keys) and
/// `sum = sum · c + Σ_j p[i, j]` in f32 (before any rounding of `p`), where `c = exp(old − max)`
/// also scales the row's output so far. The first block (`first_key == 0`) starts every row
/// afresh. With `shape.causal`, query `q` sees keys `0..=q`.
fn softmax_block(
    s: &mut [f32],
    cols: usize,
    shape: &Shape,
    (first_row, first_key): (usize, usize),
    probs: Probs<'_>,
    rows: RunningRows<'_>,
) -> Result<()> {
    let n = s.len() / cols.max(1);
    if rows.max.len() < n || rows.sum.len() < n || rows.out.len() < n * rows.head_dim {
        return Err(internal());
    }
    if let Probs::Bf16(p) = &probs {
        if p.len() != s.len() {
            return Err(internal());
        }
    }
    let block = RowBlock {
        cols,
        first_row,
        first_key,
        causal: shape.causal,
        scale: shape.scale,
    };
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            unsafe { softmax_avx512(&block, s, probs, rows) };
            return Ok(());
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { softmax_avx2(&block, s, probs, rows) };
            return Ok(());
        }
    }
    softmax_body(&block, s, probs, rows);
    Ok(())
}

/// The block geometry [`softmax_body`] needs.
struct RowBlock {
    cols: usize,
    first_row: usize,
    first_key: usize,
    causal: bool,
    scale: f32,
}

/// [`softmax_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(block: &RowBlock, s: &mut [f32], probs: Probs<'_>, rows: RunningRows<'_>) {
    softmax_body(block, s, probs, rows);
}

/// [`softmax_body`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_avx2(block: &RowBlock, s: &mut [f32], probs: Probs<'_>, rows: RunningRows<'_>) {
    softmax_body(block, s, probs, rows);
}

/// The work of [`softmax_block`]; the same arithmetic whatever the vector width.
#[inline(always)]
fn softmax_body(block: &RowBlock, s: &mut [f32], probs: Probs<'_>, rows: RunningRows<'_>) {
    let cols = block.cols.max(1);
    let first = block.first_key == 0;
    let seen = |i: usize| {
        if block.causal {
            (block.first_row + i + 1)
                .saturating_sub(block.first_key)
                .min(cols)
        } else {
            cols
        }
    };
    let scale = block.scale;
    let d = rows.head_dim.max(1);
    let mut prob_rows = match probs {
        Probs::Bf16(p) => Some(p.chunks_exact_mut(cols)),
        Probs::InPlace => None,
    };
    let state = rows.max.iter_mut().zip(rows.sum.iter_mut());
    let lines = s.chunks_exact_mut(cols).zip(rows.out.chunks_exact_mut(d));
    for (i, ((row, out), (max, sum))) in lines.zip(state).enumerate() {
        let (live, masked) = row.split_at_mut(seen(i));
        let block_max = row_max(live, scale);
        let (new_max, carry) = if first {
            (block_max, 0.0)
        } else if block_max > *max {
            (block_max, exp(*max - block_max))
        } else {
            (*max, 1.0)
        };
        let block_sum = match prob_rows.as_mut().and_then(Iterator::next) {
            Some(prow) => {
                let (plive, pmasked) = prow.split_at_mut(live.len());
                pmasked.fill(bf16::ZERO);
                exp_to_bf16(live, plive, scale, new_max)
            }
            None => {
                masked.fill(0.0);
                exp_in_place(live, scale, new_max)
            }
        };
        if first {
            *sum = block_sum;
        } else {
            *sum = *sum * carry + block_sum;
            if carry != 1.0 {
                out.iter_mut().for_each(|x| *x *= carry);
            }
        }
        *max = new_max;
    }
}

/// Vector lanes the row loops are written for (one AVX-512 register of f32).
const LANES: usize = 16;

/// `max_j(scale · row[j])`; NaN values are skipped (they reappear through the exponential).
#[inline(always)]
fn row_max(row: &[f32], scale: f32) -> f32 {
    let larger = |m: f32, x: f32| if x > m { x } else { m };
    let (chunks, tail) = row.as_chunks::<LANES>();
    let mut acc = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = larger(*a, x * scale);
        }
    }
    let tail = tail
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| larger(m, x * scale));
    acc.into_iter().fold(tail, larger)
}

/// Sums the lanes pairwise (a fixed order), halving the width each step.
#[inline(always)]
fn lane_sum(acc: [f32; LANES]) -> f32 {
    let h8: [f32; 8] = std::array::from_fn(|i| acc[i] + acc[i + 8]);
    let h4: [f32; 4] = std::array::from_fn(|i| h8[i] + h8[i + 4]);
    (h4[0] + h4[2]) + (h4[1] + h4[3])
}

/// `row[j] = exp(scale · row[j] − max)`, returning the sum.
#[inline(always)]
fn exp_in_place(row: &mut [f32], scale: f32, max: f32) -> f32 {
    for x in row.iter_mut() {
        *x = exp(*x * scale - max);
    }
    sum_in_lanes(row)
}

/// `p[j] = bf16(exp(scale · row[j] − max))` for `p` as long as `row`, returning the sum of
/// the f32 exponentials (which are left in `row`).
#[inline(always)]
fn exp_to_bf16(row: &mut [f32], p: &mut [bf16], scale: f32, max: f32) -> f32 {
    for (x, d) in row.iter_mut().zip(p.iter_mut()) {
        *x = exp(*x * scale - max);
        *d = round_bf16(*x);
    }
    sum_in_lanes(row)
}

/// `Σ row[j]`: [`LANES`] running sums, then the tail. A pass of its own: summing inside the
/// exponential's loop kept the running sums on the stack, where each 64-byte store and reload
/// stalled.
#[inline(always)]
fn sum_in_lanes(row: &[f32]) -> f32 {
    let (chunks, tail) = row.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    lane_sum(acc) + tail.iter().fold(0.0, |sum, &x| sum + x)
}

/// One operand's values (from its layout's start) and `[B, T, C]` strides, with every element
/// of its shape checked to lie inside the values.
#[derive(Debug, Clone, Copy)]
struct Operand<'a, T> {
    data: &'a [T],
    strides: [usize; 3],
}

impl<'a, T: WithDType> Operand<'a, T> {
    fn new(storage: &'a Storage, layout: &Layout, what: &str) -> Result<Self> {
        let Storage::Cpu(cpu) = storage else {
            return Err(Error::unsupported(format!(
                "fused attention: {what} is not on the CPU"
            )));
        };
        let data = cpu
            .as_slice::<T>()?
            .get(layout.start_offset()..)
            .unwrap_or(&[]);
        let (&[b, t, c], &[sb, st, sc]) = (layout.dims(), layout.stride()) else {
            return Err(Error::invalid(format!(
                "fused attention: {what} is not 3-D"
            )));
        };
        if b * t * c > 0 {
            let last = [(b, sb), (t, st), (c, sc)]
                .iter()
                .try_fold(0usize, |acc, &(d, s)| {
                    (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
                });
            if last.is_none_or(|last| last >= data.len()) {
                return Err(Error::invalid(format!(
                    "fused attention: {what}'s layout reaches outside its storage"
                )));
            }
        }
        Ok(Self {
            data,
            strides: [sb, st, sc],
        })
    }

    /// Head `head` (of width `d`) of batch entry `b`, tokens `first..first + tokens`.
    fn head(&self, b: usize, head: usize, d: usize, first: usize, tokens: usize) -> Head<'a, T> {
        let [sb, st, sc] = self.strides;
        let start = b * sb + first * st + head * d * sc;
        Head {
            data: self.data.get(start..).unwrap_or(&[]),
            rows: tokens,
            cols: d,
            row_stride: st,
            col_stride: sc,
        }
    }
}

/// The output buffer, written by tasks at disjoint places from several threads.
struct OutPtr<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: each task writes only the row segments of its own (batch, head, row block), which no
// other task touches, and the buffer outlives the parallel loop.
unsafe impl<T: Send> Sync for OutPtr<T> {}

/// A thread's working buffers: scores, bf16 probabilities, the f32 output block, the running
/// row maxima and sums, and the packed queries.
#[derive(Default)]
struct Buffers {
    scores: Vec<f32>,
    probs: Vec<bf16>,
    out: Vec<f32>,
    max: Vec<f32>,
    sums: Vec<f32>,
    query: Vec<u32>,
}

/// Buffers larger than this many bytes are freed after a call instead of kept for the next.
const KEEP_BYTES: usize = 16 << 20;

thread_local! {
    /// This thread's buffers from its last call.
    static BUFFERS: Cell<Buffers> = Cell::new(Buffers::default());
    /// The packed keys and values of this thread's last call (of at most [`KEEP_BYTES`] · 4).
    static PACKED: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// `v` with at least `len` elements (contents unspecified: every reader writes first).
fn grow<T: Copy + Default>(v: &mut Vec<T>, len: usize, what: &str) -> Result<()> {
    if v.len() < len {
        v.clear();
        v.try_reserve_exact(len)
            .map_err(|e| Error::invalid(format!("cannot allocate {what} ({len} values): {e}")))?;
        v.resize(len, T::default());
    }
    Ok(())
}

impl Buffers {
    /// This thread's buffers, grown for blocks of `shape`.
    fn take(shape: &Shape, bf16_probs: bool) -> Result<Self> {
        let mut b = BUFFERS.take();
        let scores = shape.block_rows.checked_mul(shape.key_block);
        let scores = scores.ok_or_else(|| Error::invalid("attention score block overflows"))?;
        grow(&mut b.scores, scores, "attention scores")?;
        if bf16_probs {
            grow(&mut b.probs, scores, "attention probabilities")?;
        }
        grow(
            &mut b.out,
            shape.block_rows * shape.head_dim,
            "attention output",
        )?;
        grow(&mut b.max, shape.block_rows, "attention row maxima")?;
        grow(&mut b.sums, shape.block_rows, "attention row sums")?;
        Ok(b)
    }

    /// Keeps the buffers for this thread's next call unless they are large.
    fn keep(self) {
        let words = self.scores.capacity()
            + self.out.capacity()
            + self.max.capacity()
            + self.sums.capacity()
            + self.query.capacity();
        if 4 * words + 2 * self.probs.capacity() <= KEEP_BYTES {
            BUFFERS.set(self);
        }
    }
}

/// Every key block's `kᵀ` and `v`, packed once per call for the bf16 GEMM: block `(b, head,
/// index)` is at `stride · ((b · heads + head) · key_blocks + index)`, `kᵀ` first (`k_len`
/// values for a full block), then `v`.
struct PackedKeys {
    data: Vec<u32>,
    k_len: usize,
    stride: usize,
}

impl PackedKeys {
    /// Nothing packed (element types that read keys in place).
    fn none() -> Self {
        Self {
            data: Vec::new(),
            k_len: 0,
            stride: 0,
        }
    }

    /// Packs every key block of `k` and `v` with at most `threads` threads, reusing this
    /// thread's buffer from its last call.
    fn pack(
        k: &Operand<'_, bf16>,
        v: &Operand<'_, bf16>,
        shape: &Shape,
        threads: usize,
    ) -> Result<Self> {
        let (d, kb) = (shape.head_dim, shape.key_block);
        let overflow = || Error::invalid("packed attention keys overflow");
        let k_len = bf16_gemm::packed_len(d, kb).ok_or_else(overflow)?;
        let v_len = bf16_gemm::packed_len(kb, d).ok_or_else(overflow)?;
        let stride = k_len + v_len;
        let blocks = shape.batch * shape.heads * shape.key_blocks();
        let mut data = PACKED.take();
        grow(
            &mut data,
            blocks.checked_mul(stride).ok_or_else(overflow)?,
            "packed attention keys",
        )?;
        let pack_one = |block: usize, dst: &mut [u32]| -> Result<()> {
            let (pair, index) = (block / shape.key_blocks(), block % shape.key_blocks());
            let (b, head) = (pair / shape.heads, pair % shape.heads);
            let first_key = index * kb;
            let cols = kb.min(shape.m - first_key);
            let (k_dst, v_dst) = dst.split_at_mut(k_len);
            let k_dst = k_dst.get_mut(..bf16_gemm::packed_len(d, cols).ok_or_else(overflow)?);
            let v_dst = v_dst.get_mut(..bf16_gemm::packed_len(cols, d).ok_or_else(overflow)?);
            let (Some(k_dst), Some(v_dst)) = (k_dst, v_dst) else {
                return Err(internal());
            };
            bf16_gemm::pack_b_into(k.head(b, head, d, first_key, cols).mat()?.t(), k_dst)?;
            bf16_gemm::pack_b_into(v.head(b, head, d, first_key, cols).mat()?, v_dst)
        };
        let all = data.get_mut(..blocks * stride).ok_or_else(internal)?;
        let done = for_each_run(all, stride, threads, pack_one);
        let packed = Self {
            data,
            k_len,
            stride,
        };
        match done {
            Ok(()) => Ok(packed),
            Err(e) => {
                packed.keep();
                Err(e)
            }
        }
    }

    /// Packed `kᵀ` and `v` of key block `index` (`cols` keys) of `(b, head)`; empty when
    /// nothing was packed.
    fn block(
        &self,
        shape: &Shape,
        (b, head, index): (usize, usize, usize),
        cols: usize,
    ) -> Result<(&[u32], &[u32])> {
        if self.data.is_empty() {
            return Ok((&[], &[]));
        }
        let d = shape.head_dim;
        let at = self.stride * ((b * shape.heads + head) * shape.key_blocks() + index);
        let k_end = at + bf16_gemm::packed_len(d, cols).ok_or_else(internal)?;
        let v_at = at + self.k_len;
        let v_end = v_at + bf16_gemm::packed_len(cols, d).ok_or_else(internal)?;
        match (self.data.get(at..k_end), self.data.get(v_at..v_end)) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(internal()),
        }
    }

    /// Keeps the buffer for this thread's next call unless it is large.
    fn keep(self) {
        if self.data.capacity() <= KEEP_BYTES {
            PACKED.set(self.data);
        }
    }
}

/// Runs every task of `shape` on at most `threads` threads and returns the output tensor.
fn run<T: Element>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: &Shape,
    threads: usize,
) -> Result<Tensor> {
    let dims = (shape.batch, shape.n, shape.channels());
    let len = shape.batch * shape.n * shape.channels();
    let mut out = T::zeroed(len);
    if len > 0 {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (k, v) = (Operand::new(&ks, kl, "k")?, Operand::new(&vs, vl, "v")?);
        let packed = T::pack_keys(&k, &v, shape, threads)?;
        let job = Job {
            q: Operand::new(&qs, ql, "q")?,
            k,
            v,
            packed: &packed,
            shape,
            out: OutPtr {
                ptr: out.as_mut_ptr(),
                len,
            },
            next: AtomicUsize::new(0),
        };
        let workers = threads.clamp(1, shape.tasks());
        let done = if workers == 1 {
            job.work()
        } else {
            (0..workers).into_par_iter().try_for_each(|_| job.work())
        };
        packed.keep();
        done?;
    }
    Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
}

/// What the workers of one call share.
struct Job<'a, T> {
    q: Operand<'a, T>,
    k: Operand<'a, T>,
    v: Operand<'a, T>,
    packed: &'a PackedKeys,
    shape: &'a Shape,
    out: OutPtr<T>,
    /// The next task to hand out.
    next: AtomicUsize,
}

impl<T: Element> Job<'_, T> {
    /// One worker: takes tasks until none are left.
    fn work(&self) -> Result<()> {
        let mut bufs = Buffers::take(self.shape, T::DTYPE == DType::BF16)?;
        let tasks = self.shape.tasks();
        let mut done = Ok(());
        loop {
            let task = self.next.fetch_add(1, Ordering::Relaxed);
            if task >= tasks {
                break;
            }
            done = self.task(task, &mut bufs);
            if done.is_err() {
                break;
            }
        }
        bufs.keep();
        done
    }

    /// Task `task`: batch entry, head and row block in that order (blocks of one head run
    /// next to each other and share its keys and values in cache).
    fn task(&self, task: usize, bufs: &mut Buffers) -> Result<()> {
        let sh = self.shape;
        let (blocks, d) = (sh.blocks(), sh.head_dim);
        let (b, rest) = (task / (sh.heads * blocks), task % (sh.heads * blocks));
        let (head, block) = (rest / blocks, rest % blocks);
        let first = block * sh.block_rows;
        let rows = sh.block_rows.min(sh.n - first);
        // Keys any row of the block sees.
        let seen = if sh.causal {
            sh.m.min(first + rows)
        } else {
            sh.m
        };
        let q = self.q.head(b, head, d, first, rows);
        T::prepare_query(q, &mut bufs.query)?;
        let Buffers {
            scores,
            probs,
            out,
            max,
            sums,
            query,
        } = bufs;
        let out = out.get_mut(..rows * d).ok_or_else(internal)?;
        for (index, first_key) in (0..seen).step_by(sh.key_block).enumerate() {
            let cols = sh.key_block.min(sh.m - first_key);
            let (packed_k, packed_v) = self.packed.block(sh, (b, head, index), cols)?;
            let keys = KeyBlock {
                k: self.k.head(b, head, d, first_key, cols),
                v: self.v.head(b, head, d, first_key, cols),
                packed_k,
                packed_v,
            };
            let s = scores.get_mut(..rows * cols).ok_or_else(internal)?;
            T::scores(q, query, &keys, s)?;
            let running = RunningRows {
                max: max.as_mut_slice(),
                sum: sums.as_mut_slice(),
                out: &mut *out,
                head_dim: d,
            };
            let p = T::probs(probs, rows * cols)?;
            softmax_block(s, cols, sh, (first, first_key), p, running)?;
            T::accumulate(s, probs, &keys, out, first_key == 0)?;
        }
        self.store(b, head, first, rows, bufs)
    }

    /// Writes `out / sum` of each row into its output segment, rounding once.
    fn store(
        &self,
        b: usize,
        head: usize,
        first: usize,
        rows: usize,
        bufs: &Buffers,
    ) -> Result<()> {
        let sh = self.shape;
        let (d, c) = (sh.head_dim, sh.channels());
        let o = bufs.out.get(..rows * d).ok_or_else(internal)?;
        for (i, (orow, &sum)) in o.chunks_exact(d).zip(&bufs.sums).enumerate() {
            let start = (b * sh.n + first + i) * c + head * d;
            if start + d > self.out.len {
                return Err(internal());
            }
            // SAFETY: the segment lies inside the output (checked above) and belongs to this
            // task's (batch, head, row block) alone; no other reference to it exists meanwhile.
            let dst = unsafe { std::slice::from_raw_parts_mut(self.out.ptr.add(start), d) };
            let inv = 1.0 / sum;
            for (dst, &x) in dst.iter_mut().zip(orow) {
                *dst = T::narrow(x * inv);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
