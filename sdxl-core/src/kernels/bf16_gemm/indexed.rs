//! A B operand read in place: its k-pair rows are runs of `u32` pairs in a caller's buffer,
//! found through two offset tables instead of being packed.
//!
//! A 3×3 convolution whose input channels are stored in pairs (two bf16 of one pixel in one
//! `u32`) has exactly this shape: the `NR` columns of a panel at k-pair (channel pair, tap) are
//! `NR` consecutive pixels of that pair's plane, shifted by the tap. The micro-kernel then
//! reads them where they are, and the column matrix (nine times the input) is never written.

use super::NR;
use crate::error::{Error, Result};

/// B `[rows x cols]` (k x n, `rows` even) whose `NR` columns of panel `j` at k-pair `p` are
/// `values[row_offsets[p] + panel_offsets[j] ..][..NR]`. Columns past `cols` in the last panel
/// are read too (their products are dropped), so every addressed run lies inside `values`.
#[derive(Debug, Clone, Copy)]
pub struct IndexedB<'a> {
    values: &'a [u32],
    row_offsets: &'a [usize],
    panel_offsets: &'a [usize],
    rows: usize,
    cols: usize,
}

/// Columns of one panel of B, the width that [`IndexedB`] runs must have.
pub const PANEL_COLUMNS: usize = NR;

impl<'a> IndexedB<'a> {
    /// A `rows x cols` B over `values`, with one offset per k-pair (`rows / 2`) and one per
    /// panel (`ceil(cols / NR)`).
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
        if !rows.is_multiple_of(2)
            || row_offsets.len() != rows / 2
            || panel_offsets.len() != cols.div_ceil(NR)
        {
            return Err(Error::invalid(format!(
                "indexed B: {rows}x{cols} needs an even k, {} row offsets and {} panel \
                 offsets, got {} and {}",
                rows / 2,
                cols.div_ceil(NR),
                row_offsets.len(),
                panel_offsets.len()
            )));
        }
        let furthest = |offsets: &[usize]| offsets.iter().copied().max().unwrap_or(0);
        let end = furthest(row_offsets)
            .checked_add(furthest(panel_offsets))
            .and_then(|start| start.checked_add(NR));
        if rows > 0 && cols > 0 && end.is_none_or(|end| end > values.len()) {
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

    /// The `NR` pairs of panel `panel` at k-pair `pair`; `None` outside B.
    pub(super) fn run(&self, pair: usize, panel: usize) -> Option<&'a [u32]> {
        let start = self.row_offsets.get(pair)? + self.panel_offsets.get(panel)?;
        self.values.get(start..start + NR)
    }

    /// The buffer, the offsets of k-pairs `pairs` and the offset of panel `panel`, for the
    /// micro-kernel; `None` outside B. Every run addressed through them lies inside the
    /// buffer (checked by [`IndexedB::new`]).
    pub(super) fn panel(
        &self,
        pairs: std::ops::Range<usize>,
        panel: usize,
    ) -> Option<(&'a [u32], &'a [usize], usize)> {
        Some((
            self.values,
            self.row_offsets.get(pairs)?,
            *self.panel_offsets.get(panel)?,
        ))
    }
}
