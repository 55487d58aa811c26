//! Running a request: base (text-to-image or image-to-image), optional refiner hand-off,
//! decoding, and the observer that adapts progress, previews and cancellation to C callbacks.

use std::time::Instant;

use candle_core::DType;
use sdxl_core::pipeline::{
    decode_images, generate_latents, CancelToken, Flow, RgbImage, RunControl, StepInfo,
    StepObserver,
};
use sdxl_core::Error;

use crate::guard::InUse;
use crate::log::{log, SDXL_LOG_DEBUG, SDXL_LOG_INFO};
use crate::model::LoadedModel;
use crate::params::{Request, SDXL_STAGE_BASE, SDXL_STAGE_IMG2IMG, SDXL_STAGE_REFINER};
use crate::status::{Failure, FfiResult};

/// Where a run stands, as reported to jobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Progress {
    /// `SDXL_STAGE_*`.
    pub stage: i32,
    /// Steps done in the stage.
    pub step: u32,
    /// Steps in the stage.
    pub total: u32,
    /// Seconds since the run started.
    pub elapsed: f64,
}

/// The results of a run.
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// `num_images` RGBA8 images, rows top to bottom, back to back.
    pub rgba: Vec<u8>,
    /// The final latents `[n, c, h, w]` as f32 (scaled by the VAE scaling factor).
    pub latents: Vec<f32>,
}

/// Number of bytes of the RGBA output for a `width` × `height` × `num_images` run.
pub(crate) fn rgba_len(width: u32, height: u32, num_images: u32) -> FfiResult<usize> {
    if width == 0 || height == 0 || num_images == 0 {
        return Err(Failure::invalid(format!(
            "width, height and num_images must be positive, got {width}x{height}, {num_images} \
             image(s)"
        )));
    }
    (width as usize)
        .checked_mul(height as usize)
        .and_then(|v| v.checked_mul(num_images as usize))
        .and_then(|v| v.checked_mul(4))
        .ok_or_else(|| Failure::invalid("the output size overflows size_t"))
}

/// The shape `[n, c, h, w]` of the final latents of a run with `model` as its first model.
pub(crate) fn latents_shape(
    model: &LoadedModel,
    width: u32,
    height: u32,
    num_images: u32,
) -> FfiResult<[usize; 4]> {
    rgba_len(width, height, num_images)?;
    let f = model.model.vae_config().downscale_factor().max(1);
    let c = model.model.unet_config().in_channels;
    Ok([
        num_images as usize,
        c,
        height as usize / f,
        width as usize / f,
    ])
}

/// Adapts the core's step notifications to the request's callbacks and cancellation.
struct Observer<'a> {
    request: &'a Request,
    start: Instant,
    on_progress: &'a mut dyn FnMut(Progress),
}

fn stage_code(stage: &str) -> i32 {
    match stage {
        "refiner" => SDXL_STAGE_REFINER,
        "img2img" => SDXL_STAGE_IMG2IMG,
        _ => SDXL_STAGE_BASE,
    }
}

impl StepObserver for Observer<'_> {
    fn on_step(&mut self, info: &StepInfo) -> Flow {
        let progress = Progress {
            stage: stage_code(info.stage),
            step: info.step as u32,
            total: info.total as u32,
            elapsed: self.start.elapsed().as_secs_f64(),
        };
        (self.on_progress)(progress);
        log(
            SDXL_LOG_DEBUG,
            &format!(
                "{} step {}/{} ({:.2}s)",
                info.stage, info.step, info.total, progress.elapsed
            ),
        );
        if let Some(cb) = &self.request.progress {
            // SAFETY: the caller installed this callback with this user data.
            let stop = unsafe {
                (cb.f)(
                    progress.stage,
                    progress.step,
                    progress.total,
                    progress.elapsed,
                    cb.user_data,
                )
            };
            if stop != 0 {
                return Flow::Stop;
            }
        }
        if self
            .request
            .cancel
            .as_ref()
            .is_some_and(CancelToken::is_cancelled)
        {
            return Flow::Stop;
        }
        Flow::Continue
    }

    fn wants_preview(&self) -> bool {
        self.request.preview.is_some()
    }

    fn on_preview(&mut self, info: &StepInfo, preview: &RgbImage) {
        if let Some(cb) = &self.request.preview {
            // SAFETY: the caller installed this callback with this user data; `preview` lives
            // through the call.
            unsafe {
                (cb.f)(
                    stage_code(info.stage),
                    info.step as u32,
                    info.total as u32,
                    preview.data.as_ptr(),
                    preview.width as u32,
                    preview.height as u32,
                    cb.user_data,
                )
            }
        }
    }
}

/// `Err(Cancelled)` when either token is set.
fn check_cancel(request: &Request, cancel: &CancelToken) -> FfiResult<()> {
    if cancel.is_cancelled()
        || request
            .cancel
            .as_ref()
            .is_some_and(CancelToken::is_cancelled)
    {
        return Err(Error::Cancelled.into());
    }
    Ok(())
}

/// Starts a use of each model involved, so that a panic poisons them.
fn enter_models(request: &Request) -> FfiResult<Vec<InUse<'_>>> {
    let mut uses = vec![request.model.poison.enter("model")?];
    if let Some((r, _)) = &request.refiner {
        uses.push(r.poison.enter("refiner")?);
    }
    Ok(uses)
}

/// Runs `request` to images (and latents): the base model from noise or from the init image,
/// then the refiner for the rest of the schedule when one is given, then the VAE.
///
/// `cancel` is checked before every step; `on_progress` sees every step.
pub(crate) fn run(
    request: &Request,
    cancel: &CancelToken,
    on_progress: &mut dyn FnMut(Progress),
) -> FfiResult<Output> {
    let _uses = enter_models(request)?;
    let start = Instant::now();
    let base = &request.model.model;
    let params = &request.params;
    let mut observer = Observer {
        request,
        start,
        on_progress,
    };
    check_cancel(request, cancel)?;
    let pixels = match &request.init {
        Some(img) => Some(img.to_tensor01(&base.options.device)?),
        None => None,
    };
    let (latents, decoder) = generate_latents(
        base,
        request
            .refiner
            .as_ref()
            .map(|(r, start)| (&r.model, *start)),
        params,
        pixels.as_ref(),
        RunControl {
            cancel: cancel.clone(),
            observer: &mut observer,
        },
    )?;
    check_cancel(request, cancel)?;
    let images = decode_images(decoder, &latents)?;
    let mut rgba = Vec::with_capacity(images.iter().map(|i| i.data.len() / 3 * 4).sum());
    for img in &images {
        for px in img.data.chunks_exact(3) {
            rgba.extend_from_slice(px);
            rgba.push(255);
        }
    }
    let latents = latents
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    log(
        SDXL_LOG_INFO,
        &format!(
            "generated {} image(s) of {}x{} in {:.2}s",
            images.len(),
            params.width,
            params.height,
            start.elapsed().as_secs_f64()
        ),
    );
    Ok(Output { rgba, latents })
}
