//! The one process-wide log callback.

use std::cell::Cell;
use std::ffi::{c_char, c_void, CString};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{PoisonError, RwLock};

use crate::guard::run_export;
use crate::status::{sdxl_status, Failure};

/// Fine-grained tracing (every step).
pub const SDXL_LOG_TRACE: i32 = 0;
/// Debugging details.
pub const SDXL_LOG_DEBUG: i32 = 1;
/// Progress of loads and runs.
pub const SDXL_LOG_INFO: i32 = 2;
/// A call failed with an expected error (bad argument, missing file, …).
pub const SDXL_LOG_WARN: i32 = 3;
/// A bug or a poisoned handle.
pub const SDXL_LOG_ERROR: i32 = 4;

/// Receives one log message: its level (`SDXL_LOG_*`), the NUL-terminated UTF-8 text (valid
/// only during the call) and the `user_data` given to `sdxl_set_log_callback`.
///
/// It may be called from any thread, including library worker threads, possibly concurrently;
/// it must not call `sdxl_set_log_callback` and must not unwind (throw or `longjmp`).
pub type sdxl_log_fn =
    Option<unsafe extern "C" fn(level: i32, message: *const c_char, user_data: *mut c_void)>;

/// The installed callback.
struct Logger {
    callback: unsafe extern "C" fn(i32, *const c_char, *mut c_void),
    user_data: *mut c_void,
}

// SAFETY: `sdxl_set_log_callback` documents that the callback and its user data must be usable
// from any thread.
unsafe impl Send for Logger {}
// SAFETY: as above.
unsafe impl Sync for Logger {}

static LOGGER: RwLock<Option<Logger>> = RwLock::new(None);
/// The minimum level delivered; above every level when no callback is set.
static MIN_LEVEL: AtomicI32 = AtomicI32::new(i32::MAX);

thread_local! {
    /// Set while this thread is inside the callback, so nested messages are dropped.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Sends `message` to the log callback when one is set and `level` reaches its minimum.
pub(crate) fn log(level: i32, message: &str) {
    if level < MIN_LEVEL.load(Ordering::Relaxed) {
        return;
    }
    if IN_CALLBACK.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    let guard = LOGGER.read().unwrap_or_else(PoisonError::into_inner);
    let Some(logger) = guard.as_ref() else {
        return;
    };
    if level < MIN_LEVEL.load(Ordering::Relaxed) {
        return;
    }
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let _ = IN_CALLBACK.try_with(|c| c.set(true));
    // SAFETY: the callback was installed by the caller with this user data; `text` outlives
    // the call.
    unsafe { (logger.callback)(level, text.as_ptr(), logger.user_data) };
    let _ = IN_CALLBACK.try_with(|c| c.set(false));
}

/// Installs the process-wide log callback, replacing the previous one; `callback = NULL` turns
/// logging off. Messages with a level below `min_level` (`SDXL_LOG_TRACE` … `SDXL_LOG_ERROR`)
/// are not delivered. Off by default.
///
/// Returns `SDXL_STATUS_INVALID_ARGUMENT` for a level outside `SDXL_LOG_TRACE`…`SDXL_LOG_ERROR`.
///
/// Thread-safe. When this function returns, the previous callback is no longer running on any
/// thread and will not be called again, so its `user_data` may be released.
///
/// # Safety
/// `callback` must be NULL or a function that is safe to call from any thread, with
/// `user_data`, until it is replaced.
#[no_mangle]
pub unsafe extern "C" fn sdxl_set_log_callback(
    callback: sdxl_log_fn,
    user_data: *mut c_void,
    min_level: i32,
) -> sdxl_status {
    run_export(|| {
        if !(SDXL_LOG_TRACE..=SDXL_LOG_ERROR).contains(&min_level) {
            return Err(Failure::invalid(format!(
                "log level {min_level} is not one of SDXL_LOG_TRACE (0) … SDXL_LOG_ERROR (4)"
            )));
        }
        let mut slot = LOGGER.write().unwrap_or_else(PoisonError::into_inner);
        *slot = callback.map(|callback| Logger {
            callback,
            user_data,
        });
        let min = if slot.is_some() { min_level } else { i32::MAX };
        MIN_LEVEL.store(min, Ordering::Relaxed);
        Ok(())
    })
}
