//! # sdxl (C ABI)
//!
//! The C interface of `sdxl-core`: load an SDXL base (and refiner) from a diffusers folder,
//! generate images into caller-provided RGBA8 buffers, synchronously or as a job on a worker
//! thread, with progress, previews and cancellation. The header `include/sdxl.h` is generated
//! from this crate by cbindgen; every item's documentation there comes from the doc comments
//! here.
//!
//! Rules every export follows:
//! - it returns an `sdxl_status` (0 = OK) or a neutral value, never unwinds or aborts: each
//!   body runs behind `catch_unwind`, and a handle that saw a panic refuses further use;
//! - NULL pointers are reported as `SDXL_STATUS_NULL_ARGUMENT`, structs are checked through
//!   their leading `struct_size`, strings must be UTF-8;
//! - outputs are written only on success; the calling thread's detailed message is available
//!   from `sdxl_last_error_message`.
//!
//! From Rust the same functions can be called directly (they are `unsafe extern "C"`), which is
//! how the parity tests drive them:
//!
//! ```
//! use std::ffi::CStr;
//!
//! // SAFETY: both functions return static NUL-terminated strings.
//! let version = unsafe { CStr::from_ptr(sdxl::sdxl_version()) };
//! assert!(version.to_string_lossy().starts_with("sdxl "));
//! let text = unsafe { CStr::from_ptr(sdxl::sdxl_status_str(sdxl::SDXL_STATUS_CANCELLED)) };
//! assert_eq!(text.to_string_lossy(), "cancelled");
//! assert_eq!(sdxl::sdxl_abi_version(), sdxl::SDXL_ABI_VERSION);
//! ```
#![warn(missing_docs)]
#![allow(non_camel_case_types)]

// The module order is the order of the header's sections.
pub mod status;

mod last_error;

pub mod log;

pub mod model;

pub mod cancel;

pub mod params;

pub mod generate;

pub mod job;

mod abi;
mod guard;
mod run;

pub use cancel::*;
pub use generate::*;
pub use job::*;
pub use last_error::sdxl_last_error_message;
pub use log::*;
pub use model::*;
pub use params::*;
pub use status::*;

use std::ffi::c_char;

/// Major version of the library (matches `sdxl-ffi`'s Cargo.toml).
pub const SDXL_VERSION_MAJOR: u32 = 0;
/// Minor version of the library (matches `sdxl-ffi`'s Cargo.toml).
pub const SDXL_VERSION_MINOR: u32 = 1;
/// Patch version of the library (matches `sdxl-ffi`'s Cargo.toml).
pub const SDXL_VERSION_PATCH: u32 = 0;

/// Version of the binary interface described by this header: struct layouts, function
/// signatures and constant values. It changes whenever any of them changes incompatibly;
/// bindings compare it with `sdxl_abi_version()` when they load the library and refuse a
/// mismatch.
pub const SDXL_ABI_VERSION: u32 = 1;

/// Parses a decimal version component at compile time.
const fn parse_u32(s: &str) -> u32 {
    let bytes = s.as_bytes();
    let mut value = 0u32;
    let mut i = 0;
    while i < bytes.len() {
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}

// The version macros must match Cargo.toml: a mismatch fails the build.
const _: () = assert!(parse_u32(env!("CARGO_PKG_VERSION_MAJOR")) == SDXL_VERSION_MAJOR);
const _: () = assert!(parse_u32(env!("CARGO_PKG_VERSION_MINOR")) == SDXL_VERSION_MINOR);
const _: () = assert!(parse_u32(env!("CARGO_PKG_VERSION_PATCH")) == SDXL_VERSION_PATCH);

/// `SDXL_ABI_VERSION` of the loaded library; compare it with the header's macro.
///
/// Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn sdxl_abi_version() -> u32 {
    SDXL_ABI_VERSION
}

/// A static NUL-terminated string naming the library version, the candle version it was built
/// with and the enabled features, e.g. `"sdxl 0.1.0 (candle 0.11.1; features: cpu)"`.
///
/// Valid as long as the library is loaded. Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn sdxl_version() -> *const c_char {
    concat!(env!("SDXL_VERSION_STRING"), "\0").as_ptr().cast()
}
