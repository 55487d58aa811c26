//! f32 A panels for the f32 convolution, which multiplies them by a B read in place
//! ([`IndexedB`](super::IndexedB) over f32) with the same blocking, threading and micro-kernel
//! loop as the bf16 GEMM (`vfmadd231ps` instead of `vdpbf16ps`).
//!
//! A panel of `MR` rows is `[k][MR]` f32 (each value is broadcast to a whole register); rows
//! past the matrix are zero.

use super::mat::MatRef;
use super::pack::{expect_packed_len, fill_panels};
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
    let size = (a.rows, a.cols);
    expect_packed_len(packed_f32_a_len(a.rows, a.cols), dst.len(), size, "f32 A")?;
    fill_panels(dst, a.cols * MR, true, |i, panel| {
        for r in 0..MR {
            let row = i * MR + r;
            for (p, slot) in panel.chunks_exact_mut(MR).enumerate() {
                slot[r] = match row < a.rows {
                    true => a.data.get(row * a.row_stride + p * a.col_stride),
                    false => None,
                }
                .copied()
                .unwrap_or(0.0);
            }
        }
    });
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
