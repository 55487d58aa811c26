//! The denoising loop shared by text-to-image, image-to-image and the refiner.

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::control::{CancelToken, Flow, StepInfo, StepObserver, StepTensors};
use super::image::latent_preview;
use crate::error::{Error, Result};
use crate::schedulers::{NoiseSource, Scheduler};
use crate::unet::{UNet2DConditionModel, UNetConditioning};

/// Classifier-free guidance settings.
#[derive(Debug, Clone, Copy)]
pub struct Guidance {
    /// The guidance scale; guidance is applied when it is above 1.
    pub scale: f64,
    /// `guidance_rescale` φ; 0 disables it.
    pub rescale: f64,
}

impl Guidance {
    /// Whether the batch is doubled into `[negative; positive]`.
    pub fn enabled(&self) -> bool {
        self.scale > 1.0
    }
}

/// Run-time control of a loop: cancellation and the observer.
pub struct LoopControl<'a> {
    /// Checked before every step.
    pub cancel: &'a CancelToken,
    /// Told about every step.
    pub observer: &'a mut dyn StepObserver,
    /// Reported in [`StepInfo::stage`].
    pub stage: &'static str,
}

/// Runs `timesteps` of `scheduler` on `latents` with the UNet.
///
/// With guidance enabled, `cond` must hold the `[negative; positive]` batch (twice the latent
/// batch); otherwise only the positive half.
///
/// # Errors
/// [`Error::Cancelled`] when the token is set or the observer stops the run; tensor and model
/// failures; [`Error::NonFinite`] when the latents become NaN.
#[allow(clippy::too_many_arguments)]
pub fn denoise(
    unet: &UNet2DConditionModel,
    scheduler: &mut dyn Scheduler,
    mut latents: Tensor,
    timesteps: &[f64],
    cond: &UNetConditioning,
    guidance: Guidance,
    noise: &mut dyn NoiseSource,
    control: LoopControl<'_>,
) -> Result<Tensor> {
    let start = Instant::now();
    let total = timesteps.len();
    let unet_dtype = cond.encoder_hidden_states.dtype();
    for (i, &t) in timesteps.iter().enumerate() {
        if control.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let doubled = if guidance.enabled() {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents.clone()
        };
        let model_input = scheduler.scale_model_input(&doubled, t)?;
        let model_output = unet
            .forward(&model_input.to_dtype(unet_dtype)?, t, cond)?
            .to_dtype(DType::F32)?;
        let guided = if guidance.enabled() {
            let uncond = model_output.narrow(0, 0, latents.dim(0)?)?;
            let text = model_output.narrow(0, latents.dim(0)?, latents.dim(0)?)?;
            let g = (&uncond + ((&text - &uncond)? * guidance.scale)?)?;
            if guidance.rescale > 0.0 {
                rescale_noise_cfg(&g, &text, guidance.rescale)?
            } else {
                g
            }
        } else {
            model_output.clone()
        };
        let prev = scheduler.step(&guided, t, &latents, noise)?.prev_sample;
        if control.observer.wants_tensors() {
            control.observer.on_tensors(&StepTensors {
                timestep: t,
                model_input: &model_input,
                model_output: &model_output,
                guided_output: &guided,
                sample: &latents,
                prev_sample: &prev,
                conditioning: cond,
            });
        }
        latents = prev;
        let info = StepInfo {
            step: i + 1,
            total,
            timestep: t,
            elapsed: start.elapsed(),
            stage: control.stage,
        };
        if control.observer.wants_preview() {
            let preview = latent_preview(&latents)?;
            control.observer.on_preview(&info, &preview);
        }
        if control.observer.on_step(&info) == Flow::Stop {
            return Err(Error::Cancelled);
        }
    }
    let finite = latents
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .is_finite();
    if !finite {
        return Err(Error::NonFinite {
            what: "the denoising loop".into(),
            hint: ": try f32 or bf16 instead of f16, or fewer extreme guidance values".into(),
        });
    }
    Ok(latents)
}

/// diffusers' `rescale_noise_cfg`: rescales the guided prediction to the per-sample standard
/// deviation (unbiased, over all non-batch dimensions) of the text prediction, blended by `phi`.
///
/// # Errors
/// Tensor failures.
pub fn rescale_noise_cfg(guided: &Tensor, text: &Tensor, phi: f64) -> Result<Tensor> {
    let std_text = std_per_sample(text)?;
    let std_cfg = std_per_sample(guided)?;
    let rescaled = guided.broadcast_mul(&(std_text / std_cfg)?)?;
    Ok(((rescaled * phi)? + (guided * (1.0 - phi))?)?)
}

/// Unbiased standard deviation over all but the first dimension, keeping dims for broadcasting.
fn std_per_sample(x: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    let flat = x.reshape((b, ()))?;
    let n = flat.dim(1)?;
    let mean = flat.mean_keepdim(1)?;
    let var =
        (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)? / (n.saturating_sub(1).max(1)) as f64)?;
    let mut shape = vec![b];
    shape.extend(std::iter::repeat_n(1, x.rank() - 1));
    Ok(var.sqrt()?.reshape(shape)?)
}
