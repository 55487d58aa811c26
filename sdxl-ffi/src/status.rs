//! Stable status codes, their static descriptions, and the internal failure type that carries a
//! status with its detailed message.

use std::ffi::c_char;

use sdxl_core::Error;

/// The result of every fallible call: `SDXL_STATUS_OK` (0) or one of the `SDXL_STATUS_*` codes.
///
/// Codes are stable: they are never renumbered or reused. Codes 2–7 and 10 are the classes of
/// the Rust library's errors (`sdxl_core::ErrorCode`) with the same numbers.
pub type sdxl_status = i32;

/// Success.
pub const SDXL_STATUS_OK: sdxl_status = 0;
/// A required pointer argument was NULL.
pub const SDXL_STATUS_NULL_ARGUMENT: sdxl_status = 1;
/// An argument is out of range or inconsistent (including a string that is not valid UTF-8).
pub const SDXL_STATUS_INVALID_ARGUMENT: sdxl_status = 2;
/// A file or folder could not be found or read.
pub const SDXL_STATUS_IO: sdxl_status = 3;
/// A model file or config is malformed or inconsistent.
pub const SDXL_STATUS_MODEL_FORMAT: sdxl_status = 4;
/// The request needs something this build does not implement (e.g. CUDA in a CPU-only build).
pub const SDXL_STATUS_UNSUPPORTED: sdxl_status = 5;
/// A device or tensor operation failed, including running out of (device) memory.
pub const SDXL_STATUS_DEVICE: sdxl_status = 6;
/// The run was cancelled by a cancel token, `sdxl_job_cancel` or the progress callback.
pub const SDXL_STATUS_CANCELLED: sdxl_status = 7;
/// The library panicked (a bug); the handles involved are poisoned.
pub const SDXL_STATUS_PANIC: sdxl_status = 8;
/// A `struct_size` does not match the size this library was built with.
pub const SDXL_STATUS_ABI_MISMATCH: sdxl_status = 9;
/// The model produced NaN or infinite values (try f32 or bf16 instead of f16).
pub const SDXL_STATUS_NON_FINITE: sdxl_status = 10;
/// A caller-provided output buffer is smaller than the size query says.
pub const SDXL_STATUS_BUFFER_TOO_SMALL: sdxl_status = 11;
/// `sdxl_job_wait` timed out; the job is still running.
pub const SDXL_STATUS_TIMEOUT: sdxl_status = 12;
/// The handle saw a panic earlier and refuses further use; free it.
pub const SDXL_STATUS_POISONED: sdxl_status = 13;
/// The job has not finished yet, so its result cannot be taken.
pub const SDXL_STATUS_NOT_READY: sdxl_status = 14;

/// The description of a status, NUL-terminated.
pub(crate) fn describe(status: sdxl_status) -> &'static [u8] {
    match status {
        SDXL_STATUS_OK => b"ok\0",
        SDXL_STATUS_NULL_ARGUMENT => b"a required pointer argument is NULL\0",
        SDXL_STATUS_INVALID_ARGUMENT => b"invalid argument\0",
        SDXL_STATUS_IO => b"file not found or not readable\0",
        SDXL_STATUS_MODEL_FORMAT => b"invalid model file or config\0",
        SDXL_STATUS_UNSUPPORTED => b"not supported by this build\0",
        SDXL_STATUS_DEVICE => b"device error or out of memory\0",
        SDXL_STATUS_CANCELLED => b"cancelled\0",
        SDXL_STATUS_PANIC => b"internal error (panic)\0",
        SDXL_STATUS_ABI_MISMATCH => b"struct_size does not match this library (ABI mismatch)\0",
        SDXL_STATUS_NON_FINITE => b"the model produced non-finite values\0",
        SDXL_STATUS_BUFFER_TOO_SMALL => b"output buffer too small\0",
        SDXL_STATUS_TIMEOUT => b"timed out\0",
        SDXL_STATUS_POISONED => b"handle unusable after an earlier panic\0",
        SDXL_STATUS_NOT_READY => b"the job has not finished\0",
        _ => b"unknown status\0",
    }
}

/// A static, NUL-terminated English description of `status`; never NULL.
///
/// Unknown codes give `"unknown status"`. The string lives as long as the library is loaded.
/// Thread-safe.
#[no_mangle]
pub extern "C" fn sdxl_status_str(status: sdxl_status) -> *const c_char {
    describe(status).as_ptr().cast()
}

/// A failed call: its status and the detailed message stored for `sdxl_last_error_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The status returned to the caller.
    pub status: sdxl_status,
    /// What went wrong, in words a user can act on.
    pub message: String,
}

impl Failure {
    /// A failure with `status` and `message`.
    pub fn new(status: sdxl_status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// `SDXL_STATUS_NULL_ARGUMENT` naming the argument.
    pub fn null(what: &str) -> Self {
        Self::new(SDXL_STATUS_NULL_ARGUMENT, format!("`{what}` is NULL"))
    }

    /// `SDXL_STATUS_INVALID_ARGUMENT` with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(SDXL_STATUS_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Candle(c) => candle_status(c),
            other => other.code() as sdxl_status,
        };
        Self::new(status, e.to_string())
    }
}

impl From<candle_core::Error> for Failure {
    fn from(e: candle_core::Error) -> Self {
        Self::new(candle_status(&e), e.to_string())
    }
}

/// `SDXL_STATUS_UNSUPPORTED` for a backend this build lacks, `SDXL_STATUS_DEVICE` otherwise.
fn candle_status(e: &candle_core::Error) -> sdxl_status {
    use candle_core::Error as C;
    match e {
        C::NotCompiledWithCudaSupport | C::NotCompiledWithMetalSupport => SDXL_STATUS_UNSUPPORTED,
        C::WithBacktrace { inner, .. } | C::Context { inner, .. } => candle_status(inner),
        _ => SDXL_STATUS_DEVICE,
    }
}

/// The internal result type of every export.
pub(crate) type FfiResult<T> = Result<T, Failure>;

#[cfg(test)]
mod tests {
    use super::*;
    use sdxl_core::ErrorCode;

    #[test]
    fn core_codes_keep_their_numbers() {
        for (code, status) in [
            (ErrorCode::InvalidArgument, SDXL_STATUS_INVALID_ARGUMENT),
            (ErrorCode::Io, SDXL_STATUS_IO),
            (ErrorCode::ModelFormat, SDXL_STATUS_MODEL_FORMAT),
            (ErrorCode::Unsupported, SDXL_STATUS_UNSUPPORTED),
            (ErrorCode::Device, SDXL_STATUS_DEVICE),
            (ErrorCode::Cancelled, SDXL_STATUS_CANCELLED),
            (ErrorCode::NonFinite, SDXL_STATUS_NON_FINITE),
        ] {
            assert_eq!(code as i32, status);
        }
    }

    #[test]
    fn every_status_has_its_own_description() {
        let all: Vec<&[u8]> = (0..=SDXL_STATUS_NOT_READY).map(describe).collect();
        for (i, d) in all.iter().enumerate() {
            assert!(d.ends_with(b"\0"));
            assert_ne!(*d, describe(-1), "status {i} has no description");
            assert_eq!(all.iter().filter(|o| *o == d).count(), 1);
        }
    }

    #[test]
    fn missing_backend_is_unsupported() {
        let f = Failure::from(Error::Candle(
            candle_core::Error::NotCompiledWithCudaSupport,
        ));
        assert_eq!(f.status, SDXL_STATUS_UNSUPPORTED);
        assert_eq!(
            Failure::from(Error::Cancelled).status,
            SDXL_STATUS_CANCELLED
        );
    }
}
