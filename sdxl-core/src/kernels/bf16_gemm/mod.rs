//! Native bf16 matrix multiply for the CPU: `C (+)= A . B` with bf16 inputs and f32
//! accumulation.
//!
//! candle 0.11 widens bf16 matmuls to f32 on the CPU; this kernel instead feeds bf16 pairs to
//! the AVX512-BF16 dot-product instruction (`vdpbf16ps`, 32 multiply-adds per instruction).
//!
//! Structure (BLIS/GotoBLAS): A is packed once into `MR`-row panels of k-pairs (shared by all
//! threads); the columns of B are split across threads, each thread packs `NC`-column blocks of
//! B into `NR`-column panels, and for each `MC x NC` block of C accumulates `KC`-deep slices into
//! an f32 scratch block with an `MR x NR` register-tiled micro-kernel, then writes the block to
//! C once (adding to it, or rounding to bf16). The order of the k-sum for every element depends
//! only on `KC`, never on the thread split, so results are identical for any `threads`.
//!
//! Dispatch: on x86-64 CPUs with `avx512bf16` (probed at run time, cached by std) the
//! AVX512-BF16 micro-kernel runs; everywhere else (other CPUs, other architectures) a portable
//! micro-kernel computes the same products in plain f32 over the same packed layout. It is
//! correct but slower than candle's f32 GEMM, so callers that have candle as an alternative
//! check [`native_available`] first (as [`crate::kernels::matmul`] does).
//!
//! The f32 convolution shares the blocking, threading and micro-kernel loop: f32 A panels
//! ([`pack_a_f32_into`]) times an f32 B read in place ([`IndexedB`]), with `vfmadd231ps` instead of
//! `vdpbf16ps` ([`gemm_f32_indexed`]).
//!
//! A B that is multiplied many times (a layer's weight) can be packed once with [`pack_b`]
//! and multiplied with [`gemm_bf16_operands`]: the per-call packing pass (a fifth
//! of a bf16 UNet step at 512 px, where every weight is streamed once per step) disappears,
//! and the packed form takes no more memory than the bf16 matrix.

mod f32_panels;
mod indexed;
#[cfg(target_arch = "x86_64")]
mod lines;
mod mat;
mod microkernel;
mod pack;

use std::mem::MaybeUninit;

use half::bf16;
use rayon::prelude::*;

pub use f32_panels::{pack_a_f32_into, pack_a_f32_rows, packed_f32_a_len, PackedF32A};
pub use indexed::{IndexedB, PANEL_COLUMNS};
pub use mat::{MatMut, MatRef};
pub use pack::{
    pack_a, pack_a_into, pack_b, pack_b_into, packed_a_len, packed_len, PackedA, PackedB,
    PackedBBuilder,
};

use super::math::round_bf16;
use super::parallel::for_each_run;
use crate::error::{Error, Result};

/// Rows of C per micro-tile (one broadcast A pair per row and k-pair).
const MR: usize = 12;
/// Vectors of 16 floats per micro-tile row.
const NV: usize = 2;
/// Columns of C per micro-tile.
const NR: usize = 16 * NV;
/// Largest k-pairs per k-block (`KC = 2 * KC2` bf16 values); k is cut into equal blocks no
/// deeper than this. One B micro-panel (`KC2 * NR * 4` bytes) stays in L1/L2 while the A panels
/// of the block stream from L2. Measured on Zen 4 (1 MiB L2): 256..384 are equally good, 128
/// 2-5% slower; 320 makes SDXL's k = 640 a single block.
const KC2: usize = 320;
/// A panels (of `MR` rows) per M-block: the `MC x KC` slice of A (~180 KiB) stays in L2.
const MC_PANELS: usize = 12;
/// A task with at most this many A panels computes them as one M-block (A ~240 KiB and the
/// scratch block ~400 KiB still fit L2), so that each B block, streamed from memory when B is a
/// layer's weight, is read once. SDXL's text encoders multiply 154 tokens, 13 panels: M-blocks
/// of 12 and 1 panels made bigG's bf16 pass 7 % slower, and blocks of 7 and 6 no faster.
const MC_PANELS_WHOLE: usize = 16;
/// B panels (of `NR` columns) per N-block: the packed `k x NC` block of B stays in L2/L3.
const NC_PANELS: usize = 16;

/// Whether the native AVX512-BF16 kernel runs on this CPU (else the portable one does).
pub fn native_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        microkernel::avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

mod sealed {
    /// Restricts [`super::GemmOutput`] to the types this module implements.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// Element types the GEMM can write: `f32`, or `bf16` rounded to nearest-even (as `half` and
/// candle round).
pub trait GemmOutput: sealed::Sealed + Copy + Send + Sync + 'static {
    /// The value to store for the f32 product sum `acc`.
    fn store(acc: f32) -> Self;
    /// The value to store when `acc` is added onto `old` (one rounding).
    fn add(old: Self, acc: f32) -> Self;

    /// Stores `acc` at `dst`, added onto the value there with `accumulate` (which is read only
    /// then: without it, `dst` may be uninitialised memory).
    ///
    /// # Safety
    /// `dst` is valid for writes, and for reads of an initialised value with `accumulate`.
    #[inline(always)]
    unsafe fn put(dst: *mut Self, acc: f32, accumulate: bool) {
        // SAFETY: as the caller guarantees.
        unsafe {
            if accumulate {
                dst.write(Self::add(dst.read(), acc));
            } else {
                dst.write(Self::store(acc));
            }
        }
    }
}

impl GemmOutput for f32 {
    #[inline(always)]
    fn store(acc: f32) -> Self {
        acc
    }
    #[inline(always)]
    fn add(old: Self, acc: f32) -> Self {
        old + acc
    }
}

impl GemmOutput for bf16 {
    #[inline(always)]
    fn store(acc: f32) -> Self {
        round_bf16(acc)
    }
    #[inline(always)]
    fn add(old: Self, acc: f32) -> Self {
        round_bf16(old.to_f32() + acc)
    }
}

/// Whether the AVX-512F f32 kernel of [`gemm_f32_indexed`] runs on this CPU (else a portable
/// one does).
pub fn f32_native_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        microkernel::avx512::f32_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which micro-kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// AVX512-BF16 (only chosen when [`native_available`]).
    #[cfg(target_arch = "x86_64")]
    Native,
    /// Plain f32 arithmetic, any target.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if native_available() {
            return Kernel::Native;
        }
        Kernel::Portable
    }

    /// The fastest f32 kernel this CPU runs.
    fn best_f32() -> Self {
        #[cfg(target_arch = "x86_64")]
        if f32_native_available() {
            return Kernel::Native;
        }
        Kernel::Portable
    }

    /// One micro-tile; `false` if the slices are too short (an internal sizing bug).
    #[inline(always)]
    fn tile(self, kp: usize, a: &[u32], b: &[u32], c: &mut [f32], ldc: usize, first: bool) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Native => microkernel::avx512::kernel::<MR, NV>(kp, a, b, c, ldc, first),
            Kernel::Portable => microkernel::portable::<MR, NR>(kp, a, b, c, ldc, first),
        }
    }

    /// One micro-tile with B read in place: k-pairs `pairs` of panel `panel`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn tile_indexed(
        self,
        pairs: std::ops::Range<usize>,
        a: &[u32],
        b: &IndexedB<'_>,
        panel: usize,
        c: &mut [f32],
        ldc: usize,
        first: bool,
    ) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Native => {
                use microkernel::avx512::{kernel_indexed, Bf16Pairs};
                kernel_indexed::<Bf16Pairs, MR, NV>(pairs, a, b, panel, c, ldc, first)
            }
            Kernel::Portable => {
                microkernel::portable_indexed::<MR, NR>(pairs, a, b, panel, c, ldc, first)
            }
        }
    }

    /// One f32 micro-tile: rows `steps` of panel `panel` of an f32 B read in place.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn tile_f32(
        self,
        steps: std::ops::Range<usize>,
        a: &[f32],
        b: &IndexedB<'_, f32>,
        panel: usize,
        c: &mut [f32],
        ldc: usize,
        first: bool,
    ) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Native => {
                use microkernel::avx512::{kernel_indexed, F32};
                kernel_indexed::<F32, MR, NV>(steps, a, b, panel, c, ldc, first)
            }
            Kernel::Portable => {
                microkernel::portable_f32::<MR, NR>(steps, a, b, panel, c, ldc, first)
            }
        }
    }
}

/// A bias added in f32 to the products before they are stored (and rounded, for bf16 C).
#[derive(Debug, Clone, Copy, Default)]
pub enum Bias<'a> {
    /// No bias.
    #[default]
    None,
    /// One value per row of C (`m` values): a convolution's per-channel bias with C =
    /// `weight . im2col`.
    Rows(&'a [f32]),
    /// One value per column of C (`n` values): a Linear layer's bias with C = `x . Wᵀ`.
    Cols(&'a [f32]),
}

/// `C = A . B` (or `C += A . B` with `accumulate`) for bf16 `A [m x k]` and `B [k x n]`, with
/// f32 accumulation, writing `f32` or `bf16` C (`O`), on `threads` threads of rayon's global
/// pool (`threads <= 1` runs on the calling thread).
///
/// Any strides are accepted for A and B (a transposed weight is read in place). With bf16
/// output and `accumulate`, the old value is widened, added in f32 and rounded once. Without
/// `accumulate`, C is only written, never read (a view made with [`MatMut::from_raw_parts`] may
/// then be uninitialised memory). Results do not depend on `threads`.
///
/// # Errors
/// [`Error::InvalidArgument`] if the shapes disagree (`A.cols != B.rows`, C not `m x n`) or a
/// working buffer size overflows.
pub fn gemm_bf16<O: GemmOutput>(
    a: MatRef<'_, bf16>,
    b: MatRef<'_, bf16>,
    c: MatMut<'_, O>,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    gemm_bf16_bias(a, b, Bias::None, c, accumulate, threads)
}

/// [`gemm_bf16`] plus a bias added in f32 before the single store/rounding:
/// `C (+)= A . B + bias`.
///
/// # Errors
/// As [`gemm_bf16`], and [`Error::InvalidArgument`] if the bias length is not `m` (rows) or
/// `n` (columns).
pub fn gemm_bf16_bias<O: GemmOutput>(
    a: MatRef<'_, bf16>,
    b: MatRef<'_, bf16>,
    bias: Bias<'_>,
    c: MatMut<'_, O>,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    gemm_bf16_operands(Lhs::Matrix(a), Rhs::Matrix(b), bias, c, accumulate, threads)
}

/// [`gemm_bf16_bias`] with either operand packed beforehand ([`pack_a`], [`pack_b`],
/// [`PackedBBuilder`]): `C (+)= A . B + bias`, bit-identical to the unpacked call.
///
/// # Errors
/// As [`gemm_bf16_bias`].
pub fn gemm_bf16_operands<O: GemmOutput>(
    a: Lhs<'_>,
    b: Rhs<'_>,
    bias: Bias<'_>,
    c: MatMut<'_, O>,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    gemm_with(Kernel::best(), a, b, bias, c, accumulate, threads)
}

/// `C (+)= A · B + bias` in f32, for an f32 A packed with [`pack_a_f32_into`] and an f32 B read
/// in place (the f32 convolution), with the blocking and threading of [`gemm_bf16_operands`].
/// Results do not depend on `threads`.
///
/// # Errors
/// As [`gemm_bf16_bias`].
pub fn gemm_f32_indexed(
    a: PackedF32A<'_>,
    b: IndexedB<'_, f32>,
    bias: Bias<'_>,
    c: MatMut<'_, f32>,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    gemm_with(
        Kernel::best_f32(),
        Lhs::PackedF32(a),
        Rhs::IndexedF32(b),
        bias,
        c,
        accumulate,
        threads,
    )
}

/// The left operand A: a matrix (packed during the call) or panels packed once with
/// [`pack_a`] (or, for [`gemm_f32_indexed`], [`pack_a_f32_into`]).
#[derive(Debug, Clone, Copy)]
pub enum Lhs<'a> {
    /// Packed into `MR`-row panels by the call.
    Matrix(MatRef<'a, bf16>),
    /// Every panel, packed beforehand.
    Packed(PackedA<'a>),
    /// f32 panels, packed beforehand (only with an f32 B).
    PackedF32(PackedF32A<'a>),
}

impl Lhs<'_> {
    /// `(rows, cols)` of A.
    fn dims(&self) -> (usize, usize) {
        match self {
            Lhs::Matrix(a) => (a.rows, a.cols),
            Lhs::Packed(p) => (p.rows(), p.cols()),
            Lhs::PackedF32(p) => (p.rows(), p.cols()),
        }
    }
}

/// Packed A panels of one call: bf16 pairs or f32 values, `MR` per k-step.
#[derive(Debug, Clone, Copy)]
enum APanels<'a> {
    Pairs(&'a [u32]),
    F32(&'a [f32]),
}

/// The right operand B: a matrix (packed block by block during the call) or panels packed
/// once with [`pack_b`] or [`PackedBBuilder`].
#[derive(Debug, Clone, Copy)]
pub enum Rhs<'a> {
    /// Packed per `NC` block by each task.
    Matrix(MatRef<'a, bf16>),
    /// Every panel, packed beforehand.
    Packed(PackedB<'a>),
    /// Read in place through offset tables (a convolution's channel-paired input).
    Indexed(IndexedB<'a>),
    /// f32, read in place (only with f32 A panels).
    IndexedF32(IndexedB<'a, f32>),
}

impl Rhs<'_> {
    /// `(rows, cols)` of B.
    fn dims(&self) -> (usize, usize) {
        match self {
            Rhs::Matrix(b) => (b.rows, b.cols),
            Rhs::Packed(p) => (p.rows(), p.cols()),
            Rhs::Indexed(p) => (p.rows(), p.cols()),
            Rhs::IndexedF32(p) => (p.rows(), p.cols()),
        }
    }
}

/// A raw pointer to C that tasks share; each task writes a disjoint set of elements.
struct OutPtr<O> {
    ptr: *mut O,
    row_stride: usize,
    col_stride: usize,
    rows: usize,
    cols: usize,
}

// SAFETY: tasks write disjoint elements of C (disjoint row or column ranges of a view whose
// elements are distinct, checked by `MatMut::new`), and the `MatMut` borrow outlives the tasks.
unsafe impl<O: Send> Sync for OutPtr<O> {}

/// One thread's share: ranges of A panels (rows) and B panels (columns).
#[derive(Debug, Clone)]
struct Task {
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

/// Splits `0..len` into `parts` contiguous non-empty ranges of near-equal size.
fn split_range(len: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, len.max(1));
    (0..parts)
        .map(|i| i * len / parts..(i + 1) * len / parts)
        .filter(|r| !r.is_empty())
        .collect()
}

/// The thread split: columns when there are enough B panels (B is then packed once),
/// rows otherwise.
fn plan(m_panels: usize, n_panels: usize, threads: usize) -> Vec<Task> {
    if threads <= 1 || n_panels >= 2 * threads || n_panels >= m_panels {
        split_range(n_panels, threads)
            .into_iter()
            .map(|cols| Task {
                rows: 0..m_panels,
                cols,
            })
            .collect()
    } else {
        split_range(m_panels, threads)
            .into_iter()
            .map(|rows| Task {
                rows,
                cols: 0..n_panels,
            })
            .collect()
    }
}

/// Buffers larger than this many bytes are freed after a call instead of kept for the next.
const KEEP_BYTES: usize = 64 << 20;

thread_local! {
    /// Packed A of the last call on this thread, reused (never re-zeroed: packing overwrites it).
    static PACKED_A: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Packed B block of the last task on this thread.
    static PACKED_B: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    /// f32 scratch block of the last task on this thread.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A working buffer of at least `len` elements, taken from this thread's cache (contents
/// unspecified: every user overwrites what it reads). Refuses absurd sizes instead of aborting.
fn take_buffer<T: Copy + Default>(
    cache: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
    len: Option<usize>,
    what: &str,
) -> Result<Vec<T>> {
    let len = len.ok_or_else(|| Error::invalid(format!("{what} size overflows usize")))?;
    let mut v = cache.take();
    if v.len() < len {
        v.clear();
        v.try_reserve_exact(len)
            .map_err(|e| Error::invalid(format!("cannot allocate {what} ({len} elements): {e}")))?;
        v.resize(len, T::default());
    }
    Ok(v)
}

/// Returns a buffer to this thread's cache unless it is large.
fn keep_buffer<T>(cache: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>, v: Vec<T>) {
    if v.capacity() * std::mem::size_of::<T>() <= KEEP_BYTES {
        cache.set(v);
    }
}

/// The error for an internal buffer-sizing bug (never expected).
fn internal() -> Error {
    Error::invalid("bf16 GEMM: internal buffer too small")
}

/// [`gemm_bf16_bias`] with an explicit micro-kernel (tests compare the two).
fn gemm_with<O: GemmOutput>(
    kernel: Kernel,
    a: Lhs<'_>,
    b: Rhs<'_>,
    bias: Bias<'_>,
    c: MatMut<'_, O>,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    let ((m, k), (b_rows, n)) = (a.dims(), b.dims());
    if b_rows != k || c.rows != m || c.cols != n {
        return Err(Error::invalid(format!(
            "bf16 GEMM shapes disagree: A {m}x{k}, B {b_rows}x{n}, C {}x{}",
            c.rows, c.cols
        )));
    }
    match bias {
        Bias::Rows(v) if v.len() != m => {
            return Err(Error::invalid(format!(
                "row bias has {} values, C has {m} rows",
                v.len()
            )))
        }
        Bias::Cols(v) if v.len() != n => {
            return Err(Error::invalid(format!(
                "column bias has {} values, C has {n} columns",
                v.len()
            )))
        }
        _ => {}
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let out = OutPtr {
        ptr: c.ptr,
        row_stride: c.row_stride,
        col_stride: c.col_stride,
        rows: m,
        cols: n,
    };
    if k == 0 {
        // No products: C (+)= bias (zero without one).
        for i in 0..m {
            for j in 0..n {
                // SAFETY: (i, j) is inside the view, whose elements `MatMut`'s constructors
                // guarantee to be valid and exclusively borrowed.
                unsafe {
                    O::put(
                        c.ptr.add(i * c.row_stride + j * c.col_stride),
                        bias.at(i, j),
                        accumulate,
                    )
                };
            }
        }
        return Ok(());
    }
    let f32_operands = matches!(a, Lhs::PackedF32(_));
    if f32_operands != matches!(b, Rhs::IndexedF32(_)) {
        return Err(Error::invalid(
            "f32 A panels go only with an f32 B, and vice versa",
        ));
    }
    let threads = threads.max(1);
    // k-steps: pairs of bf16, or single f32 values.
    let k2 = if f32_operands { k } else { k.div_ceil(2) };
    let (m_panels, n_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let panel_a = k2 * MR;

    let a_len = match a {
        Lhs::Matrix(_) => m_panels.checked_mul(panel_a),
        Lhs::Packed(_) | Lhs::PackedF32(_) => Some(0),
    };
    let mut apack = take_buffer(&PACKED_A, a_len, "packed A")?;
    let a_panels = match a {
        Lhs::Matrix(a) => {
            let packed = apack.get_mut(..a_len.unwrap_or(0)).ok_or_else(internal)?;
            for_each_run(packed, panel_a, threads, |r, dst| {
                pack::pack_a_panel::<MR>(&a, r * MR, dst);
                Ok::<(), Error>(())
            })?;
            APanels::Pairs(packed)
        }
        Lhs::Packed(p) => APanels::Pairs(p.panels()),
        Lhs::PackedF32(p) => APanels::F32(p.panels()),
    };

    let tasks = plan(m_panels, n_panels, threads);
    let job = Job {
        kernel,
        apack: a_panels,
        b,
        bias,
        k2,
        out: &out,
        accumulate,
    };
    let run = |t: &Task| run_task(&job, t);
    let done = if tasks.len() == 1 {
        tasks.iter().try_for_each(run)
    } else {
        tasks.par_iter().try_for_each(run)
    };
    keep_buffer(&PACKED_A, apack);
    done
}

/// What every task of one GEMM shares.
struct Job<'j, O> {
    kernel: Kernel,
    apack: APanels<'j>,
    b: Rhs<'j>,
    bias: Bias<'j>,
    k2: usize,
    out: &'j OutPtr<O>,
    accumulate: bool,
}

/// Computes the C elements of one task (see the module docs for the loop structure).
fn run_task<O: GemmOutput>(job: &Job<'_, O>, task: &Task) -> Result<()> {
    let nc_max = NC_PANELS.min(task.cols.len());
    let mc_max = m_blocks(task.rows.clone())
        .map(|r| r.len())
        .max()
        .unwrap_or(0);
    let ldc = nc_max * NR;
    let b_block = match job.b {
        Rhs::Matrix(_) => nc_max.checked_mul(job.k2 * NR),
        Rhs::Packed(_) | Rhs::Indexed(_) | Rhs::IndexedF32(_) => Some(0),
    };
    let mut bpack = take_buffer(&PACKED_B, b_block, "packed B")?;
    let mut scratch = take_buffer(&SCRATCH, (mc_max * MR).checked_mul(ldc), "GEMM scratch")?;
    let done = compute_task(job, task, &mut bpack, &mut scratch);
    keep_buffer(&PACKED_B, bpack);
    keep_buffer(&SCRATCH, scratch);
    done
}

/// [`run_task`] with its buffers.
fn compute_task<O: GemmOutput>(
    job: &Job<'_, O>,
    task: &Task,
    bpack: &mut [u32],
    scratch: &mut [f32],
) -> Result<()> {
    let Job {
        kernel,
        apack,
        b,
        bias,
        k2,
        out,
        accumulate,
    } = *job;
    let nc_max = NC_PANELS.min(task.cols.len());
    let panel_b = k2 * NR;
    let ldc = nc_max * NR;
    // Equal k-blocks (depending on k only, so every thread split sums in the same order).
    let kc2 = k2.div_ceil(k2.div_ceil(KC2));

    for jc in task.cols.clone().step_by(NC_PANELS) {
        let jn = NC_PANELS.min(task.cols.end - jc);
        let bpanels: &[u32] = match b {
            Rhs::Matrix(b) => {
                let block = bpack.get_mut(..jn * panel_b).ok_or_else(internal)?;
                pack::pack_b_block::<NR>(&b, jc * NR, panel_b, block);
                block
            }
            Rhs::Packed(p) => p
                .panels()
                .get(jc * panel_b..(jc + jn) * panel_b)
                .ok_or_else(internal)?,
            Rhs::Indexed(_) | Rhs::IndexedF32(_) => &[],
        };
        for rows in m_blocks(task.rows.clone()) {
            let (ic, im) = (rows.start, rows.len());
            for pc in (0..k2).step_by(kc2) {
                let kp = kc2.min(k2 - pc);
                for jr in 0..jn {
                    let bp = match b {
                        Rhs::Indexed(_) | Rhs::IndexedF32(_) => &[],
                        _ => bpanels.get((jr * k2 + pc) * NR..).ok_or_else(internal)?,
                    };
                    for ir in 0..im {
                        let at = ((ic + ir) * k2 + pc) * MR;
                        let cp = scratch
                            .get_mut(ir * MR * ldc + jr * NR..)
                            .ok_or_else(internal)?;
                        let (steps, panel, first) = (pc..pc + kp, jc + jr, pc == 0);
                        let done = match (&b, apack) {
                            (Rhs::IndexedF32(ib), APanels::F32(ap)) => {
                                let ap = ap.get(at..).ok_or_else(internal)?;
                                kernel.tile_f32(steps, ap, ib, panel, cp, ldc, first)
                            }
                            (Rhs::Indexed(ib), APanels::Pairs(ap)) => {
                                let ap = ap.get(at..).ok_or_else(internal)?;
                                kernel.tile_indexed(steps, ap, ib, panel, cp, ldc, first)
                            }
                            (Rhs::Matrix(_) | Rhs::Packed(_), APanels::Pairs(ap)) => {
                                let ap = ap.get(at..).ok_or_else(internal)?;
                                kernel.tile(kp, ap, bp, cp, ldc, first)
                            }
                            _ => false,
                        };
                        if !done {
                            return Err(internal());
                        }
                    }
                }
            }
            write_block(&BlockWrite {
                scratch,
                ldc,
                out,
                bias,
                rows: (ic * MR, im * MR),
                cols: (jc * NR, jn * NR),
                accumulate,
            });
        }
    }
    Ok(())
}

/// The M-blocks of a task's A panels `rows`: all of them when there are at most
/// [`MC_PANELS_WHOLE`], else runs of [`MC_PANELS`].
fn m_blocks(rows: std::ops::Range<usize>) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = if rows.len() <= MC_PANELS_WHOLE {
        rows.len().max(1)
    } else {
        MC_PANELS
    };
    let end = rows.end;
    rows.step_by(step).map(move |ic| ic..end.min(ic + step))
}

/// One f32 scratch block to store into C: `ldc`-strided rows, the block's `(first, count)` of
/// C's rows and columns, the bias and whether to accumulate.
struct BlockWrite<'w, O> {
    scratch: &'w [f32],
    ldc: usize,
    out: &'w OutPtr<O>,
    bias: Bias<'w>,
    rows: (usize, usize),
    cols: (usize, usize),
    accumulate: bool,
}

/// Writes the part inside C of a scratch block, with AVX-512 where the CPU has it (the
/// conversion to bf16 then runs 16 lanes wide).
#[inline(always)]
fn write_block<O: GemmOutput>(block: &BlockWrite<'_, O>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { write_block_avx512(block) };
    }
    write_block_body(block);
}

/// [`write_block_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn write_block_avx512<O: GemmOutput>(block: &BlockWrite<'_, O>) {
    write_block_body(block);
}

/// The work of [`write_block`]; the same arithmetic whatever the vector width.
#[inline(always)]
fn write_block_body<O: GemmOutput>(block: &BlockWrite<'_, O>) {
    let BlockWrite {
        scratch,
        ldc,
        out,
        bias,
        rows: (r0, block_rows),
        cols: (c0, block_cols),
        accumulate,
    } = *block;
    let cols = out.cols.saturating_sub(c0).min(block_cols).min(ldc);
    let rows = out.rows.saturating_sub(r0).min(block_rows);
    for (i, srow) in scratch.chunks_exact(ldc).take(rows).enumerate() {
        let row = r0 + i;
        let srow = srow.get(..cols).unwrap_or(&[]);
        let base = row * out.row_stride + c0 * out.col_stride;
        let row_bias = match bias {
            Bias::Rows(v) => v.get(row).copied().unwrap_or(0.0),
            _ => 0.0,
        };
        let col_bias = match bias {
            Bias::Cols(v) => v.get(c0..c0 + srow.len()).unwrap_or(&[]),
            _ => &[],
        };
        // SAFETY: `row < rows` and `c0 + cols <= n`, so the row segment lies inside C's
        // slice (checked by `MatMut::new`); no other task writes these elements.
        let at = unsafe { out.ptr.add(base) };
        if out.col_stride == 1 && accumulate {
            // SAFETY: the segment as above; with `accumulate`, C's elements hold values.
            let dst = unsafe { std::slice::from_raw_parts_mut(at, srow.len()) };
            add_row(dst, srow, col_bias, row_bias);
        } else if out.col_stride == 1 {
            // SAFETY: the segment as above, only written.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(at.cast::<MaybeUninit<O>>(), srow.len()) };
            store_row(dst, srow, col_bias, row_bias);
        } else {
            for (j, &s) in srow.iter().enumerate() {
                let add = col_bias.get(j).copied().unwrap_or(row_bias);
                // SAFETY: as above, element `(row, c0 + j)` with `c0 + j < n`.
                unsafe { O::put(at.add(j * out.col_stride), s + add, accumulate) };
            }
        }
    }
}

/// `dst[j] = src[j] + bias`, with the column's bias where `col_bias` has one per column, else
/// `row_bias`.
#[inline(always)]
fn store_row<O: GemmOutput>(
    dst: &mut [MaybeUninit<O>],
    src: &[f32],
    col_bias: &[f32],
    row_bias: f32,
) {
    if col_bias.len() == src.len() {
        for ((d, &s), &b) in dst.iter_mut().zip(src).zip(col_bias) {
            d.write(O::store(s + b));
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            d.write(O::store(s + row_bias));
        }
    }
}

/// `dst[j] += src[j] + bias`, the bias as in [`store_row`].
#[inline(always)]
fn add_row<O: GemmOutput>(dst: &mut [O], src: &[f32], col_bias: &[f32], row_bias: f32) {
    if col_bias.len() == src.len() {
        for ((d, &s), &b) in dst.iter_mut().zip(src).zip(col_bias) {
            *d = O::add(*d, s + b);
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = O::add(*d, s + row_bias);
        }
    }
}

impl Bias<'_> {
    /// The bias of element `(i, j)` (0 without one).
    fn at(&self, i: usize, j: usize) -> f32 {
        match self {
            Bias::None => 0.0,
            Bias::Rows(v) => v.get(i).copied().unwrap_or(0.0),
            Bias::Cols(v) => v.get(j).copied().unwrap_or(0.0),
        }
    }
}

#[cfg(test)]
mod tests;
