//! Packing of A and B panels into the k-pair layout that `vdpbf16ps` consumes.
//!
//! A pair is one `u32`: the bf16 of an even k index in the low half, the next k index in the
//! high half (zero past the end of k). An A panel of `MR` rows is `[k2][MR]` pairs (each pair is
//! broadcast to a whole register); a B panel of `NR` columns is `[k2][NR]` pairs (16 pairs fill
//! one register), where `k2 = ceil(k / 2)`. Rows and columns past the matrix are zero, so the
//! micro-kernel always computes full tiles.
//!
//! The views were bounds-checked when built, so the `get` look-ups below never miss; they stand
//! in for indexing that could panic.

use half::bf16;
use rayon::prelude::*;

use super::mat::MatRef;
use super::{MR, NR};
use crate::error::{Error, Result};

/// B packed once for [`gemm_bf16_operands`](super::gemm_bf16_operands): every `NR`-column panel of
/// a `rows x cols` (k x n) matrix, all of k each, as [`pack_b`] writes them.
#[derive(Debug, Clone, Copy)]
pub struct PackedB<'a> {
    panels: &'a [u32],
    rows: usize,
    cols: usize,
}

/// The `u32` pairs that [`pack_b`] writes for a `rows x cols` B (at most 2% more values than
/// the matrix, for its odd row and ragged last panel), or `None` on overflow.
pub fn packed_len(rows: usize, cols: usize) -> Option<usize> {
    cols.div_ceil(NR)
        .checked_mul(NR)?
        .checked_mul(rows.div_ceil(2))
}

/// Packs all of `b` (k x n) for [`gemm_bf16_operands`](super::gemm_bf16_operands), on rayon's
/// global pool; read it back with [`PackedB::new`].
///
/// # Errors
/// [`Error::InvalidArgument`] if the packed size overflows or cannot be allocated.
pub fn pack_b(b: MatRef<'_, bf16>) -> Result<Vec<u32>> {
    let mut out = zeroed_panels(packed_len(b.rows, b.cols), "B")?;
    let panel_len = b.rows.div_ceil(2) * NR;
    fill_panels(&mut out, panel_len, true, |j, panel| {
        pack_b_panel::<NR>(&b, j * NR, panel)
    });
    Ok(out)
}

/// Packs all of `b` (k x n) into `dst`, which must hold exactly [`packed_len`]`(k, n)` values,
/// on the calling thread (for callers that already run in parallel); read it back with
/// [`PackedB::new`].
///
/// # Errors
/// [`Error::InvalidArgument`] if `dst` has another length.
pub fn pack_b_into(b: MatRef<'_, bf16>, dst: &mut [u32]) -> Result<()> {
    expect_packed_len(packed_len(b.rows, b.cols), dst.len(), (b.rows, b.cols), "B")?;
    let panel_len = b.rows.div_ceil(2) * NR;
    fill_panels(dst, panel_len, false, |j, panel| {
        pack_b_panel::<NR>(&b, j * NR, panel)
    });
    Ok(())
}

/// A packed once for [`gemm_bf16_operands`](super::gemm_bf16_operands): every `MR`-row panel of
/// a `rows x cols` (m x k) matrix, all of k each, as [`pack_a`] writes them.
#[derive(Debug, Clone, Copy)]
pub struct PackedA<'a> {
    panels: &'a [u32],
    rows: usize,
    cols: usize,
}

/// The `u32` pairs that [`pack_a`] writes for a `rows x cols` A (at most 11 rows and one
/// column more than the matrix), or `None` on overflow.
pub fn packed_a_len(rows: usize, cols: usize) -> Option<usize> {
    rows.div_ceil(MR)
        .checked_mul(MR)?
        .checked_mul(cols.div_ceil(2))
}

/// Packs all of `a` (m x k) for [`gemm_bf16_operands`](super::gemm_bf16_operands), on
/// rayon's global pool; read it back with [`PackedA::new`].
///
/// # Errors
/// [`Error::InvalidArgument`] if the packed size overflows or cannot be allocated.
pub fn pack_a(a: MatRef<'_, bf16>) -> Result<Vec<u32>> {
    let mut out = zeroed_panels(packed_a_len(a.rows, a.cols), "A")?;
    let panel_len = a.cols.div_ceil(2) * MR;
    fill_panels(&mut out, panel_len, true, |i, panel| {
        pack_a_panel::<MR>(&a, i * MR, panel)
    });
    Ok(out)
}

/// Packs all of `a` (m x k) into `dst`, which must hold exactly [`packed_a_len`]`(m, k)`
/// values, on the calling thread; read it back with [`PackedA::new`].
///
/// # Errors
/// [`Error::InvalidArgument`] if `dst` has another length.
pub fn pack_a_into(a: MatRef<'_, bf16>, dst: &mut [u32]) -> Result<()> {
    expect_packed_len(
        packed_a_len(a.rows, a.cols),
        dst.len(),
        (a.rows, a.cols),
        "A",
    )?;
    let panel_len = a.cols.div_ceil(2) * MR;
    fill_panels(dst, panel_len, false, |i, panel| {
        pack_a_panel::<MR>(&a, i * MR, panel)
    });
    Ok(())
}

/// A zeroed buffer of `len` packed values (`None`: the size overflowed) for the `what` operand.
///
/// The memory comes zeroed from the allocator (fresh pages, in huge pages where the kernel
/// allows), so the threads that pack the panels fault it in, instead of the caller zeroing it
/// alone first.
fn zeroed_panels(len: Option<usize>, what: &str) -> Result<Vec<u32>> {
    let len = len.ok_or_else(|| Error::invalid(format!("packed {what} size overflows usize")))?;
    let layout = std::alloc::Layout::array::<u32>(len)
        .map_err(|e| Error::invalid(format!("packed {what} ({len} values): {e}")))?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: the layout's size is not zero.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<u32>();
    if ptr.is_null() {
        return Err(Error::invalid(format!(
            "cannot allocate packed {what} ({len} values)"
        )));
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `len` u32 values, all
    // zero bits (valid u32s), and nothing else owns it.
    let mut panels = unsafe { Vec::from_raw_parts(ptr, len, len) };
    crate::loading::memory::advise_huge_pages(&mut panels);
    Ok(panels)
}

/// Checks that `len` values are exactly the `expected` size of a packed `rows x cols` `what`.
pub(super) fn expect_packed_len(
    expected: Option<usize>,
    len: usize,
    (rows, cols): (usize, usize),
    what: &str,
) -> Result<()> {
    if expected == Some(len) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{len} values do not hold a packed {rows}x{cols} {what}"
        )))
    }
}

/// Calls `pack(index, panel)` for each `panel_len`-value panel of `dst`, on rayon's global pool
/// when `parallel` (callers that already run in parallel pack on their own thread).
pub(super) fn fill_panels<T: Send>(
    dst: &mut [T],
    panel_len: usize,
    parallel: bool,
    pack: impl Fn(usize, &mut [T]) + Send + Sync,
) {
    if panel_len == 0 {
        return;
    }
    if parallel {
        dst.par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(i, panel)| pack(i, panel));
    } else {
        dst.chunks_mut(panel_len)
            .enumerate()
            .for_each(|(i, panel)| pack(i, panel));
    }
}

impl<'a> PackedA<'a> {
    /// A view of what [`pack_a`] wrote for a `rows x cols` A.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `panels` does not hold exactly that many values.
    pub fn new(panels: &'a [u32], rows: usize, cols: usize) -> Result<Self> {
        expect_packed_len(packed_a_len(rows, cols), panels.len(), (rows, cols), "A")?;
        Ok(Self { panels, rows, cols })
    }

    /// Rows of A (m).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of A (k).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The packed panels.
    pub(super) fn panels(&self) -> &'a [u32] {
        self.panels
    }

    /// A back, row-major (m x k).
    pub fn unpack(&self) -> Vec<bf16> {
        unpack_lines::<MR>(self.panels, self.rows, self.cols)
    }
}

/// The `lines` lines of `k` values each (rows of A, columns of B) back from panels of `W` lines
/// in k-pairs, one line after the other.
fn unpack_lines<const W: usize>(panels: &[u32], lines: usize, k: usize) -> Vec<bf16> {
    let k2 = k.div_ceil(2);
    let mut out = vec![bf16::ZERO; lines * k];
    for (i, line) in out.chunks_exact_mut(k.max(1)).enumerate().take(lines) {
        let (panel, lane) = (i / W, i % W);
        for (p, two) in line.chunks_mut(2).enumerate() {
            let pair = panels
                .get((panel * k2 + p) * W + lane)
                .copied()
                .unwrap_or(0);
            for (h, x) in two.iter_mut().enumerate() {
                *x = bf16::from_bits((pair >> (16 * h)) as u16);
            }
        }
    }
    out
}

/// Writes a packed B (the layout [`pack_b`] produces) two rows at a time, for callers that
/// produce B's rows on the fly instead of holding B (a convolution's column matrix, gathered
/// straight into the panels without an intermediate copy).
#[derive(Debug)]
pub struct PackedBBuilder<'a> {
    panels: &'a mut [u32],
    rows: usize,
    cols: usize,
}

impl<'a> PackedBBuilder<'a> {
    /// A builder over `panels`, which must hold exactly [`packed_len`]`(rows, cols)` values.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for any other length.
    pub fn new(panels: &'a mut [u32], rows: usize, cols: usize) -> Result<Self> {
        expect_packed_len(packed_len(rows, cols), panels.len(), (rows, cols), "B")?;
        Ok(Self { panels, rows, cols })
    }

    /// Sets rows `2p` (`even`) and `2p + 1` (`odd`; `None` past the last row): `cols` values
    /// each (shorter rows are zero-padded, longer ones cut).
    pub fn set_row_pair(&mut self, p: usize, even: &[bf16], odd: Option<&[bf16]>) {
        let k2 = self.rows.div_ceil(2);
        if p >= k2 {
            return;
        }
        let even = even.get(..self.cols).unwrap_or(even);
        let odd = odd.map(|o| o.get(..self.cols).unwrap_or(o));
        for (q, panel) in self.panels.chunks_exact_mut(k2 * NR).enumerate() {
            let Some(dst) = panel.get_mut(p * NR..(p + 1) * NR) else {
                continue;
            };
            let lo = even.get(q * NR..).unwrap_or(&[]);
            let hi = odd.map_or(&[][..], |o| o.get(q * NR..).unwrap_or(&[]));
            interleave(lo, hi, dst);
        }
    }

    /// The finished matrix (rows never set hold whatever the buffer held).
    pub fn finish(self) -> PackedB<'a> {
        PackedB {
            panels: self.panels,
            rows: self.rows,
            cols: self.cols,
        }
    }
}

/// `dst[j] = lo[j] | hi[j] << 16` (zero where a source is short), vectorised where the CPU
/// allows.
fn interleave(lo: &[bf16], hi: &[bf16], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { interleave_avx512(lo, hi, dst) };
    }
    interleave_portable(lo, hi, dst);
}

/// [`interleave_portable`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn interleave_avx512(lo: &[bf16], hi: &[bf16], dst: &mut [u32]) {
    interleave_portable(lo, hi, dst);
}

#[inline(always)]
fn interleave_portable(lo: &[bf16], hi: &[bf16], dst: &mut [u32]) {
    if lo.len() >= dst.len() && hi.len() >= dst.len() {
        for ((d, l), h) in dst.iter_mut().zip(lo).zip(hi) {
            *d = u32::from(l.to_bits()) | (u32::from(h.to_bits()) << 16);
        }
    } else {
        for (j, d) in dst.iter_mut().enumerate() {
            *d = pair(lo.get(j), hi.get(j));
        }
    }
}

impl<'a> PackedB<'a> {
    /// A view of what [`pack_b`] wrote for a `rows x cols` B.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `panels` does not hold exactly that many values.
    pub fn new(panels: &'a [u32], rows: usize, cols: usize) -> Result<Self> {
        expect_packed_len(packed_len(rows, cols), panels.len(), (rows, cols), "B")?;
        Ok(Self { panels, rows, cols })
    }

    /// Rows of B (k).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of B (n).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The packed panels.
    pub(super) fn panels(&self) -> &'a [u32] {
        self.panels
    }

    /// Bᵀ (n x k) row-major: the matrix back, transposed (a linear layer's `[out, in]`
    /// weight from its packed `[in, out]` transpose).
    pub fn unpack_transposed(&self) -> Vec<bf16> {
        unpack_lines::<NR>(self.panels, self.cols, self.rows)
    }
}

/// One k-pair from two (optional) bf16 values.
#[inline(always)]
fn pair(lo: Option<&bf16>, hi: Option<&bf16>) -> u32 {
    let lo = lo.map_or(0, |v| u32::from(v.to_bits()));
    let hi = hi.map_or(0, |v| u32::from(v.to_bits()));
    lo | (hi << 16)
}

/// Element `(i, j)` of a view, `None` outside it.
#[inline(always)]
fn at<'a>(m: &MatRef<'a, bf16>, i: usize, j: usize) -> Option<&'a bf16> {
    if i < m.rows && j < m.cols {
        m.data.get(i * m.row_stride + j * m.col_stride)
    } else {
        None
    }
}

/// Packs `W` lines that run along k (rows of a row-major A, columns of a transposed B) into
/// `[k2][W]` pairs; a line shorter than k (e.g. empty, past the matrix) is zero-padded.
///
/// Whole blocks of 16 pairs go through [`super::lines`] where the CPU has AVX-512; the rest
/// (and everything elsewhere) through [`pack_lines_scalar`].
#[inline(always)]
fn pack_lines<const W: usize>(lines: &[&[bf16]; W], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    let done = if super::lines::available() {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { super::lines::pack_full_blocks(lines, dst) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let rest: [&[bf16]; W] = std::array::from_fn(|j| lines[j].get(done..).unwrap_or(&[]));
    if let Some(dst) = dst.get_mut(done / 2 * W..) {
        pack_lines_scalar(&rest, dst);
    }
}

/// [`pack_lines`] one pair at a time. Works in blocks of 16 pairs (one 64-byte line of each
/// source), reading each source line sequentially while the `16 x W` destination block stays
/// in L1.
#[inline(always)]
fn pack_lines_scalar<const W: usize>(lines: &[&[bf16]; W], dst: &mut [u32]) {
    const BLOCK: usize = 16;
    for (blk, d) in dst.chunks_mut(BLOCK * W).enumerate() {
        let k0 = 2 * BLOCK * blk;
        for (j, line) in lines.iter().enumerate() {
            prefetch(line.get(k0 + 8 * BLOCK..));
            let src = line.get(k0..).unwrap_or(&[]);
            let src = src.get(..2 * BLOCK).unwrap_or(src);
            let mut pairs = src.chunks_exact(2);
            let mut tail = pairs.remainder().first();
            for row in d.chunks_exact_mut(W) {
                let value = match pairs.next() {
                    Some([a, b]) => u32::from(a.to_bits()) | (u32::from(b.to_bits()) << 16),
                    // An odd tail value, then zeros past the end of the line.
                    _ => pair(tail.take(), None),
                };
                if let Some(x) = row.get_mut(j) {
                    *x = value;
                }
            }
        }
    }
}

/// Hints the CPU to fetch the cache line at the start of `ahead` (a no-op elsewhere).
#[inline(always)]
fn prefetch(ahead: Option<&[bf16]>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = ahead {
        // SAFETY: prefetching is only a hint; it never faults, even for an invalid address, and
        // here the address is inside a live slice.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(v.as_ptr().cast())
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ahead;
}

/// Packs rows `r0 .. r0 + MR` of `a` (all of k) into `dst` (`k2 * MR` pairs).
pub(super) fn pack_a_panel<const MR: usize>(a: &MatRef<'_, bf16>, r0: usize, dst: &mut [u32]) {
    let k = a.cols;
    if a.col_stride == 1 {
        let lines: [&[bf16]; MR] = std::array::from_fn(|i| {
            let row = r0 + i;
            let base = row.saturating_mul(a.row_stride);
            match row < a.rows {
                true => a.data.get(base..base + k).unwrap_or(&[]),
                false => &[],
            }
        });
        pack_lines(&lines, dst);
        return;
    }
    for (p, d) in dst.chunks_exact_mut(MR).enumerate() {
        for (i, x) in d.iter_mut().enumerate() {
            *x = pair(at(a, r0 + i, 2 * p), at(a, r0 + i, 2 * p + 1));
        }
    }
}

/// Packs `dst.len() / panel_len` consecutive panels of `NR` columns from column `c0` of `b`
/// (all of k) into `dst`, one panel of `panel_len = k2 * NR` pairs after the other.
///
/// A row-major B is read row by row across the whole block (sequential reads); other layouts
/// panel by panel.
pub(super) fn pack_b_block<const NR: usize>(
    b: &MatRef<'_, bf16>,
    c0: usize,
    panel_len: usize,
    dst: &mut [u32],
) {
    if b.col_stride != 1 || panel_len == 0 {
        for (jj, panel) in dst.chunks_exact_mut(panel_len.max(1)).enumerate() {
            pack_b_panel::<NR>(b, c0 + jj * NR, panel);
        }
        return;
    }
    let (k, n) = (b.rows, b.cols);
    let panels = dst.len() / panel_len;
    let width = n.saturating_sub(c0).min(panels * NR);
    for p in 0..panel_len / NR {
        let start0 = 2 * p * b.row_stride + c0;
        let row0 = b.data.get(start0..start0 + width).unwrap_or(&[]);
        let row1 = if 2 * p + 1 < k {
            let start1 = start0 + b.row_stride;
            b.data.get(start1..start1 + width).unwrap_or(&[])
        } else {
            &[]
        };
        for (jj, panel) in dst.chunks_exact_mut(panel_len).enumerate() {
            let Some(d) = panel.get_mut(p * NR..(p + 1) * NR) else {
                continue;
            };
            let lo = row0.get(jj * NR..).unwrap_or(&[]);
            let hi = row1.get(jj * NR..).unwrap_or(&[]);
            if lo.len() >= NR && hi.len() >= NR {
                for ((x, l), h) in d.iter_mut().zip(lo).zip(hi) {
                    *x = u32::from(l.to_bits()) | (u32::from(h.to_bits()) << 16);
                }
            } else {
                for (j, x) in d.iter_mut().enumerate() {
                    *x = pair(lo.get(j), hi.get(j));
                }
            }
        }
    }
}

/// Packs columns `c0 .. c0 + NR` of `b` (all of k) into `dst` (`k2 * NR` pairs).
pub(super) fn pack_b_panel<const NR: usize>(b: &MatRef<'_, bf16>, c0: usize, dst: &mut [u32]) {
    let (k, n) = (b.rows, b.cols);
    let width = n.saturating_sub(c0).min(NR);
    if b.col_stride == 1 && width > 0 {
        // Row-major B: interleave two rows at a time.
        for (p, d) in dst.chunks_exact_mut(NR).enumerate() {
            let start0 = 2 * p * b.row_stride + c0;
            let row0 = b.data.get(start0..start0 + width).unwrap_or(&[]);
            let row1 = if 2 * p + 1 < k {
                let start1 = start0 + b.row_stride;
                b.data.get(start1..start1 + width).unwrap_or(&[])
            } else {
                &[]
            };
            let (body, pad) = d.split_at_mut(width.min(d.len()));
            if row1.len() == body.len() && row0.len() == body.len() {
                for ((x, lo), hi) in body.iter_mut().zip(row0).zip(row1) {
                    *x = u32::from(lo.to_bits()) | (u32::from(hi.to_bits()) << 16);
                }
            } else {
                for (j, x) in body.iter_mut().enumerate() {
                    *x = pair(row0.get(j), row1.get(j));
                }
            }
            pad.fill(0);
        }
    } else if b.row_stride == 1 && width > 0 {
        // Transposed B (e.g. a [n, k] weight): each column is contiguous in k.
        let lines: [&[bf16]; NR] = std::array::from_fn(|j| {
            let start = (c0 + j).saturating_mul(b.col_stride);
            match j < width {
                true => b.data.get(start..start + k).unwrap_or(&[]),
                false => &[],
            }
        });
        pack_lines(&lines, dst);
    } else {
        for (p, d) in dst.chunks_exact_mut(NR).enumerate() {
            for (j, x) in d.iter_mut().enumerate() {
                *x = pair(at(b, 2 * p, c0 + j), at(b, 2 * p + 1, c0 + j));
            }
        }
    }
}
