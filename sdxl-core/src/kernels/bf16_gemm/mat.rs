//! Strided matrix views over slices, validated once at construction.

use crate::error::{Error, Result};

/// The largest offset `(rows-1)*row_stride + (cols-1)*col_stride`, or an error on overflow.
fn last_offset(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Result<usize> {
    let r = (rows - 1)
        .checked_mul(row_stride)
        .ok_or_else(|| Error::invalid("matrix row stride overflows usize"))?;
    let c = (cols - 1)
        .checked_mul(col_stride)
        .ok_or_else(|| Error::invalid("matrix column stride overflows usize"))?;
    r.checked_add(c)
        .ok_or_else(|| Error::invalid("matrix extent overflows usize"))
}

/// Checks that every element `(i, j)` of a `rows x cols` view lies inside `len` elements.
fn check_bounds(
    len: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = last_offset(rows, cols, row_stride, col_stride)?;
    if last >= len {
        return Err(Error::invalid(format!(
            "a {rows}x{cols} matrix with strides ({row_stride}, {col_stride}) reaches element \
             {last}, but the slice holds {len}"
        )));
    }
    Ok(())
}

/// A read-only `rows x cols` matrix view: element `(i, j)` is `data[i*row_stride + j*col_stride]`.
///
/// Any strides are allowed (a transposed view swaps them; a stride of 0 broadcasts); the
/// constructor checks that every element lies inside `data`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    pub(super) data: &'a [T],
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) row_stride: usize,
    pub(super) col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A strided view of `data`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if some element lies outside `data` or the extent overflows.
    pub fn new(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self> {
        check_bounds(data.len(), rows, cols, row_stride, col_stride)?;
        Ok(Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// A dense row-major view (`row_stride = cols`, `col_stride = 1`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `data` holds fewer than `rows * cols` elements.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// A mutable `rows x cols` matrix view: element `(i, j)` is `data[i*row_stride + j*col_stride]`.
///
/// The constructor checks that every element lies inside `data` and that distinct `(i, j)`
/// name distinct elements (row-major-like or column-major-like strides), so that threads can
/// write disjoint parts of it.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    pub(super) data: &'a mut [T],
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) row_stride: usize,
    pub(super) col_stride: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// A strided mutable view of `data`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if some element lies outside `data`, or two elements of the
    /// view would share memory.
    pub fn new(
        data: &'a mut [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self> {
        check_bounds(data.len(), rows, cols, row_stride, col_stride)?;
        let distinct = rows * cols <= 1
            || (rows == 1 && col_stride >= 1)
            || (cols == 1 && row_stride >= 1)
            || (col_stride >= 1 && row_stride >= cols.saturating_mul(col_stride))
            || (row_stride >= 1 && col_stride >= rows.saturating_mul(row_stride));
        if !distinct {
            return Err(Error::invalid(format!(
                "output strides ({row_stride}, {col_stride}) make elements of a {rows}x{cols} \
                 matrix overlap"
            )));
        }
        Ok(Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// A dense row-major view (`row_stride = cols`, `col_stride = 1`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `data` holds fewer than `rows * cols` elements.
    pub fn row_major(data: &'a mut [T], rows: usize, cols: usize) -> Result<Self> {
        Self::new(data, rows, cols, cols, 1)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}
