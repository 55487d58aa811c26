//! The panic barrier every export runs behind, and poisoning of handles that saw a panic.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::last_error;
use crate::log::{log, SDXL_LOG_DEBUG, SDXL_LOG_ERROR, SDXL_LOG_INFO, SDXL_LOG_WARN};
use crate::status::{
    sdxl_status, Failure, FfiResult, SDXL_STATUS_CANCELLED, SDXL_STATUS_NOT_READY, SDXL_STATUS_OK,
    SDXL_STATUS_PANIC, SDXL_STATUS_POISONED, SDXL_STATUS_TIMEOUT,
};

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// The failure reported for a caught panic.
pub(crate) fn panic_failure(payload: &(dyn Any + Send)) -> Failure {
    Failure::new(
        SDXL_STATUS_PANIC,
        format!(
            "internal error (panic): {}; the handles involved are poisoned",
            panic_message(payload)
        ),
    )
}

/// Runs `f`, turning a panic into `None`; for exports that return a neutral value.
pub(crate) fn catch<T>(f: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

/// The log level of a failure with `status`.
pub(crate) fn log_level(status: sdxl_status) -> i32 {
    match status {
        SDXL_STATUS_PANIC => SDXL_LOG_ERROR,
        SDXL_STATUS_CANCELLED => SDXL_LOG_INFO,
        SDXL_STATUS_TIMEOUT | SDXL_STATUS_NOT_READY => SDXL_LOG_DEBUG,
        _ => SDXL_LOG_WARN,
    }
}

/// Records a failure for the calling thread (message and log) and returns its status.
pub(crate) fn report(failure: &Failure) -> sdxl_status {
    last_error::set(&failure.message);
    log(log_level(failure.status), &failure.message);
    failure.status
}

/// Runs the body of an export: a panic becomes `SDXL_STATUS_PANIC`, a failure its status; the
/// thread's last error message is set in both cases.
pub(crate) fn run_export(f: impl FnOnce() -> FfiResult<()>) -> sdxl_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => SDXL_STATUS_OK,
        Ok(Err(failure)) => report(&failure),
        Err(payload) => report(&panic_failure(payload.as_ref())),
    }
}

/// Set once a panic unwound through a call that used the handle owning it.
#[derive(Debug, Default)]
pub(crate) struct Poison(AtomicBool);

/// Marks its [`Poison`] when dropped during a panic.
pub(crate) struct InUse<'a>(&'a Poison);

impl Poison {
    /// Starts a use of the handle: `SDXL_STATUS_POISONED` if an earlier use panicked.
    pub fn enter(&self, what: &str) -> FfiResult<InUse<'_>> {
        if self.0.load(Ordering::SeqCst) {
            return Err(Failure::new(
                SDXL_STATUS_POISONED,
                format!("this {what} saw a panic in an earlier call and cannot be used; free it"),
            ));
        }
        Ok(InUse(self))
    }
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0 .0.store(true, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_poisons_the_handles_in_use() {
        let poison = Poison::default();
        let status = run_export(|| {
            let _use = poison.enter("model")?;
            #[allow(clippy::panic)]
            {
                panic!("boom");
            }
        });
        assert_eq!(status, SDXL_STATUS_PANIC);
        assert!(last_error::get().contains("boom"));
        let again = run_export(|| poison.enter("model").map(|_| ()));
        assert_eq!(again, SDXL_STATUS_POISONED);
    }

    #[test]
    fn a_failure_does_not_poison() {
        let poison = Poison::default();
        let status = run_export(|| {
            let _use = poison.enter("model")?;
            Err(Failure::invalid("width 0"))
        });
        assert_eq!(status, crate::status::SDXL_STATUS_INVALID_ARGUMENT);
        assert_eq!(last_error::get(), "width 0");
        assert_eq!(run_export(|| poison.enter("model").map(|_| ())), 0);
    }
}
