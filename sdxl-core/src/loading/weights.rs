//! Named tensors read from checkpoints, walked like the checkpoint's key tree.
//!
//! [`Weights`] is a cheap, clonable view into a [`TensorSource`] with a key prefix, a target
//! dtype and a device. Model constructors receive a `Weights` positioned at their own prefix and
//! ask for their tensors by the checkpoint's own names, so a missing or misshapen tensor fails at
//! load time with an error naming its full key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use half::bf16;

use super::mapped::MappedFile;
use crate::error::{Error, Result};
use crate::kernels::matmul::PackedWeight;

/// Somewhere tensors can be read from by their full checkpoint key.
///
/// Implemented for memory-mapped safetensors files and for in-memory maps; key-renaming
/// adapters (single-file checkpoints) implement it on top of another source.
pub trait TensorSource: Send + Sync {
    /// The stored shape of `key`, or `None` when the source has no such tensor.
    fn shape(&self, key: &str) -> Option<Vec<usize>>;
    /// Reads `key` onto `device`, in the stored dtype.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] when absent, or a read error from the underlying file.
    fn load(&self, key: &str, device: &Device) -> Result<Tensor>;
    /// Reads `key` onto `device` as `dtype`. Sources that can convert while reading (memory-
    /// mapped files) override this to skip the intermediate tensor in the stored dtype.
    ///
    /// # Errors
    /// As [`TensorSource::load`].
    fn load_as(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.load(key, device)?;
        if t.dtype() == dtype {
            Ok(t)
        } else {
            Ok(t.to_dtype(dtype)?)
        }
    }
    /// Reads the 2-D tensor `key` `[r, c]` onto `device` as `dtype`, transposed: a contiguous
    /// `[c, r]` (how [`crate::layers::Linear`] keeps its weight). Memory-mapped files convert
    /// and transpose in one pass.
    ///
    /// # Errors
    /// As [`TensorSource::load`], and a tensor that is not 2-D.
    fn load_transposed(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.load_as(key, dtype, device)?;
        Ok(crate::kernels::transpose::transpose_2d(&t)?)
    }
    /// Reads the 2-D weight `key` `[out, in]` onto `device` packed for the native bf16 GEMM
    /// ([`PackedWeight`]), or `None` where that GEMM does not run. Memory-mapped files convert
    /// into a buffer reused from weight to weight instead of a new tensor per weight.
    ///
    /// # Errors
    /// As [`TensorSource::load`], and a tensor that is not 2-D.
    fn load_packed(&self, key: &str, device: &Device) -> Result<Option<PackedWeight>> {
        let weight = self.load_as(key, DType::BF16, device)?;
        Ok(PackedWeight::pack(&weight.t()?)?)
    }
    /// Every key the source holds, in no particular order.
    fn keys(&self) -> Vec<String>;
}

/// One or more memory-mapped `.safetensors` files (several for sharded checkpoints).
pub struct SafetensorsFiles {
    files: Vec<PathBuf>,
    mapped: Vec<MappedFile>,
    /// Which of `mapped` holds each key.
    routing: HashMap<String, usize>,
    /// Where weights are converted before they are packed: grown to the largest one and kept
    /// while the files are mapped (at most 26 MB for SDXL's UNet).
    packing_scratch: Mutex<Vec<bf16>>,
}

impl SafetensorsFiles {
    /// Memory-maps `files`. Nothing is copied until a tensor is loaded.
    ///
    /// # Errors
    /// [`Error::NotFound`] for a missing file, [`Error::InvalidCheckpoint`] for a file whose
    /// header cannot be parsed or whose data is shorter than the header claims.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        for f in files {
            if !f.is_file() {
                return Err(Error::NotFound {
                    path: f.clone(),
                    what: "safetensors weights file".into(),
                });
            }
        }
        let mapped = files
            .iter()
            .map(|f| MappedFile::open(f))
            .collect::<Result<Vec<_>>>()?;
        let routing = mapped
            .iter()
            .enumerate()
            .flat_map(|(i, m)| m.keys().map(move |k| (k.clone(), i)))
            .collect();
        Ok(Self {
            files: files.to_vec(),
            mapped,
            routing,
            packing_scratch: Mutex::new(Vec::new()),
        })
    }

    fn file_of(&self, key: &str) -> Result<&MappedFile> {
        self.routing
            .get(key)
            .and_then(|&i| self.mapped.get(i))
            .ok_or_else(|| Error::MissingTensor { key: key.into() })
    }

    /// The files this source maps.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl TensorSource for SafetensorsFiles {
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let file = self.file_of(key).ok()?;
        file.shape(key).map(<[usize]>::to_vec)
    }

    fn load(&self, key: &str, device: &Device) -> Result<Tensor> {
        self.file_of(key)?.load(key, None, false, device)
    }

    fn load_as(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.file_of(key)?.load(key, Some(dtype), false, device)
    }

    fn load_transposed(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.file_of(key)?.load(key, Some(dtype), true, device)
    }

    fn load_packed(&self, key: &str, device: &Device) -> Result<Option<PackedWeight>> {
        if !PackedWeight::applies(DType::BF16, device) {
            return Ok(None);
        }
        let file = self.file_of(key)?;
        let mut scratch = self
            .packing_scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.load_packed(key, &mut scratch).map(Some)
    }

    fn keys(&self) -> Vec<String> {
        self.routing.keys().cloned().collect()
    }
}

impl TensorSource for HashMap<String, Tensor> {
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.get(key).map(|t| t.dims().to_vec())
    }

    fn load(&self, key: &str, device: &Device) -> Result<Tensor> {
        let t = self
            .get(key)
            .ok_or_else(|| Error::MissingTensor { key: key.into() })?;
        Ok(t.to_device(device)?)
    }

    fn keys(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

/// A view into a [`TensorSource`] at a key prefix, producing tensors in one dtype on one device.
#[derive(Clone)]
pub struct Weights {
    source: Arc<dyn TensorSource>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("prefix", &self.prefix)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish()
    }
}

impl Weights {
    /// Wraps a source; tensors are converted to `dtype` and moved to `device` when read.
    pub fn new(source: Arc<dyn TensorSource>, dtype: DType, device: &Device) -> Self {
        Self {
            source,
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// Memory-maps safetensors files (one, or the shards of one checkpoint).
    ///
    /// # Errors
    /// See [`SafetensorsFiles::open`].
    pub fn from_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::new(
            Arc::new(SafetensorsFiles::open(files)?),
            dtype,
            device,
        ))
    }

    /// Convenience for a single file.
    ///
    /// # Errors
    /// See [`SafetensorsFiles::open`].
    pub fn from_safetensors_file(file: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_safetensors(&[file.to_path_buf()], dtype, device)
    }

    /// The same source one level deeper in the key tree (`prefix.name`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    /// The same source, producing another dtype.
    pub fn with_dtype(&self, dtype: DType) -> Self {
        Self {
            dtype,
            ..self.clone()
        }
    }

    /// The full checkpoint key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The dtype tensors are produced in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are produced on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The underlying source.
    pub fn source(&self) -> &Arc<dyn TensorSource> {
        &self.source
    }

    /// Whether `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.source.shape(&self.key(name)).is_some()
    }

    /// The stored shape of `name`.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] with the full key.
    pub fn shape_of(&self, name: &str) -> Result<Vec<usize>> {
        let key = self.key(name);
        self.source.shape(&key).ok_or(Error::MissingTensor { key })
    }

    /// Reads `name`, checking that its shape is `shape`.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] or [`Error::ShapeMismatch`], both naming the full key.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let key = self.checked_key(shape, name)?;
        self.read(&key)
    }

    /// The full key of `name`, once its stored shape is known to be `shape`.
    fn checked_key(&self, shape: impl Into<Shape>, name: &str) -> Result<String> {
        let expected: Shape = shape.into();
        let key = self.key(name);
        let found = self
            .source
            .shape(&key)
            .ok_or_else(|| Error::MissingTensor { key: key.clone() })?;
        if found.as_slice() != expected.dims() {
            return Err(Error::ShapeMismatch {
                key,
                expected: expected.dims().to_vec(),
                found,
            });
        }
        Ok(key)
    }

    /// Reads the 2-D weight `name`, checking that its shape is `[rows, cols]`, packed for the
    /// native bf16 GEMM when this view's dtype and device run it (see [`PackedWeight::applies`]);
    /// `None` otherwise.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] or [`Error::ShapeMismatch`], both naming the full key.
    pub fn get_packed(&self, shape: (usize, usize), name: &str) -> Result<Option<PackedWeight>> {
        if !PackedWeight::applies(self.dtype, &self.device) {
            return Ok(None);
        }
        let key = self.checked_key(shape, name)?;
        self.source.load_packed(&key, &self.device)
    }

    /// Reads the 2-D tensor `name`, checking that its shape is `[rows, cols]`, as its
    /// contiguous transpose `[cols, rows]`.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] or [`Error::ShapeMismatch`], both naming the full key.
    pub fn get_transposed(&self, (rows, cols): (usize, usize), name: &str) -> Result<Tensor> {
        let key = self.checked_key((rows, cols), name)?;
        self.source.load_transposed(&key, self.dtype, &self.device)
    }

    /// Reads `name` whatever its shape (for tensors whose shape is not implied by a config).
    ///
    /// # Errors
    /// [`Error::MissingTensor`] naming the full key.
    pub fn get_unchecked(&self, name: &str) -> Result<Tensor> {
        self.read(&self.key(name))
    }

    fn read(&self, key: &str) -> Result<Tensor> {
        self.source.load_as(key, self.dtype, &self.device)
    }
}
