//! Reading what C callers pass: versioned structs, strings and output pointers.

use std::ffi::{c_char, CStr};

use crate::status::{Failure, FfiResult, SDXL_STATUS_ABI_MISMATCH};

/// A `#[repr(C)]` struct whose first field is `uint32_t struct_size`.
///
/// # Safety
/// Implementors must be `#[repr(C)]` with a `u32` as their first field.
pub(crate) unsafe trait Versioned: Sized {
    /// The C name, for messages.
    const NAME: &'static str;
}

/// Borrows a versioned struct after checking that its `struct_size` is the size this library
/// was built with.
///
/// # Safety
/// `ptr` must be NULL or point to at least 4 readable bytes that start a `T` of the size it
/// claims, valid for `'a`.
pub(crate) unsafe fn versioned<'a, T: Versioned>(ptr: *const T, arg: &str) -> FfiResult<&'a T> {
    if ptr.is_null() {
        return Err(Failure::null(arg));
    }
    // SAFETY: the caller guarantees the leading u32 is readable.
    let size = unsafe { ptr.cast::<u32>().read_unaligned() };
    let expected = std::mem::size_of::<T>();
    if size as usize != expected {
        return Err(Failure::new(
            SDXL_STATUS_ABI_MISMATCH,
            format!(
                "{}.struct_size is {size}, but this library (ABI {}) expects {expected}; \
                 fill the struct with its _init function and use the header that matches the \
                 library",
                T::NAME,
                crate::SDXL_ABI_VERSION
            ),
        ));
    }
    // SAFETY: the size matches, so the caller's struct is a whole `T`.
    Ok(unsafe { &*ptr })
}

/// A NUL-terminated UTF-8 string, or `None` for NULL.
///
/// # Safety
/// `ptr` must be NULL or a NUL-terminated string valid for `'a`.
pub(crate) unsafe fn opt_str<'a>(ptr: *const c_char, arg: &str) -> FfiResult<Option<&'a str>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller guarantees a NUL-terminated string.
    let bytes = unsafe { CStr::from_ptr(ptr) };
    bytes.to_str().map(Some).map_err(|e| {
        Failure::invalid(format!(
            "`{arg}` is not valid UTF-8 (bad byte at offset {})",
            e.valid_up_to()
        ))
    })
}

/// A required NUL-terminated UTF-8 string.
///
/// # Safety
/// As [`opt_str`].
pub(crate) unsafe fn req_str<'a>(ptr: *const c_char, arg: &str) -> FfiResult<&'a str> {
    // SAFETY: forwarded.
    unsafe { opt_str(ptr, arg) }?.ok_or_else(|| Failure::null(arg))
}

/// Borrows a required handle.
///
/// # Safety
/// `ptr` must be NULL or a live handle of type `T` for `'a`.
pub(crate) unsafe fn handle<'a, T>(ptr: *const T, arg: &str) -> FfiResult<&'a T> {
    // SAFETY: the caller guarantees a live handle.
    unsafe { ptr.as_ref() }.ok_or_else(|| Failure::null(arg))
}

/// Checks that an output pointer is not NULL.
pub(crate) fn out_ptr<T>(ptr: *mut T, arg: &str) -> FfiResult<*mut T> {
    if ptr.is_null() {
        Err(Failure::null(arg))
    } else {
        Ok(ptr)
    }
}
