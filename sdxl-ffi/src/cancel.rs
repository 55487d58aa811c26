//! Cancel tokens that any thread may trigger.

use sdxl_core::pipeline::CancelToken;

use crate::abi::{handle, out_ptr};
use crate::guard::{catch, run_export};
use crate::status::sdxl_status;

/// A flag that stops the runs it is passed to (opaque).
///
/// Thread-safe: `sdxl_cancel_token_cancel` may be called from any thread at any time, also
/// while a run using the token is in progress. A cancelled token stays cancelled; create a new
/// one for the next run.
#[derive(Debug)]
pub struct sdxl_cancel_token {
    pub(crate) token: CancelToken,
}

/// Creates a token that is not cancelled and stores it in `*out_token`. Free it with
/// `sdxl_cancel_token_free`.
///
/// # Safety
/// `out_token` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sdxl_cancel_token_new(
    out_token: *mut *mut sdxl_cancel_token,
) -> sdxl_status {
    run_export(|| {
        let out_token = out_ptr(out_token, "out_token")?;
        let token = Box::new(sdxl_cancel_token {
            token: CancelToken::new(),
        });
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { out_token.write(Box::into_raw(token)) };
        Ok(())
    })
}

/// Requests cancellation. Runs using the token stop before their next denoising step (or
/// before decoding) and return `SDXL_STATUS_CANCELLED`.
///
/// Thread-safe; may be called from any thread, e.g. a UI thread while another thread is inside
/// `sdxl_generate`.
///
/// # Safety
/// `token` must be NULL or a live token.
#[no_mangle]
pub unsafe extern "C" fn sdxl_cancel_token_cancel(token: *const sdxl_cancel_token) -> sdxl_status {
    run_export(|| {
        // SAFETY: forwarded from the caller.
        unsafe { handle(token, "token") }?.token.cancel();
        Ok(())
    })
}

/// Releases a token; `NULL` is a no-op. Runs and jobs that were given the token keep their
/// own reference, but the handle must not be freed while another thread is inside a call that
/// was passed it (e.g. `sdxl_cancel_token_cancel`).
///
/// # Safety
/// `token` must be NULL or a handle from `sdxl_cancel_token_new` that is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn sdxl_cancel_token_free(token: *mut sdxl_cancel_token) {
    if !token.is_null() {
        // SAFETY: the caller hands over a handle created by `Box::into_raw`.
        let _ = catch(|| drop(unsafe { Box::from_raw(token) }));
    }
}
