//! Reading JSON config files into serde structs with errors that name the file.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads and parses `path`; `what` describes the file for the not-found message.
///
/// # Errors
/// [`Error::NotFound`], [`Error::Io`] or [`Error::Json`], each naming the file.
pub fn read_json<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
            what: what.into(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
