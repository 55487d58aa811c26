//! Loading models: the load options and the shareable model handle.

use std::ffi::c_char;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use sdxl_core::pipeline::{LoadOptions, ModelKind, SdxlModel};

use crate::abi::{handle, opt_str, out_ptr, req_str, versioned, Versioned};
use crate::guard::{catch, run_export, Poison};
use crate::log::{log, SDXL_LOG_INFO};
use crate::status::{sdxl_status, Failure, FfiResult};

/// Run on the CPU (always available).
pub const SDXL_DEVICE_CPU: i32 = 0;
/// Run on a CUDA GPU (builds with the `cuda` feature).
pub const SDXL_DEVICE_CUDA: i32 = 1;
/// Run on a Metal GPU (builds with the `metal` feature).
pub const SDXL_DEVICE_METAL: i32 = 2;

/// Choose automatically (only for `vae_dtype`).
pub const SDXL_DTYPE_AUTO: i32 = -1;
/// 32-bit floats.
pub const SDXL_DTYPE_F32: i32 = 0;
/// 16-bit IEEE floats.
pub const SDXL_DTYPE_F16: i32 = 1;
/// bfloat16.
pub const SDXL_DTYPE_BF16: i32 = 2;

/// An SDXL base model (two text encoders; text-to-image and image-to-image).
pub const SDXL_MODEL_BASE: i32 = 0;
/// An SDXL refiner (one text encoder, aesthetic-score conditioning; image-to-image only).
pub const SDXL_MODEL_REFINER: i32 = 1;

/// How to load a model. Fill it with `sdxl_load_options_init`, then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sdxl_load_options {
    /// `sizeof(sdxl_load_options)`, set by `sdxl_load_options_init`.
    pub struct_size: u32,
    /// `SDXL_DEVICE_*`. Default `SDXL_DEVICE_CPU`.
    pub device: i32,
    /// Which GPU for CUDA/Metal. Default 0.
    pub device_index: u32,
    /// Precision of the text encoders and the UNet: `SDXL_DTYPE_F32`, `_F16` or `_BF16`.
    /// Default `SDXL_DTYPE_F32`.
    pub dtype: i32,
    /// Precision of the VAE, or `SDXL_DTYPE_AUTO` (default): `dtype`, except f32 when `dtype` is
    /// f16 and the VAE config sets `force_upcast` (the SDXL VAE overflows in f16), as diffusers.
    pub vae_dtype: i32,
    /// Weights variant, e.g. `"fp16"` for `*.fp16.safetensors`; NULL (default) for the plain
    /// files. UTF-8, read only during `sdxl_model_load`.
    pub variant: *const c_char,
}

// SAFETY: `#[repr(C)]` with `struct_size: u32` first.
unsafe impl Versioned for sdxl_load_options {
    const NAME: &'static str = "sdxl_load_options";
}

impl Default for sdxl_load_options {
    fn default() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            device: SDXL_DEVICE_CPU,
            device_index: 0,
            dtype: SDXL_DTYPE_F32,
            vae_dtype: SDXL_DTYPE_AUTO,
            variant: std::ptr::null(),
        }
    }
}

/// Loaded weights shared by handles and running jobs.
#[derive(Debug)]
pub(crate) struct LoadedModel {
    /// The model.
    pub model: SdxlModel,
    /// Set when a call using the model panicked.
    pub poison: Poison,
}

/// A loaded SDXL base or refiner (opaque).
///
/// Read-only after loading: one model may be used by any number of threads at once (concurrent
/// `sdxl_generate` calls and jobs). Running jobs keep the weights alive, so the handle may be
/// freed while they run; it must not be freed while another thread is inside a call that was
/// passed this handle.
#[derive(Debug)]
pub struct sdxl_model {
    pub(crate) shared: Arc<LoadedModel>,
}

fn dtype(value: i32, field: &str) -> FfiResult<DType> {
    match value {
        SDXL_DTYPE_F32 => Ok(DType::F32),
        SDXL_DTYPE_F16 => Ok(DType::F16),
        SDXL_DTYPE_BF16 => Ok(DType::BF16),
        other => Err(Failure::invalid(format!(
            "{field} {other} is not one of SDXL_DTYPE_F32 (0), SDXL_DTYPE_F16 (1), \
             SDXL_DTYPE_BF16 (2)"
        ))),
    }
}

/// The core's load options for a C options struct.
///
/// # Safety
/// `options.variant` must be NULL or a NUL-terminated string.
unsafe fn load_options(options: &sdxl_load_options) -> FfiResult<LoadOptions> {
    let index = options.device_index as usize;
    let device = match options.device {
        SDXL_DEVICE_CPU => Device::Cpu,
        SDXL_DEVICE_CUDA => Device::new_cuda(index)?,
        SDXL_DEVICE_METAL => Device::new_metal(index)?,
        other => {
            return Err(Failure::invalid(format!(
                "device {other} is not one of SDXL_DEVICE_CPU (0), SDXL_DEVICE_CUDA (1), \
                 SDXL_DEVICE_METAL (2)"
            )))
        }
    };
    let vae_dtype = match options.vae_dtype {
        SDXL_DTYPE_AUTO => None,
        v => Some(dtype(v, "vae_dtype")?),
    };
    // SAFETY: forwarded from the caller.
    let variant = unsafe { opt_str(options.variant, "options->variant") }?;
    Ok(LoadOptions {
        device,
        dtype: dtype(options.dtype, "dtype")?,
        vae_dtype,
        variant: variant.map(str::to_string),
        ..LoadOptions::default()
    })
}

/// Fills `options` with the defaults documented on each field, including `struct_size`.
///
/// Returns `SDXL_STATUS_NULL_ARGUMENT` when `options` is NULL.
///
/// # Safety
/// `options` must be NULL or point to a writable `sdxl_load_options`.
#[no_mangle]
pub unsafe extern "C" fn sdxl_load_options_init(options: *mut sdxl_load_options) -> sdxl_status {
    run_export(|| {
        let options = out_ptr(options, "options")?;
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { options.write(sdxl_load_options::default()) };
        Ok(())
    })
}

/// Loads an SDXL base or refiner from a diffusers folder (`model_index.json`, `unet/`, `vae/`,
/// `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`; the refiner
/// has no `text_encoder/`) and stores a new handle in `*out_model`.
///
/// `path` is UTF-8. `options` may be NULL for the defaults of `sdxl_load_options_init`; it is
/// only read during the call. On failure `*out_model` is left unchanged. Free the handle with
/// `sdxl_model_free`.
///
/// Errors: `SDXL_STATUS_IO` (missing folder or file), `SDXL_STATUS_MODEL_FORMAT` (bad config or
/// checkpoint; the message names the file or tensor), `SDXL_STATUS_UNSUPPORTED` (not an SDXL
/// pipeline, or a device this build lacks), `SDXL_STATUS_ABI_MISMATCH` (`options->struct_size`),
/// `SDXL_STATUS_INVALID_ARGUMENT`, `SDXL_STATUS_NULL_ARGUMENT`.
///
/// Thread-safe; blocks while the weights are read.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `options` NULL or a filled
/// `sdxl_load_options`; `out_model` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sdxl_model_load(
    path: *const c_char,
    options: *const sdxl_load_options,
    out_model: *mut *mut sdxl_model,
) -> sdxl_status {
    run_export(|| {
        // SAFETY: forwarded from the caller.
        let path = unsafe { req_str(path, "path") }?;
        let out_model = out_ptr(out_model, "out_model")?;
        let options = if options.is_null() {
            sdxl_load_options::default()
        } else {
            // SAFETY: forwarded from the caller.
            *unsafe { versioned(options, "options") }?
        };
        // SAFETY: `variant` comes from the caller's struct.
        let options = unsafe { load_options(&options) }?;
        let t0 = Instant::now();
        let model = SdxlModel::load(Path::new(path), &options)?;
        log(
            SDXL_LOG_INFO,
            &format!(
                "loaded {} model from {path} in {:.2}s",
                match model.kind {
                    ModelKind::Base => "base",
                    ModelKind::Refiner => "refiner",
                },
                t0.elapsed().as_secs_f64()
            ),
        );
        let handle = Box::new(sdxl_model {
            shared: Arc::new(LoadedModel {
                model,
                poison: Poison::default(),
            }),
        });
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { out_model.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// Stores the model's kind (`SDXL_MODEL_BASE` or `SDXL_MODEL_REFINER`) in `*out_kind`.
///
/// Thread-safe.
///
/// # Safety
/// `model` must be NULL or a live handle; `out_kind` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sdxl_model_kind(
    model: *const sdxl_model,
    out_kind: *mut i32,
) -> sdxl_status {
    run_export(|| {
        // SAFETY: forwarded from the caller.
        let model = unsafe { handle(model, "model") }?;
        let out_kind = out_ptr(out_kind, "out_kind")?;
        let _use = model.shared.poison.enter("model")?;
        let kind = match model.shared.model.kind {
            ModelKind::Base => SDXL_MODEL_BASE,
            ModelKind::Refiner => SDXL_MODEL_REFINER,
        };
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { out_kind.write(kind) };
        Ok(())
    })
}

/// Releases a model handle; `NULL` is a no-op. Jobs still running with the model keep its
/// weights alive until they finish.
///
/// # Safety
/// `model` must be NULL or a handle from `sdxl_model_load` that is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn sdxl_model_free(model: *mut sdxl_model) {
    if !model.is_null() {
        // SAFETY: the caller hands over a handle created by `Box::into_raw`.
        let _ = catch(|| drop(unsafe { Box::from_raw(model) }));
    }
}
