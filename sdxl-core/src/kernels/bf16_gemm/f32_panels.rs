//! f32 A panels for the f32 convolution, which multiplies them by a B read in place
//! ([`IndexedB`](super::IndexedB) over f32) with the same blocking, threading and micro-kernel
//! loop as the bf16 GEMM (`vfmadd231ps` instead of `vdpbf16ps`).
//!
//! A panel of `MR` rows is `[k][MR]` f32 (each value is broadcast to a whole register); rows
//! past the matrix are zero.

use super::mat::MatRef;
use rayon::prelude::*;

use super::pack::expect_packed_len;
use super::MR;
use crate::error::Result;

/// An f32 A packed by [`pack_a_f32_into`]: every `MR`-row panel of a `rows x cols` (m x k)
/// matrix.
#[derive(Debug, Clone, Copy)]
pub struct PackedF32A<'a> {
    panels: &'a [f32],
    rows: usize,
    cols: usize,
}

/// The f32 values that [`pack_a_f32_into`] writes for a `rows x cols` A, or `None` on overflow.
pub fn packed_f32_a_len(rows: usize, cols: usize) -> Option<usize> {
    rows.div_ceil(MR).checked_mul(MR)?.checked_mul(cols)
}

/// Packs all of `a` (m x k) into `dst`, which must hold exactly [`packed_f32_a_len`]`(m, k)`
/// values, on rayon's global pool; read it back with [`PackedF32A::new`].
///
/// # Errors
/// [`Error::InvalidArgument`](crate::error::Error::InvalidArgument) if `dst` has another length.
pub fn pack_a_f32_into(a: MatRef<'_, f32>, dst: &mut [f32]) -> Result<()> {
    pack_a_f32_rows(a.rows, a.cols, 1, dst, |row, out| {
        for (col, o) in out.iter_mut().enumerate() {
            *o = a
                .data
                .get(row * a.row_stride + col * a.col_stride)
                .copied()
                .unwrap_or(0.0);
        }
    })
}

/// Packs `count` matrices of `rows x cols` (m x k), given row by row, into `dst`: `count`
/// runs of [`packed_f32_a_len`]`(m, k)` values, one per matrix (read each back with
/// [`PackedF32A::new`]). `fill_row(row, out)` writes row `row` of every matrix into `out`,
/// `count` runs of `cols` values. Row panels are packed in parallel on rayon's global pool.
/// For operands computed on the fly, such as the 16 transformed kernels of a Winograd
/// convolution, which come from the same 3×3 taps.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::error::Error::InvalidArgument) if `dst` does not hold
/// exactly `count` packed matrices.
pub fn pack_a_f32_rows(
    rows: usize,
    cols: usize,
    count: usize,
    dst: &mut [f32],
    fill_row: impl Fn(usize, &mut [f32]) + Sync,
) -> Result<()> {
    let len = packed_f32_a_len(rows, cols).and_then(|len| len.checked_mul(count));
    expect_packed_len(len, dst.len(), (rows, cols), "f32 A group")?;
    let (panel_len, row_len) = (cols * MR, count * cols);
    if panel_len == 0 || count == 0 {
        return Ok(());
    }
    // Panel i of every matrix, gathered so that one task packs row panel i of all of them.
    let mut panels: Vec<Vec<&mut [f32]>> = (0..rows.div_ceil(MR)).map(|_| Vec::new()).collect();
    for matrix in dst.chunks_exact_mut(dst.len() / count) {
        for (slots, panel) in panels.iter_mut().zip(matrix.chunks_exact_mut(panel_len)) {
            slots.push(panel);
        }
    }
    panels.par_iter_mut().enumerate().for_each_init(
        || vec![0f32; MR * row_len],
        |staged, (i, slots)| {
            for (r, out) in staged.chunks_exact_mut(row_len).enumerate() {
                match i * MR + r {
                    row if row < rows => fill_row(row, out),
                    _ => out.fill(0.0),
                }
            }
            for (m, slot) in slots.iter_mut().enumerate() {
                for (col, values) in slot.chunks_exact_mut(MR).enumerate() {
                    for (r, v) in values.iter_mut().enumerate() {
                        *v = staged[r * row_len + m * cols + col];
                    }
                }
            }
        },
    );
    Ok(())
}

impl<'a> PackedF32A<'a> {
    /// A view of what [`pack_a_f32_into`] wrote for a `rows x cols` A.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::error::Error::InvalidArgument) if `panels` does not
    /// hold exactly that many values.
    pub fn new(panels: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        expect_packed_len(
            packed_f32_a_len(rows, cols),
            panels.len(),
            (rows, cols),
            "f32 A",
        )?;
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
    pub(super) fn panels(&self) -> &'a [f32] {
        self.panels
    }

    /// A back, row-major (m x k).
    pub fn unpack(&self) -> Vec<f32> {
        let k = self.cols;
        let mut out = vec![0.0; self.rows * k];
        for (row, line) in out.chunks_exact_mut(k.max(1)).enumerate().take(self.rows) {
            let panel = &self.panels[(row / MR) * k * MR..];
            for (p, x) in line.iter_mut().enumerate() {
                *x = panel[p * MR + row % MR];
            }
        }
        out
    }
}
