//! Progress, cancellation and previews during a generation.
//!
//! The denoising loop checks the [`CancelToken`] between steps and calls the
//! [`StepObserver`] after each one; either can stop the run, which then returns
//! [`Error::Cancelled`](crate::Error::Cancelled) and drops every intermediate tensor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;

use super::image::RgbImage;
use crate::unet::UNetConditioning;

/// A flag that another thread can set to stop a running generation between two steps.
///
/// Clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation; safe from any thread.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where a generation stands after a denoising step.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// Steps done so far in this stage (1-based after the first step).
    pub step: usize,
    /// Steps in this stage.
    pub total: usize,
    /// The timestep just processed.
    pub timestep: f64,
    /// Time since the stage started.
    pub elapsed: Duration,
    /// The stage: `"base"`, `"refiner"` or `"img2img"`.
    pub stage: &'static str,
}

/// Whether the generation should go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep going.
    Continue,
    /// Stop now; the generation returns [`Error::Cancelled`](crate::Error::Cancelled).
    Stop,
}

/// The tensors around one denoising step, for tracing and parity tests.
#[derive(Debug)]
pub struct StepTensors<'a> {
    /// The timestep.
    pub timestep: f64,
    /// The UNet input (after `scale_model_input`, doubled for guidance).
    pub model_input: &'a Tensor,
    /// The raw UNet output (`[negative; positive]` halves with guidance).
    pub model_output: &'a Tensor,
    /// The guided (and rescaled) prediction passed to the scheduler.
    pub guided_output: &'a Tensor,
    /// The latents before the scheduler step.
    pub sample: &'a Tensor,
    /// The latents after the scheduler step.
    pub prev_sample: &'a Tensor,
    /// The conditioning the UNet received.
    pub conditioning: &'a UNetConditioning,
}

/// Receives progress from the denoising loop. Every method has a default, so implement only
/// what you need.
pub trait StepObserver {
    /// Called after each step; return [`Flow::Stop`] to cancel.
    fn on_step(&mut self, _info: &StepInfo) -> Flow {
        Flow::Continue
    }

    /// Whether [`StepObserver::on_preview`] should be called (previews cost a little time).
    fn wants_preview(&self) -> bool {
        false
    }

    /// A cheap RGB approximation of the current latents (one pixel per latent cell).
    fn on_preview(&mut self, _info: &StepInfo, _preview: &RgbImage) {}

    /// Whether [`StepObserver::on_tensors`] should be called.
    fn wants_tensors(&self) -> bool {
        false
    }

    /// The tensors around the step just taken.
    fn on_tensors(&mut self, _tensors: &StepTensors<'_>) {}
}

/// An observer that does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl StepObserver for NoObserver {}

/// Progress callback for a closure `FnMut(&StepInfo) -> Flow`.
pub struct ProgressFn<F>(pub F);

impl<F: FnMut(&StepInfo) -> Flow> StepObserver for ProgressFn<F> {
    fn on_step(&mut self, info: &StepInfo) -> Flow {
        (self.0)(info)
    }
}
