//! Synchronous generation and the output size queries.

use sdxl_core::pipeline::CancelToken;

use crate::abi::{handle, out_ptr, versioned};
use crate::guard::run_export;
use crate::model::sdxl_model;
use crate::params::{request, sdxl_generate_params};
use crate::run::{latents_shape, rgba_len, run};
use crate::status::{sdxl_status, Failure, FfiResult, SDXL_STATUS_BUFFER_TOO_SMALL};

/// Checks that an output buffer holds `needed` elements.
pub(crate) fn check_len(arg: &str, len: usize, needed: usize, unit: &str) -> FfiResult<()> {
    if len < needed {
        return Err(Failure::new(
            SDXL_STATUS_BUFFER_TOO_SMALL,
            format!("{arg} holds {len} {unit}, but the output needs {needed}"),
        ));
    }
    Ok(())
}

/// Stores in `*out_len` the number of bytes of the RGBA8 output of a run with `params`:
/// `width * height * 4 * num_images`.
///
/// Returns `SDXL_STATUS_INVALID_ARGUMENT` when a dimension is 0.
///
/// # Safety
/// `params` must be NULL or a filled `sdxl_generate_params`; `out_len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sdxl_generate_image_size(
    params: *const sdxl_generate_params,
    out_len: *mut usize,
) -> sdxl_status {
    run_export(|| {
        // SAFETY: forwarded from the caller.
        let p = unsafe { versioned(params, "params") }?;
        let out_len = out_ptr(out_len, "out_len")?;
        let len = rgba_len(p.width, p.height, p.num_images)?;
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { out_len.write(len) };
        Ok(())
    })
}

/// Stores in `*out_len` the number of floats of the latents output of a run of `model` with
/// `params`: `num_images * C * (height / F) * (width / F)`, with `C` the UNet's latent channels
/// (4 for SDXL) and `F` the VAE's scale (8 for SDXL); the layout is `[n, C, h, w]`, row-major.
///
/// # Safety
/// `model` must be NULL or a live handle; `params` NULL or a filled `sdxl_generate_params`;
/// `out_len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sdxl_generate_latents_size(
    model: *const sdxl_model,
    params: *const sdxl_generate_params,
    out_len: *mut usize,
) -> sdxl_status {
    run_export(|| {
        // SAFETY: forwarded from the caller.
        let model = unsafe { handle(model, "model") }?;
        // SAFETY: forwarded from the caller.
        let p = unsafe { versioned(params, "params") }?;
        let out_len = out_ptr(out_len, "out_len")?;
        let _use = model.shared.poison.enter("model")?;
        let shape = latents_shape(&model.shared, p.width, p.height, p.num_images)?;
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { out_len.write(shape.iter().product()) };
        Ok(())
    })
}

/// Generates `params->num_images` images with `model` (and `params->refiner` when set),
/// blocking until done, and writes them to `out_rgba`; optionally writes the final latents.
///
/// - Text-to-image when `params->init_image` is NULL, image-to-image (SDEdit with
///   `params->strength`) otherwise; with a refiner, the base stops at `params->refiner_start`
///   and the refiner finishes the schedule.
/// - `out_rgba` receives `width * height * 4 * num_images` bytes (`sdxl_generate_image_size`):
///   image after image, rows top to bottom (flip for bottom-up texture APIs), R, G, B, A with
///   A = 255 — the layout of an RGBA8 texture upload.
/// - `out_latents` may be NULL; otherwise it receives the final latents (before VAE decoding,
///   scaled by the VAE scaling factor) as `float` `[n, C, h, w]`, `out_latents_len` floats at
///   least (`sdxl_generate_latents_size`).
///
/// Outputs are written only on success. Errors: `SDXL_STATUS_BUFFER_TOO_SMALL` (checked before
/// any work), `SDXL_STATUS_INVALID_ARGUMENT` (a value out of range, a string that is not UTF-8,
/// an init image of the wrong size, a base model passed as refiner, …), `SDXL_STATUS_CANCELLED`,
/// `SDXL_STATUS_NON_FINITE`, `SDXL_STATUS_DEVICE`, `SDXL_STATUS_ABI_MISMATCH`,
/// `SDXL_STATUS_NULL_ARGUMENT`, `SDXL_STATUS_POISONED`, `SDXL_STATUS_PANIC`.
///
/// Thread-safe: several threads may generate with the same model at once. Callbacks run on the
/// calling thread.
///
/// # Safety
/// `model` must be NULL or a live handle, `params` NULL or a filled `sdxl_generate_params` whose
/// pointers follow its field documentation, `out_rgba` NULL or writable for `out_rgba_len`
/// bytes, `out_latents` NULL or writable for `out_latents_len` floats.
#[no_mangle]
pub unsafe extern "C" fn sdxl_generate(
    model: *const sdxl_model,
    params: *const sdxl_generate_params,
    out_rgba: *mut u8,
    out_rgba_len: usize,
    out_latents: *mut f32,
    out_latents_len: usize,
) -> sdxl_status {
    run_export(|| {
        // SAFETY: forwarded from the caller.
        let req = unsafe { request(model, params) }?;
        let out_rgba = out_ptr(out_rgba, "out_rgba")?;
        let p = &req.params;
        let (w, h, n) = (p.width as u32, p.height as u32, p.num_images as u32);
        check_len("out_rgba_len", out_rgba_len, rgba_len(w, h, n)?, "bytes")?;
        if !out_latents.is_null() {
            let shape = latents_shape(&req.model, w, h, n)?;
            check_len(
                "out_latents_len",
                out_latents_len,
                shape.iter().product(),
                "floats",
            )?;
        }
        let output = run(&req, &CancelToken::new(), &mut |_| {})?;
        check_len("out_rgba_len", out_rgba_len, output.rgba.len(), "bytes")?;
        if !out_latents.is_null() {
            check_len(
                "out_latents_len",
                out_latents_len,
                output.latents.len(),
                "floats",
            )?;
        }
        // SAFETY: both buffers were checked to be large enough.
        unsafe {
            std::ptr::copy_nonoverlapping(output.rgba.as_ptr(), out_rgba, output.rgba.len());
            if !out_latents.is_null() {
                std::ptr::copy_nonoverlapping(
                    output.latents.as_ptr(),
                    out_latents,
                    output.latents.len(),
                );
            }
        }
        Ok(())
    })
}
