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

use super::mat::MatRef;

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

/// Packs rows `r0 .. r0 + MR` of `a` (all of k) into `dst` (`k2 * MR` pairs).
pub(super) fn pack_a<const MR: usize>(a: &MatRef<'_, bf16>, r0: usize, dst: &mut [u32]) {
    let k = a.cols;
    for i in 0..MR {
        let row = r0 + i;
        let base = row.saturating_mul(a.row_stride);
        let contiguous = match (row < a.rows, a.col_stride) {
            (true, 1) => a.data.get(base..base + k),
            _ => None,
        };
        match contiguous {
            Some(src) => {
                for (d, p) in dst.chunks_exact_mut(MR).zip(src.chunks(2)) {
                    if let Some(x) = d.get_mut(i) {
                        *x = pair(p.first(), p.get(1));
                    }
                }
            }
            None => {
                for (p, d) in dst.chunks_exact_mut(MR).enumerate() {
                    if let Some(x) = d.get_mut(i) {
                        *x = pair(at(a, row, 2 * p), at(a, row, 2 * p + 1));
                    }
                }
            }
        }
    }
}

/// Packs columns `c0 .. c0 + NR` of `b` (all of k) into `dst` (`k2 * NR` pairs).
pub(super) fn pack_b<const NR: usize>(b: &MatRef<'_, bf16>, c0: usize, dst: &mut [u32]) {
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
        for j in 0..NR {
            let col = c0 + j;
            let start = col.saturating_mul(b.col_stride);
            let src = if j < width {
                b.data.get(start..start + k).unwrap_or(&[])
            } else {
                &[]
            };
            if src.is_empty() {
                for d in dst.chunks_exact_mut(NR) {
                    if let Some(x) = d.get_mut(j) {
                        *x = 0;
                    }
                }
            } else {
                for (d, p) in dst.chunks_exact_mut(NR).zip(src.chunks(2)) {
                    if let Some(x) = d.get_mut(j) {
                        *x = pair(p.first(), p.get(1));
                    }
                }
            }
        }
    } else {
        for (p, d) in dst.chunks_exact_mut(NR).enumerate() {
            for (j, x) in d.iter_mut().enumerate() {
                *x = pair(at(b, 2 * p, c0 + j), at(b, 2 * p + 1, c0 + j));
            }
        }
    }
}
