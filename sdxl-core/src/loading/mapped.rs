//! Memory-mapped safetensors files whose tensors are converted straight from the mapping into
//! the dtype the model runs in, releasing the mapped pages as they are consumed.
//!
//! candle's own loader copies each tensor out of the mapping in its stored dtype and then
//! converts it element by element into a second buffer, and every page of the file stays
//! resident until the whole file is unmapped: loading a 5 GB f16 UNet as f32 peaked at the
//! file plus the converted weights. Here each tensor is converted in one vectorised pass from
//! the mapped bytes, and its pages are handed back to the page cache right after (they are
//! clean, read-only file pages: the kernel re-reads them should they be needed again).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::kernels::convert::{convert_slice, Element};
use crate::kernels::matmul::PackedWeight;

/// Where one tensor lies in its file.
#[derive(Debug, Clone)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the mapping.
    start: usize,
    end: usize,
}

/// One memory-mapped `.safetensors` file and the index of its tensors.
pub(crate) struct MappedFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    entries: HashMap<String, Entry>,
}

impl MappedFile {
    /// Maps `path` and reads its header.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidCheckpoint {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on it not
        // being truncated or rewritten while it is mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| invalid(e.to_string()))?;
        let data_start = header_len + 8;
        let entries = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (start, end) = info.data_offsets;
                let entry = Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + start,
                    end: data_start + end,
                };
                (name, entry)
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            entries,
        })
    }

    /// The stored shape of `key`.
    pub(crate) fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entries.get(key).map(|e| e.shape.as_slice())
    }

    /// Every key in the file.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// Reads `key` as `dtype` (`None`: the stored dtype) onto `device`, then releases its pages.
    /// With `transposed`, a 2-D tensor `[r, c]` is produced as its contiguous transpose
    /// `[c, r]`, converted and transposed in the same pass.
    pub(crate) fn load(
        &self,
        key: &str,
        dtype: Option<DType>,
        transposed: bool,
        device: &Device,
    ) -> Result<Tensor> {
        let (entry, bytes, stored) = self.locate(key)?;
        let target = dtype.unwrap_or(stored);
        self.prefetch(entry.start, entry.end - entry.start);
        let tensor = match (transposed, entry.shape.as_slice()) {
            (false, shape) => convert(bytes, stored, target, shape),
            (true, &[rows, cols]) => {
                super::transposing::convert_transposed(bytes, stored, target, rows, cols)
            }
            (true, shape) => Err(candle_core::Error::Msg(format!(
                "expected a 2-D tensor to transpose, found shape {shape:?}"
            ))),
        }
        .map_err(|e| self.invalid(key, e))?;
        self.release(entry.start, entry.end - entry.start);
        Ok(tensor.to_device(device)?)
    }

    /// Reads the 2-D weight `key` `[out, in]` packed for the native bf16 GEMM, converting it
    /// into `scratch` first (grown as needed and reused by the caller from weight to weight, so
    /// that its pages are faulted in once per load rather than once per weight), then releases
    /// its pages.
    pub(crate) fn load_packed(&self, key: &str, scratch: &mut Vec<bf16>) -> Result<PackedWeight> {
        let (entry, bytes, stored) = self.locate(key)?;
        let &[rows, cols] = entry.shape.as_slice() else {
            let shape = &entry.shape;
            return Err(self.invalid(key, format!("expected a 2-D weight, found shape {shape:?}")));
        };
        let len = rows
            .checked_mul(cols)
            .filter(|&len| Some(bytes.len()) == len.checked_mul(stored.size_in_bytes()))
            .ok_or_else(|| {
                let what = format!(
                    "{} bytes stored for a {rows}x{cols} {stored:?} tensor",
                    bytes.len()
                );
                self.invalid(key, what)
            })?;
        if scratch.len() < len {
            scratch.resize(len, bf16::ZERO);
        }
        let values = &mut scratch[..len];
        self.prefetch(entry.start, bytes.len());
        match stored {
            DType::F32 => with_aligned::<f32, _>(bytes, |src| convert_slice(src, values)),
            DType::F16 => with_aligned::<f16, _>(bytes, |src| convert_slice(src, values)),
            DType::BF16 => with_aligned::<bf16, _>(bytes, |src| convert_slice(src, values)),
            other => {
                let what = format!("{other:?} is not a float type a weight can be packed from");
                return Err(self.invalid(key, what));
            }
        }
        let packed =
            PackedWeight::pack_rows(values, rows, cols).map_err(|e| self.invalid(key, e))?;
        self.release(entry.start, bytes.len());
        Ok(packed)
    }

    /// `key`'s entry, its bytes in the mapping and its stored dtype.
    fn locate(&self, key: &str) -> Result<(&Entry, &[u8], DType)> {
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| Error::MissingTensor { key: key.into() })?;
        let bytes = self
            .mmap
            .get(entry.start..entry.end)
            .ok_or_else(|| self.invalid(key, "data lies outside the file"))?;
        let stored = stored_dtype(entry.dtype).ok_or_else(|| {
            Error::unsupported(format!(
                "tensor `{key}` in {}: dtype {:?} is not supported",
                self.path.display(),
                entry.dtype
            ))
        })?;
        Ok((entry, bytes, stored))
    }

    /// The error for a tensor `key` of this file that cannot be read as it claims.
    fn invalid(&self, key: &str, reason: impl std::fmt::Display) -> Error {
        Error::InvalidCheckpoint {
            path: self.path.clone(),
            reason: format!("tensor `{key}`: {reason}"),
        }
    }

    /// Maps a byte range in one call instead of one page fault per page (Linux 5.14+; older
    /// kernels refuse the advice and the pages fault in as usual).
    fn prefetch(&self, offset: usize, len: usize) {
        #[cfg(target_os = "linux")]
        let _ = self
            .mmap
            .advise_range(memmap2::Advice::PopulateRead, offset, len);
        #[cfg(not(target_os = "linux"))]
        let _ = (offset, len);
    }

    /// Drops the mapped pages of a consumed byte range from this process's resident memory.
    fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        {
            // SAFETY: the mapping is read-only and backed by the file, so discarding its pages
            // loses nothing: a later read faults them in again from the file. No Rust reference
            // into the range outlives this call (the converted tensor owns its own buffer).
            // Failure only means the pages stay resident, so it is ignored.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            };
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }
}

/// candle's dtype for a stored safetensors dtype.
fn stored_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I64 => DType::I64,
        _ => return None,
    })
}

/// A CPU tensor of `shape` in `target` from little-endian `bytes` stored as `stored`, converted
/// in one parallel pass for the float conversions a model load needs.
fn convert(
    bytes: &[u8],
    stored: DType,
    target: DType,
    shape: &[usize],
) -> candle_core::Result<Tensor> {
    match (stored, target) {
        (DType::F16, DType::F32) => converted::<f16, f32>(bytes, shape),
        (DType::BF16, DType::F32) => converted::<bf16, f32>(bytes, shape),
        (DType::F16, DType::BF16) => converted::<f16, bf16>(bytes, shape),
        (DType::F32, DType::F16) => converted::<f32, f16>(bytes, shape),
        (DType::F32, DType::BF16) => converted::<f32, bf16>(bytes, shape),
        _ => Tensor::from_raw_buffer(bytes, stored, shape, &Device::Cpu)?.to_dtype(target),
    }
}

/// The `S` values in `bytes` as a CPU tensor of `D`.
fn converted<S: Element, D: Element>(bytes: &[u8], shape: &[usize]) -> candle_core::Result<Tensor> {
    let values = with_aligned::<S, _>(bytes, |src| crate::kernels::convert::converted::<S, D>(src));
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// Runs `f` on `bytes` viewed as `T` values, through an aligned copy when the mapping places
/// them unaligned (safetensors does not promise alignment).
pub(super) fn with_aligned<T: Copy + Default, R>(bytes: &[u8], f: impl FnOnce(&[T]) -> R) -> R {
    // SAFETY: `T` is a plain float type: every bit pattern is a valid value.
    let (head, values, tail) = unsafe { bytes.align_to::<T>() };
    if head.is_empty() && tail.is_empty() {
        return f(values);
    }
    let size = std::mem::size_of::<T>();
    let mut copy = vec![T::default(); bytes.len() / size];
    // SAFETY: `copy` holds exactly `bytes.len() / size` values of `size` bytes; the byte copy
    // fills them from the unaligned source.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            copy.as_mut_ptr().cast::<u8>(),
            copy.len() * size,
        );
    }
    f(&copy)
}
