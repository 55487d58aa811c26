//! A B operand read in place: its k-pair rows are runs of `u32` pairs (or f32 rows, for the
//! f32 convolution) in a caller's buffer, found through two offset tables instead of being
//! packed.
//!
//! A 3×3 convolution whose input channels are stored in pairs (two bf16 of one pixel in one
//! `u32`) has exactly this shape: the `NR` columns of a panel at k-pair (channel pair, tap) are
//! `NR` consecutive pixels of that pair's plane, shifted by the tap. The micro-kernel then
//! reads them where they are, and the column matrix (nine times the input) is never written.

use super::NR;
use crate::error::{Error, Result};

/// B `[rows x cols]` (k x n) whose `NR` columns of panel `j` at k-step `p` are
/// `values[row_offsets[p] + panel_offsets[j] ..][..NR]`. A k-step is a pair of bf16 rows in one
/// `u32` (`T = u32`, for the bf16 GEMM; `rows` even) or one f32 row (`T = f32`, for the f32
/// convolution). Columns past `cols` in the last panel are read too (their products are
/// dropped), so every addressed run lies inside `values`.
#[derive(Debug, Clone, Copy)]
pub struct IndexedB<'a, T = u32> {
    values: &'a [T],
    row_offsets: &'a [usize],
    panel_offsets: &'a [usize],
    rows: usize,
    cols: usize,
}

/// Columns of one panel of B, the width that [`IndexedB`] runs must have.
pub const PANEL_COLUMNS: usize = NR;

impl<'a> IndexedB<'a, u32> {
    /// A bf16 `rows x cols` B over `values` (pairs of rows), with one offset per k-pair
    /// (`rows / 2`) and one per panel (`ceil(cols / NR)`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `rows` is odd, an offset table has the wrong length, or
    /// a run would end past `values`.
    pub fn new(
        values: &'a [u32],
        rows: usize,
        cols: usize,
        row_offsets: &'a [usize],
        panel_offsets: &'a [usize],
    ) -> Result<Self> {
        if !rows.is_multiple_of(2) {
            return Err(Error::invalid(format!(
                "indexed B: {rows} rows are not pairs"
            )));
        }
        Self::checked(values, rows / 2, rows, cols, row_offsets, panel_offsets)
    }
}

impl<'a> IndexedB<'a, f32> {
    /// An f32 `rows x cols` B over `values`, with one offset per row and one per panel
    /// (`ceil(cols / NR)`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if an offset table has the wrong length or a run would end
    /// past `values`.
    pub fn new_f32(
        values: &'a [f32],
        rows: usize,
        cols: usize,
        row_offsets: &'a [usize],
        panel_offsets: &'a [usize],
    ) -> Result<Self> {
        Self::checked(values, rows, rows, cols, row_offsets, panel_offsets)
    }
}

impl<'a, T> IndexedB<'a, T> {
    /// The view, after checking `steps` row offsets, the panel offsets and the runs' ends.
    fn checked(
        values: &'a [T],
        steps: usize,
        rows: usize,
        cols: usize,
        row_offsets: &'a [usize],
        panel_offsets: &'a [usize],
    ) -> Result<Self> {
        if row_offsets.len() != steps || panel_offsets.len() != cols.div_ceil(NR) {
            return Err(Error::invalid(format!(
                "indexed B: {rows}x{cols} needs {steps} row offsets and {} panel offsets, got \
                 {} and {}",
                cols.div_ceil(NR),
                row_offsets.len(),
                panel_offsets.len()
            )));
        }
        let furthest = |offsets: &[usize]| offsets.iter().copied().max().unwrap_or(0);
        let end = furthest(row_offsets)
            .checked_add(furthest(panel_offsets))
            .and_then(|start| start.checked_add(NR));
        if steps > 0 && cols > 0 && end.is_none_or(|end| end > values.len()) {
            return Err(Error::invalid(format!(
                "indexed B: runs reach past the {} values",
                values.len()
            )));
        }
        Ok(Self {
            values,
            row_offsets,
            panel_offsets,
            rows,
            cols,
        })
    }

    /// Rows of B (k).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of B (n).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The `NR` values of panel `panel` at k-step `step`; `None` outside B.
    pub(super) fn run(&self, step: usize, panel: usize) -> Option<&'a [T]> {
        let start = self.row_offsets.get(step)? + self.panel_offsets.get(panel)?;
        self.values.get(start..start + NR)
    }

    /// The buffer, the offsets of k-steps `steps` and the offset of panel `panel`, for the
    /// micro-kernel; `None` outside B. Every run addressed through them lies inside the
    /// buffer (checked when the view was built).
    pub(super) fn panel(
        &self,
        steps: std::ops::Range<usize>,
        panel: usize,
    ) -> Option<(&'a [T], &'a [usize], usize)> {
        Some((
            self.values,
            self.row_offsets.get(steps)?,
            *self.panel_offsets.get(panel)?,
        ))
    }
}
