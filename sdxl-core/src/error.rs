//! The crate's error type.
//!
//! Every fallible function in `sdxl-core` returns [`Result`]. Each variant names the problem in
//! terms a user can act on (which file, which tensor, which value), and [`Error::code`] maps it to
//! a stable [`ErrorCode`] that the C ABI exposes as its status.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `sdxl-core`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or folder that is required does not exist.
    #[error("not found: {path} ({what})")]
    NotFound {
        /// The path that was looked for.
        path: PathBuf,
        /// What the path was expected to hold, e.g. "UNet config".
        what: String,
    },
    /// A file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config, vocabulary, model index) could not be parsed.
    #[error("invalid JSON in {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        #[source]
        source: serde_json::Error,
    },
    /// A safetensors file is malformed (truncated, bad header, unsupported dtype).
    #[error("invalid checkpoint {path}: {reason}")]
    InvalidCheckpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("tensor `{key}` is missing from the checkpoint")]
    MissingTensor {
        /// The full checkpoint key.
        key: String,
    },
    /// A tensor in the checkpoint does not have the shape the config implies.
    #[error("tensor `{key}` has shape {found:?}, but the config implies {expected:?}")]
    ShapeMismatch {
        /// The full checkpoint key.
        key: String,
        /// The shape the model config implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },
    /// A config value is valid JSON but describes something this crate does not implement
    /// (an unknown block type, activation or scheduler).
    #[error("unsupported configuration: {0}")]
    Unsupported(String),
    /// A caller-supplied argument is out of range or inconsistent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The tokenizer files could not be turned into a tokenizer, or encoding failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A model produced NaN or infinite values.
    #[error("{what} produced non-finite values (NaN or infinity){hint}")]
    NonFinite {
        /// Which computation, e.g. "VAE decode".
        what: String,
        /// What the user can do about it, starting with ": " or empty.
        hint: String,
    },
    /// The operation was cancelled through a cancel token or a progress callback.
    #[error("cancelled")]
    Cancelled,
    /// A tensor operation failed inside candle (device error, out of memory, internal shape bug).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Stable numeric classes of [`Error`], used as status codes by the C ABI.
///
/// Values are never reused or renumbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum ErrorCode {
    /// A caller-supplied argument is invalid.
    InvalidArgument = 2,
    /// A file could not be found or read.
    Io = 3,
    /// A model file or config is malformed or inconsistent.
    ModelFormat = 4,
    /// The request needs something this build does not implement.
    Unsupported = 5,
    /// A device or tensor operation failed (including out of memory).
    Device = 6,
    /// The operation was cancelled.
    Cancelled = 7,
    /// A computation produced NaN or infinity.
    NonFinite = 10,
}

impl Error {
    /// The stable class of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::NotFound { .. } | Error::Io { .. } => ErrorCode::Io,
            Error::Json { .. }
            | Error::InvalidCheckpoint { .. }
            | Error::MissingTensor { .. }
            | Error::ShapeMismatch { .. }
            | Error::Tokenizer(_) => ErrorCode::ModelFormat,
            Error::Unsupported(_) => ErrorCode::Unsupported,
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::NonFinite { .. } => ErrorCode::NonFinite,
            Error::Cancelled => ErrorCode::Cancelled,
            Error::Candle(_) => ErrorCode::Device,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// Shorthand for [`Error::Unsupported`].
    pub(crate) fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }
}
