//! Fused scaled dot-product attention for CPU tensors: f32, and bf16 on CPUs with AVX512-BF16.
//!
//! candle runs attention as a chain of whole-tensor ops: a copy that splits the heads, the
//! scores of all heads materialised, a serial scaling pass, a softmax with two serial
//! conversion passes for bf16, a second batched matmul and a copy that merges the heads. Here
//! q `[B, N, heads·head_dim]` and k, v `[B, M, heads·head_dim]` are read where the projections
//! left them (each head is a strided view), and the work is split into tasks of one batch
//! entry, one head and one block of query rows. A task computes
//!
//! 1. `S = Q_blk · K_hᵀ` in f32 into a per-thread buffer reused from task to task (blocks of
//!    up to 256 rows; keys are not blocked, so the softmax below is exact: no online
//!    rescaling);
//! 2. per row, `max(scale·S)`, then `P = exp(scale·S − max)` (masked entries 0) and its sum in
//!    f32, with a vectorised exponential;
//! 3. `O = P · V_h` with f32 accumulation, stored as `O / sum` straight into the output row
//!    segment of the head, in the input dtype (the layout the output projection reads).
//!
//! In f32 both products use the `gemm` crate (the GEMM candle's CPU matmul uses), in bf16
//! [`bf16_gemm`]; `P` is rounded to bf16 before the second product, as PyTorch's CPU flash
//! attention does for reduced types, and the output is rounded once at the store. Tasks run on
//! rayon's global pool, at most candle's thread count at a time, each product single-threaded; a task's
//! arithmetic depends only on the shapes, so results do not depend on the thread count.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Layout, Storage, Tensor, WithDType};
use half::{bf16, vec::HalfBitsVecExt};
use rayon::prelude::*;

use super::bf16_gemm::{self, MatMut, MatRef};
use super::math::exp;
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

/// Most query rows per block. Each task's two products pack K and V again, so the more rows
/// share that packing the better: measured on Zen 4 (1 MiB L2, one thread), 256 rows against
/// 64 (a 256 KiB score block that stays in L2) take 0.63x the time for one 512-wide head over
/// 1024 keys (the VAE) and 0.64x for ten 64-wide heads over 4096 keys (the UNet at 1024 px).
/// The score block streams through L3 instead, which costs less than the packing.
const MAX_ROWS: usize = 256;
/// Most bytes of f32 scores per task (and thread): longer key sequences get fewer rows.
const MAX_SCORE_BYTES: usize = 16 << 20;
/// Fewest rows per block, whatever the two limits above say.
const MIN_ROWS: usize = 16;
/// Tasks a call aims for, so that more threads than (batch x heads) find work: blocks shrink
/// towards [`MIN_SPLIT_ROWS`] until there are this many.
const MIN_TASKS: usize = 8;
/// Fewest rows a block is split to for [`MIN_TASKS`].
const MIN_SPLIT_ROWS: usize = 64;

/// Query rows per task for `heads` (batch x heads) heads of `n` queries over `m` keys. It
/// depends on the shapes alone (never on the thread count), so results do not either.
fn block_rows(heads: usize, n: usize, m: usize) -> usize {
    let by_size = (MAX_SCORE_BYTES / (4 * m.max(1))).clamp(MIN_ROWS, MAX_ROWS);
    let per_head_blocks = MIN_TASKS.div_ceil(heads.max(1));
    let by_tasks = n.div_ceil(per_head_blocks).max(MIN_SPLIT_ROWS);
    by_size.min(by_tasks).min(n).max(1)
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
        let block_rows = block_rows(batch * spec.heads, n, m);
        Ok(Self {
            batch,
            n,
            m,
            heads: spec.heads,
            head_dim: channels / spec.heads,
            scale: spec.scale,
            causal: spec.causal,
            block_rows,
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
}

/// An element type the kernel attends in.
trait Element: WithDType + Default {
    /// A zero-filled vector of `len` values (pages faulted in by the writers, not here).
    fn zeroed(len: usize) -> Vec<Self>;

    /// `x` rounded to this type.
    fn narrow(x: f32) -> Self;

    /// `s = q · kᵀ` for `q [rows, d]` and `k [cols, d]` into row-major `s [rows, cols]`.
    fn scores(q: Head<'_, Self>, k: Head<'_, Self>, s: &mut [f32]) -> Result<()>;

    /// The exponentials of the row-major scores `s [rows, cols]` (see [`softmax_rows`]), then
    /// `o = P · v` for `v [cols, d]` into row-major `o [rows, d]` in f32.
    fn attend(
        s: &mut [f32],
        shape: &Shape,
        first_row: usize,
        v: Head<'_, Self>,
        bufs: &mut Buffers,
    ) -> Result<()>;
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
    fn zeroed(len: usize) -> Vec<Self> {
        vec![0.0; len]
    }

    fn narrow(x: f32) -> Self {
        x
    }

    fn scores(q: Head<'_, Self>, k: Head<'_, Self>, s: &mut [f32]) -> Result<()> {
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

    fn attend(
        s: &mut [f32],
        shape: &Shape,
        first_row: usize,
        v: Head<'_, Self>,
        bufs: &mut Buffers,
    ) -> Result<()> {
        let (cols, d) = (v.rows, v.cols);
        let rows = s.len() / cols.max(1);
        softmax_rows(s, cols, shape, first_row, Probs::InPlace, &mut bufs.sums)?;
        let o = bufs.out.get_mut(..rows * d).ok_or_else(internal)?;
        fits(v.data.len(), cols, d, v.row_stride, v.col_stride)?;
        let [v_rs, v_cs, s_rs, o_rs] = [v.row_stride, v.col_stride, cols, d].map(istride);
        // SAFETY: `s` holds `rows * cols` values, `o` `rows * d`, and `fits` keeps v's reads
        // inside its slice; `o` is borrowed mutably for the call.
        unsafe {
            gemm::gemm(
                rows,
                d,
                cols,
                o.as_mut_ptr(),
                1,
                o_rs?,
                false,
                s.as_ptr(),
                1,
                s_rs?,
                v.data.as_ptr(),
                v_cs?,
                v_rs?,
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
}

impl Element for bf16 {
    fn zeroed(len: usize) -> Vec<Self> {
        vec![0u16; len].reinterpret_into::<bf16>()
    }

    fn narrow(x: f32) -> Self {
        bf16::from_f32(x)
    }

    fn scores(q: Head<'_, Self>, k: Head<'_, Self>, s: &mut [f32]) -> Result<()> {
        let (rows, cols) = (q.rows, k.rows);
        let c = MatMut::row_major(s, rows, cols)?;
        bf16_gemm::gemm_bf16(q.mat()?, k.mat()?.t(), c, false, 1)
    }

    fn attend(
        s: &mut [f32],
        shape: &Shape,
        first_row: usize,
        v: Head<'_, Self>,
        bufs: &mut Buffers,
    ) -> Result<()> {
        let (cols, d) = (v.rows, v.cols);
        let rows = s.len() / cols.max(1);
        let p = bufs.probs.get_mut(..s.len()).ok_or_else(internal)?;
        softmax_rows(s, cols, shape, first_row, Probs::Bf16(p), &mut bufs.sums)?;
        let p = MatRef::row_major(p, rows, cols)?;
        let o = bufs.out.get_mut(..rows * d).ok_or_else(internal)?;
        let o = MatMut::row_major(o, rows, d)?;
        bf16_gemm::gemm_bf16(p, v.mat()?, o, false, 1)
    }
}

/// The error for an internal sizing bug (never expected).
fn internal() -> Error {
    Error::invalid("fused attention: internal buffer too small")
}

/// Where [`softmax_rows`] puts the exponentials.
enum Probs<'a> {
    /// Over the scores (f32).
    InPlace,
    /// Rounded to bf16, row-major like the scores.
    Bf16(&'a mut [bf16]),
}

/// For each row `i` of the row-major scores `s [rows, cols]`: `max = max_j(scale · s[i, j])`
/// over the keys the row sees, `p[i, j] = exp(scale · s[i, j] − max)` (0 for masked keys)
/// and `sums[i] = Σ_j p[i, j]` in f32 (before any rounding of `p`). Row `i` is query
/// `first_row + i`; with `shape.causal` it sees keys `0..=first_row + i`.
fn softmax_rows(
    s: &mut [f32],
    cols: usize,
    shape: &Shape,
    first_row: usize,
    probs: Probs<'_>,
    sums: &mut [f32],
) -> Result<()> {
    let rows = s.len() / cols.max(1);
    let sums = sums.get_mut(..rows).ok_or_else(internal)?;
    if let Probs::Bf16(p) = &probs {
        if p.len() != s.len() {
            return Err(internal());
        }
    }
    let block = RowBlock {
        cols,
        first_row,
        causal: shape.causal,
        scale: shape.scale,
    };
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            unsafe { softmax_avx512(&block, s, probs, sums) };
            return Ok(());
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { softmax_avx2(&block, s, probs, sums) };
            return Ok(());
        }
    }
    softmax_body(&block, s, probs, sums);
    Ok(())
}

/// The row geometry [`softmax_body`] needs.
struct RowBlock {
    cols: usize,
    first_row: usize,
    causal: bool,
    scale: f32,
}

/// [`softmax_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(block: &RowBlock, s: &mut [f32], probs: Probs<'_>, sums: &mut [f32]) {
    softmax_body(block, s, probs, sums);
}

/// [`softmax_body`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_avx2(block: &RowBlock, s: &mut [f32], probs: Probs<'_>, sums: &mut [f32]) {
    softmax_body(block, s, probs, sums);
}

/// The work of [`softmax_rows`]; the same arithmetic whatever the vector width.
#[inline(always)]
fn softmax_body(block: &RowBlock, s: &mut [f32], probs: Probs<'_>, sums: &mut [f32]) {
    let cols = block.cols.max(1);
    let visible = |i: usize| {
        if block.causal {
            (block.first_row + i + 1).min(cols)
        } else {
            cols
        }
    };
    let scale = block.scale;
    match probs {
        Probs::InPlace => {
            for (i, (row, sum)) in s.chunks_exact_mut(cols).zip(sums).enumerate() {
                let (live, masked) = row.split_at_mut(visible(i));
                let max = row_max(live, scale);
                *sum = exp_in_place(live, scale, max);
                masked.fill(0.0);
            }
        }
        Probs::Bf16(p) => {
            let rows = s.chunks_exact(cols).zip(p.chunks_exact_mut(cols));
            for (i, ((row, prow), sum)) in rows.zip(sums).enumerate() {
                let seen = visible(i);
                let (live, _) = row.split_at(seen);
                let (plive, pmasked) = prow.split_at_mut(seen);
                let max = row_max(live, scale);
                *sum = exp_to_bf16(live, plive, scale, max);
                pmasked.fill(bf16::ZERO);
            }
        }
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
    let (chunks, tail) = row.as_chunks_mut::<LANES>();
    let mut acc = [0.0f32; LANES];
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *x = exp(*x * scale - max);
            *a += *x;
        }
    }
    let mut tail_sum = 0.0;
    for x in tail {
        *x = exp(*x * scale - max);
        tail_sum += *x;
    }
    lane_sum(acc) + tail_sum
}

/// `p[j] = bf16(exp(scale · row[j] − max))` for `p` as long as `row`, returning the sum of
/// the f32 exponentials.
#[inline(always)]
fn exp_to_bf16(row: &[f32], p: &mut [bf16], scale: f32, max: f32) -> f32 {
    let (chunks, tail) = row.as_chunks::<LANES>();
    let (pchunks, ptail) = p.as_chunks_mut::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (src, dst) in chunks.iter().zip(pchunks) {
        for ((a, &x), d) in acc.iter_mut().zip(src).zip(dst) {
            let e = exp(x * scale - max);
            *a += e;
            *d = round_bf16(e);
        }
    }
    let mut tail_sum = 0.0;
    for (&x, d) in tail.iter().zip(ptail) {
        let e = exp(x * scale - max);
        tail_sum += e;
        *d = round_bf16(e);
    }
    lane_sum(acc) + tail_sum
}

/// `x` rounded to the nearest bf16, ties to even (as `bf16::from_f32`), in branch-free form
/// that vectorises.
#[inline(always)]
fn round_bf16(x: f32) -> bf16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x0040;
    bf16::from_bits(if x.is_nan() { quiet_nan } else { rounded } as u16)
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

/// A thread's working buffers: scores, bf16 probabilities, the f32 output block, row sums.
#[derive(Default)]
struct Buffers {
    scores: Vec<f32>,
    probs: Vec<bf16>,
    out: Vec<f32>,
    sums: Vec<f32>,
}

/// Buffers larger than this many bytes are freed after a call instead of kept for the next.
const KEEP_BYTES: usize = 16 << 20;

thread_local! {
    /// This thread's buffers from its last call.
    static BUFFERS: Cell<Buffers> = Cell::new(Buffers::default());
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
        let scores = shape.block_rows.checked_mul(shape.m);
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
        grow(&mut b.sums, shape.block_rows, "attention row sums")?;
        Ok(b)
    }

    /// Keeps the buffers for this thread's next call unless they are large.
    fn keep(self) {
        let bytes = 4 * (self.scores.capacity() + self.out.capacity() + self.sums.capacity())
            + 2 * self.probs.capacity();
        if bytes <= KEEP_BYTES {
            BUFFERS.set(self);
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
        let job = Job {
            q: Operand::new(&qs, ql, "q")?,
            k: Operand::new(&ks, kl, "k")?,
            v: Operand::new(&vs, vl, "v")?,
            shape,
            out: OutPtr {
                ptr: out.as_mut_ptr(),
                len,
            },
            next: AtomicUsize::new(0),
        };
        let workers = threads.clamp(1, shape.tasks());
        if workers == 1 {
            job.work()?;
        } else {
            (0..workers).into_par_iter().try_for_each(|_| job.work())?;
        }
    }
    Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
}

/// What the workers of one call share.
struct Job<'a, T> {
    q: Operand<'a, T>,
    k: Operand<'a, T>,
    v: Operand<'a, T>,
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
        let cols = if sh.causal {
            sh.m.min(first + rows)
        } else {
            sh.m
        };
        let q = self.q.head(b, head, d, first, rows);
        let k = self.k.head(b, head, d, 0, cols);
        let v = self.v.head(b, head, d, 0, cols);
        let mut scores = std::mem::take(&mut bufs.scores);
        let result = scores
            .get_mut(..rows * cols)
            .ok_or_else(internal)
            .and_then(|s| {
                T::scores(q, k, s)?;
                T::attend(s, sh, first, v, bufs)
            });
        bufs.scores = scores;
        result?;
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
            // task's (batch, head, row) alone; no other reference to it exists meanwhile.
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
