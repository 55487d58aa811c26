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

/// A mutable `rows x cols` matrix view: element `(i, j)` is `ptr[i*row_stride + j*col_stride]`.
///
/// Made from a slice ([`MatMut::new`], checked) or from a pointer into a buffer that other
/// views share ([`MatMut::from_raw_parts`], for disjoint blocks written by several threads).
/// Distinct `(i, j)` always name distinct elements (row-major-like or column-major-like
/// strides), so that threads can write disjoint parts of it.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    pub(super) ptr: *mut T,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) row_stride: usize,
    pub(super) col_stride: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: a `MatMut` is an exclusive borrow of its elements, like `&mut [T]`.
unsafe impl<T: Send> Send for MatMut<'_, T> {}

/// Checks that distinct `(i, j)` of the view name distinct elements.
fn check_distinct(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Result<()> {
    let distinct = rows * cols <= 1
        || (rows == 1 && col_stride >= 1)
        || (cols == 1 && row_stride >= 1)
        || (col_stride >= 1 && row_stride >= cols.saturating_mul(col_stride))
        || (row_stride >= 1 && col_stride >= rows.saturating_mul(row_stride));
    if distinct {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "output strides ({row_stride}, {col_stride}) make elements of a {rows}x{cols} \
             matrix overlap"
        )))
    }
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
        check_distinct(rows, cols, row_stride, col_stride)?;
        Ok(Self {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            row_stride,
            col_stride,
            _borrow: std::marker::PhantomData,
        })
    }

    /// A strided view of the elements `ptr[i*row_stride + j*col_stride]`, for a block of a
    /// buffer whose other blocks other threads write meanwhile (a tile of an NCHW output).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if two elements of the view would share memory or the extent
    /// overflows.
    ///
    /// # Safety
    /// Every element of the view must lie in one allocation, be valid for writes of `T` for
    /// `'a`, and be neither read nor written through anything else while the view lives. The
    /// elements may be uninitialised when the view is only written (a GEMM that does not
    /// accumulate); anything that reads them needs them initialised.
    pub unsafe fn from_raw_parts(
        ptr: *mut T,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self> {
        if rows > 0 && cols > 0 {
            last_offset(rows, cols, row_stride, col_stride)?;
        }
        check_distinct(rows, cols, row_stride, col_stride)?;
        Ok(Self {
            ptr,
            rows,
            cols,
            row_stride,
            col_stride,
            _borrow: std::marker::PhantomData,
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

    /// Elements between consecutive rows.
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    /// Elements between consecutive columns.
    pub fn col_stride(&self) -> usize {
        self.col_stride
    }

    /// The pointer to element `(0, 0)`, for writing the view's elements.
    pub fn as_mut_ptr(&mut self) -> *mut T {
        self.ptr
    }

    /// Row `i` as a slice, for views with unit column stride (`None` otherwise, or when `i`
    /// is not a row).
    pub fn row_mut(&mut self, i: usize) -> Option<&mut [T]> {
        if i >= self.rows || (self.cols > 1 && self.col_stride != 1) {
            return None;
        }
        // SAFETY: the row's `cols` elements are consecutive (unit column stride), inside the
        // view and borrowed exclusively through `self` (guaranteed by the constructors).
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(i * self.row_stride), self.cols)
        })
    }

    /// Row `i` as a slice to write, for views with unit column stride whose elements may be
    /// uninitialised (`None` as for [`MatMut::row_mut`]).
    pub fn row_to_write(&mut self, i: usize) -> Option<&mut [std::mem::MaybeUninit<T>]> {
        if i >= self.rows || (self.cols > 1 && self.col_stride != 1) {
            return None;
        }
        // SAFETY: as in `row_mut`; `MaybeUninit<T>` has `T`'s layout and asks nothing of the
        // values.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(i * self.row_stride).cast(), self.cols)
        })
    }
}
