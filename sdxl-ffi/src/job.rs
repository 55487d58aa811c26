//! The non-blocking job API: a generation on a library-owned worker thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use sdxl_core::pipeline::CancelToken;

use crate::abi::{handle, out_ptr, versioned, Versioned};
use crate::generate::check_len;
use crate::guard::{catch, log_level, panic_failure, report, run_export, Poison};
use crate::log::log;
use crate::model::sdxl_model;
use crate::params::{request, sdxl_generate_params};
use crate::run::{run, Output, Progress};
use crate::status::{
    sdxl_status, Failure, FfiResult, SDXL_STATUS_DEVICE, SDXL_STATUS_NOT_READY, SDXL_STATUS_OK,
    SDXL_STATUS_TIMEOUT,
};

/// A snapshot of a job, filled by `sdxl_job_poll`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sdxl_job_progress {
    /// Set by the caller to `sizeof(sdxl_job_progress)` before calling `sdxl_job_poll`.
    pub struct_size: u32,
    /// `SDXL_STAGE_*` of the last step, or -1 before the first step.
    pub stage: i32,
    /// Steps done in that stage.
    pub step: u32,
    /// Steps in that stage (0 before the first step).
    pub total: u32,
    /// `SDXL_STATUS_OK` while running or after success; the job's error once it failed.
    pub status: sdxl_status,
    /// 1 once the job has finished (successfully or not), 0 while it runs.
    pub done: u8,
    /// Seconds from the start of the run to its last step.
    pub elapsed_seconds: f64,
}

// SAFETY: `#[repr(C)]` with `struct_size: u32` first.
unsafe impl Versioned for sdxl_job_progress {
    const NAME: &'static str = "sdxl_job_progress";
}

/// What the worker thread shares with the handle.
#[derive(Debug, Default)]
struct JobState {
    progress: Option<Progress>,
    result: Option<FfiResult<Output>>,
}

#[derive(Debug, Default)]
struct JobShared {
    state: Mutex<JobState>,
    finished: Condvar,
    cancel: CancelToken,
    poison: Poison,
}

impl JobShared {
    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A generation running on a library-owned worker thread (opaque).
///
/// Thread-safe: `sdxl_job_poll`, `sdxl_job_wait`, `sdxl_job_cancel` and `sdxl_job_take_*` may be
/// called from any threads, also concurrently. `sdxl_job_free` must be called exactly once, when
/// no other thread is inside a call with the job.
#[derive(Debug)]
pub struct sdxl_job {
    shared: Arc<JobShared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts generating `params` with `model` on a new worker thread and stores the job in
/// `*out_job`; returns immediately.
///
/// Everything is checked and copied before the call returns (prompts, init image; models and
/// the cancel token are shared), so `params` and its strings and buffers may be released at
/// once. Only the callbacks and their user data must stay valid until the job is done; they
/// run on the worker thread. Parameter errors are returned here, with the statuses of
/// `sdxl_generate`; run-time errors become the job's status.
///
/// Free the job with `sdxl_job_free` (it cancels and waits).
///
/// # Safety
/// As `sdxl_generate` for `model` and `params`; `out_job` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sdxl_job_start(
    model: *const sdxl_model,
    params: *const sdxl_generate_params,
    out_job: *mut *mut sdxl_job,
) -> sdxl_status {
    run_export(|| {
        // SAFETY: forwarded from the caller.
        let req = unsafe { request(model, params) }?;
        let out_job = out_ptr(out_job, "out_job")?;
        let shared = Arc::new(JobShared::default());
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("sdxl-job".into())
            .stack_size(8 << 20)
            .spawn(move || {
                let result = catch_unwind(AssertUnwindSafe(|| {
                    let _use = worker.poison.enter("job")?;
                    run(&req, &worker.cancel, &mut |p| {
                        worker.lock().progress = Some(p)
                    })
                }))
                .unwrap_or_else(|payload| Err(panic_failure(payload.as_ref())));
                if let Err(f) = &result {
                    log(log_level(f.status), &format!("job ended: {}", f.message));
                }
                worker.lock().result = Some(result);
                worker.finished.notify_all();
            })
            .map_err(|e| {
                Failure::new(
                    SDXL_STATUS_DEVICE,
                    format!("cannot start a worker thread: {e}"),
                )
            })?;
        let job = Box::new(sdxl_job {
            shared,
            thread: Some(thread),
        });
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { out_job.write(Box::into_raw(job)) };
        Ok(())
    })
}

/// Fills `*out_progress` with where the job stands; never blocks for long. Set
/// `out_progress->struct_size = sizeof(sdxl_job_progress)` first.
///
/// Returns `SDXL_STATUS_OK` when the snapshot was written (the job's own status is in
/// `out_progress->status`).
///
/// # Safety
/// `job` must be NULL or a live job; `out_progress` NULL or a writable `sdxl_job_progress`.
#[no_mangle]
pub unsafe extern "C" fn sdxl_job_poll(
    job: *const sdxl_job,
    out_progress: *mut sdxl_job_progress,
) -> sdxl_status {
    run_export(|| {
        // SAFETY: forwarded from the caller.
        let job = unsafe { handle(job, "job") }?;
        // SAFETY: forwarded from the caller; only the size is read here.
        unsafe { versioned(out_progress.cast_const(), "out_progress") }?;
        let _use = job.shared.poison.enter("job")?;
        let state = job.shared.lock();
        let p = state.progress;
        let snapshot = sdxl_job_progress {
            struct_size: std::mem::size_of::<sdxl_job_progress>() as u32,
            stage: p.map_or(-1, |p| p.stage),
            step: p.map_or(0, |p| p.step),
            total: p.map_or(0, |p| p.total),
            status: match &state.result {
                Some(Err(f)) => f.status,
                _ => SDXL_STATUS_OK,
            },
            done: u8::from(state.result.is_some()),
            elapsed_seconds: p.map_or(0.0, |p| p.elapsed),
        };
        // SAFETY: checked non-NULL and of the right size.
        unsafe { out_progress.write(snapshot) };
        Ok(())
    })
}

/// Requests cancellation: the job stops before its next step and finishes with
/// `SDXL_STATUS_CANCELLED` (a job that already finished keeps its result). Returns at once;
/// use `sdxl_job_wait` to wait for the stop. Callable from any thread.
///
/// # Safety
/// `job` must be NULL or a live job.
#[no_mangle]
pub unsafe extern "C" fn sdxl_job_cancel(job: *const sdxl_job) -> sdxl_status {
    run_export(|| {
        // SAFETY: forwarded from the caller.
        unsafe { handle(job, "job") }?.shared.cancel.cancel();
        Ok(())
    })
}

/// Waits until the job finishes or `timeout_ms` milliseconds pass (a negative timeout waits
/// without limit; 0 only checks).
///
/// Returns the job's final status once it has finished (`SDXL_STATUS_OK` on success; its error
/// otherwise, with the message available from `sdxl_last_error_message` on this thread), or
/// `SDXL_STATUS_TIMEOUT` while it still runs.
///
/// # Safety
/// `job` must be NULL or a live job.
#[no_mangle]
pub unsafe extern "C" fn sdxl_job_wait(job: *const sdxl_job, timeout_ms: i32) -> sdxl_status {
    run_export(|| {
        // SAFETY: forwarded from the caller.
        let job = unsafe { handle(job, "job") }?;
        let _use = job.shared.poison.enter("job")?;
        let shared = &job.shared;
        let guard = shared.lock();
        let running = |s: &mut JobState| s.result.is_none();
        let guard = if timeout_ms < 0 {
            shared
                .finished
                .wait_while(guard, running)
                .unwrap_or_else(PoisonError::into_inner)
        } else {
            let timeout = Duration::from_millis(timeout_ms.unsigned_abs().into());
            shared
                .finished
                .wait_timeout_while(guard, timeout, running)
                .unwrap_or_else(PoisonError::into_inner)
                .0
        };
        match &guard.result {
            None => Err(Failure::new(
                SDXL_STATUS_TIMEOUT,
                format!("the job is still running after {timeout_ms} ms"),
            )),
            Some(Ok(_)) => Ok(()),
            Some(Err(f)) => Err(f.clone()),
        }
    })
}

/// Runs `copy` on the finished job's output, or fails with the job's status.
///
/// # Safety
/// `job` must be NULL or a live job.
unsafe fn with_output(
    job: *const sdxl_job,
    copy: impl FnOnce(&Output) -> FfiResult<()>,
) -> sdxl_status {
    run_export(|| {
        // SAFETY: forwarded from the caller.
        let job = unsafe { handle(job, "job") }?;
        let _use = job.shared.poison.enter("job")?;
        let state = job.shared.lock();
        match &state.result {
            None => Err(Failure::new(
                SDXL_STATUS_NOT_READY,
                "the job is still running; wait for it with sdxl_job_wait",
            )),
            Some(Err(f)) => Err(f.clone()),
            Some(Ok(output)) => copy(output),
        }
    })
}

/// Copies the finished job's images into `out_rgba` (`width * height * 4 * num_images` bytes,
/// the layout of `sdxl_generate`). May be called more than once.
///
/// Returns `SDXL_STATUS_NOT_READY` while the job runs, the job's error if it failed,
/// `SDXL_STATUS_BUFFER_TOO_SMALL` if `out_rgba_len` is too small.
///
/// # Safety
/// `job` must be NULL or a live job; `out_rgba` NULL or writable for `out_rgba_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn sdxl_job_take_image(
    job: *const sdxl_job,
    out_rgba: *mut u8,
    out_rgba_len: usize,
) -> sdxl_status {
    // SAFETY: forwarded from the caller.
    unsafe {
        with_output(job, |output| {
            let out = out_ptr(out_rgba, "out_rgba")?;
            check_len("out_rgba_len", out_rgba_len, output.rgba.len(), "bytes")?;
            // SAFETY: the caller's buffer holds at least `output.rgba.len()` bytes.
            std::ptr::copy_nonoverlapping(output.rgba.as_ptr(), out, output.rgba.len());
            Ok(())
        })
    }
}

/// Copies the finished job's final latents into `out_latents` (the floats and layout of
/// `sdxl_generate`'s latents output, `sdxl_generate_latents_size`). May be called more than
/// once. Statuses as `sdxl_job_take_image`.
///
/// # Safety
/// `job` must be NULL or a live job; `out_latents` NULL or writable for `out_latents_len`
/// floats.
#[no_mangle]
pub unsafe extern "C" fn sdxl_job_take_latents(
    job: *const sdxl_job,
    out_latents: *mut f32,
    out_latents_len: usize,
) -> sdxl_status {
    // SAFETY: forwarded from the caller.
    unsafe {
        with_output(job, |output| {
            let out = out_ptr(out_latents, "out_latents")?;
            check_len(
                "out_latents_len",
                out_latents_len,
                output.latents.len(),
                "floats",
            )?;
            // SAFETY: the caller's buffer holds at least `output.latents.len()` floats.
            std::ptr::copy_nonoverlapping(output.latents.as_ptr(), out, output.latents.len());
            Ok(())
        })
    }
}

/// Cancels the job if it still runs, waits for its worker thread to end and releases the job;
/// `NULL` is a no-op. Its callbacks are not called after this returns.
///
/// # Safety
/// `job` must be NULL or a job from `sdxl_job_start` that is not used afterwards, and must not
/// be called from the job's own callbacks.
#[no_mangle]
pub unsafe extern "C" fn sdxl_job_free(job: *mut sdxl_job) {
    if job.is_null() {
        return;
    }
    // SAFETY: the caller hands over a handle created by `Box::into_raw`.
    let mut job = unsafe { Box::from_raw(job) };
    let _ = catch(move || {
        job.shared.cancel.cancel();
        if let Some(thread) = job.thread.take() {
            if thread.join().is_err() {
                report(&panic_failure(&"the job's worker thread panicked"));
            }
        }
    });
}
