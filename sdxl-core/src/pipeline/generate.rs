//! Text-to-image, image-to-image (SDEdit) and the base → refiner hand-off.

use candle_core::{DType, Tensor};

use super::control::{CancelToken, NoObserver, StepObserver};
use super::denoise::{denoise, Guidance, LoopControl};
use super::image::RgbImage;
use super::model::{ModelKind, SdxlModel};
use super::params::{GenerateParams, InitImage};
use super::prompt::{encode_prompt, PromptEmbeds};
use crate::conditioning::TimeIdsLayout;
use crate::error::{Error, Result};
use crate::rng::TorchRng;
use crate::schedulers::{NoiseSource, Scheduler};
use crate::unet::UNetConditioning;
use crate::vae::{tiling, AutoencoderKL, TilingOptions};

/// How a run is observed and stopped. `Default` observes nothing and is never cancelled.
pub struct RunControl<'a> {
    /// Cancellation from another thread.
    pub cancel: CancelToken,
    /// Progress, previews and step tensors.
    pub observer: &'a mut dyn StepObserver,
}

impl<'a> RunControl<'a> {
    /// A control that never stops and observes nothing.
    pub fn none() -> RunControl<'static> {
        RunControl {
            cancel: CancelToken::new(),
            // `NoObserver` is zero-sized: leaking its box allocates nothing.
            observer: Box::leak(Box::new(NoObserver)),
        }
    }

    /// A control reporting to `observer`, with a fresh cancel token.
    pub fn observing(observer: &'a mut dyn StepObserver) -> Self {
        RunControl {
            cancel: CancelToken::new(),
            observer,
        }
    }
}

/// The conditioning tensors of a run, in the UNet's batch order `[negative×n; positive×n]`.
fn build_conditioning(
    model: &SdxlModel,
    params: &GenerateParams,
    embeds: &PromptEmbeds,
    latent_hw: (usize, usize),
    guidance: Guidance,
    layout: TimeIdsLayout,
) -> Result<UNetConditioning> {
    let n = params.num_images;
    let pixel_hw = (latent_hw.0 * 8, latent_hw.1 * 8);
    let (pos_ids, neg_ids) = params.micro.resolve(pixel_hw.0, pixel_hw.1).time_ids(
        layout,
        model.unet_config(),
        embeds.pooled_prompt_embeds.dim(1)?,
        &model.options.device,
    )?;
    let repeat = |t: &Tensor| -> Result<Tensor> { Ok(t.repeat((n, 1, 1))?) };
    let repeat2 = |t: &Tensor| -> Result<Tensor> { Ok(t.repeat((n, 1))?) };
    let dev = &model.options.device;
    let (ctx, pooled, ids) = if guidance.enabled() {
        (
            Tensor::cat(
                &[
                    repeat(&embeds.negative_prompt_embeds)?,
                    repeat(&embeds.prompt_embeds)?,
                ],
                0,
            )?,
            Tensor::cat(
                &[
                    repeat2(&embeds.negative_pooled_prompt_embeds)?,
                    repeat2(&embeds.pooled_prompt_embeds)?,
                ],
                0,
            )?,
            Tensor::cat(&[repeat2(&neg_ids)?, repeat2(&pos_ids)?], 0)?,
        )
    } else {
        (
            repeat(&embeds.prompt_embeds)?,
            repeat2(&embeds.pooled_prompt_embeds)?,
            repeat2(&pos_ids)?,
        )
    };
    let dtype = model.options.dtype;
    Ok(UNetConditioning {
        encoder_hidden_states: ctx.to_dtype(dtype)?.to_device(dev)?,
        text_embeds: pooled.to_dtype(dtype)?.to_device(dev)?,
        time_ids: ids.to_dtype(dtype)?.to_device(dev)?,
    })
}

/// `int(round(T - fraction * T))`, the timestep cutoff of `denoising_end`/`denoising_start`.
fn cutoff(scheduler_train_steps: usize, fraction: f64) -> f64 {
    let t = scheduler_train_steps as f64;
    (t - fraction * t).round_ties_even()
}

fn train_steps(model: &SdxlModel) -> usize {
    model
        .scheduler_config
        .values()
        .get("num_train_timesteps")
        .and_then(|v| v.as_u64())
        .map_or(1000, |v| v as usize)
}

fn make_scheduler(model: &SdxlModel, params: &GenerateParams) -> Result<Box<dyn Scheduler>> {
    let (kind, config) = params.scheduler.resolve(&model.scheduler_config)?;
    let mut scheduler = kind.build(&config)?;
    scheduler.set_timesteps(params.steps)?;
    Ok(scheduler)
}

/// Keeps the timesteps at or above the `denoising_end` cutoff.
fn apply_denoising_end(model: &SdxlModel, params: &GenerateParams, ts: Vec<f64>) -> Vec<f64> {
    match params.denoising_end {
        Some(end) => {
            let c = cutoff(train_steps(model), end);
            let n = ts.iter().filter(|&&t| t >= c).count();
            ts.into_iter().take(n).collect()
        }
        None => ts,
    }
}

fn check_latent_size(model: &SdxlModel, params: &GenerateParams) -> Result<(usize, usize)> {
    params.validate()?;
    let f = model.vae_config().downscale_factor();
    if !params.width.is_multiple_of(f) || !params.height.is_multiple_of(f) {
        return Err(Error::invalid(format!(
            "width and height must be multiples of {f} for this VAE, got {}x{}",
            params.width, params.height
        )));
    }
    Ok((params.height / f, params.width / f))
}

/// Text-to-image: returns the final latents `[n, 4, h, w]` (still multiplied by the VAE
/// scaling factor; see [`decode_latents`]).
///
/// `latents`, when given, replaces the seeded initial noise (unit variance; it is multiplied by
/// the scheduler's `init_noise_sigma`, as diffusers does).
///
/// # Errors
/// Invalid parameters, [`Error::Cancelled`], model failures.
pub fn text_to_image(
    model: &SdxlModel,
    params: &GenerateParams,
    latents: Option<&Tensor>,
    control: RunControl<'_>,
) -> Result<Tensor> {
    if model.kind == ModelKind::Refiner {
        return Err(Error::invalid(
            "this is a refiner model; it refines an image (image-to-image) and cannot start \
             from noise — pass it as the refiner and a base model as the model",
        ));
    }
    let latent_hw = check_latent_size(model, params)?;
    let mut rng = TorchRng::new(params.seed);
    let mut scheduler = make_scheduler(model, params)?;
    let timesteps = apply_denoising_end(model, params, scheduler.timesteps().to_vec());
    scheduler.set_begin_index(0);
    let guidance = Guidance {
        scale: params.guidance_scale,
        rescale: params.guidance_rescale,
    };
    let embeds = encode_prompt(model, &params.prompts)?;
    let cond = build_conditioning(
        model,
        params,
        &embeds,
        latent_hw,
        guidance,
        TimeIdsLayout::Text2Image,
    )?;
    let channels = model.unet_config().in_channels;
    let shape = [params.num_images, channels, latent_hw.0, latent_hw.1];
    let device = &model.options.device;
    let noise = match latents {
        Some(l) => {
            if l.dims() != shape {
                return Err(Error::invalid(format!(
                    "initial latents have shape {:?}, expected {shape:?}",
                    l.dims()
                )));
            }
            l.to_dtype(DType::F32)?.to_device(device)?
        }
        None => rng.randn(&shape, DType::F32, device)?,
    };
    let latents = (noise * scheduler.init_noise_sigma())?;
    denoise(
        &*model.unet()?,
        scheduler.as_mut(),
        latents,
        &timesteps,
        &cond,
        guidance,
        &mut rng,
        LoopControl {
            cancel: &control.cancel,
            observer: control.observer,
            stage: "base",
        },
    )
}

/// Image-to-image with the base or the refiner: SDEdit from pixels (encode, noise to the
/// `strength` point, denoise) or, with `denoising_start`, the hand-off from a base model's
/// latents (no noise added).
///
/// `noise`, when given, replaces the seeded generator (tests replay recorded draws).
///
/// # Errors
/// Invalid parameters (including an init image whose size differs from `width`×`height`),
/// [`Error::Cancelled`], model failures.
pub fn image_to_image(
    model: &SdxlModel,
    params: &GenerateParams,
    init: &InitImage,
    noise: Option<&mut dyn NoiseSource>,
    control: RunControl<'_>,
) -> Result<Tensor> {
    let latent_hw = check_latent_size(model, params)?;
    let mut seeded = TorchRng::new(params.seed);
    let noise: &mut dyn NoiseSource = match noise {
        Some(n) => n,
        None => &mut seeded,
    };
    let mut scheduler = make_scheduler(model, params)?;
    let all = scheduler.timesteps().to_vec();
    let order = scheduler.order();
    let (start, add_noise) = match params.denoising_start {
        None => {
            let steps = params.steps;
            let init_steps = ((steps as f64 * params.strength) as usize).min(steps);
            (steps.saturating_sub(init_steps) * order, true)
        }
        Some(f) => {
            let c = cutoff(train_steps(model), f);
            let mut n = all.iter().filter(|&&t| t < c).count();
            if order == 2 && n % 2 == 0 {
                n += 1;
            }
            (all.len().saturating_sub(n), false)
        }
    };
    let timesteps = apply_denoising_end(model, params, all.get(start..).unwrap_or(&[]).to_vec());
    if timesteps.is_empty() {
        return Err(Error::invalid(format!(
            "strength {} with {} steps leaves no step to run",
            params.strength, params.steps
        )));
    }
    scheduler.set_begin_index(start);
    let device = &model.options.device;
    let n = params.num_images;
    let init_latents = match init {
        InitImage::Latents(l) => {
            let (_, _, h, w) = l.dims4()?;
            if (h, w) != latent_hw {
                return Err(Error::invalid(format!(
                    "init latents are {h}x{w}, expected {}x{} for a {}x{} image",
                    latent_hw.0, latent_hw.1, params.width, params.height
                )));
            }
            l.to_dtype(DType::F32)?.to_device(device)?
        }
        InitImage::Pixels(img) => {
            let (_, c, h, w) = img.dims4()?;
            if c != 3 || (h, w) != (params.height, params.width) {
                return Err(Error::invalid(format!(
                    "init image is {w}x{h} with {c} channels, expected a {}x{} RGB image",
                    params.width, params.height
                )));
            }
            let x = ((img.to_device(device)? * 2.0)? - 1.0)?;
            let z = encode_latents(model, &x, noise)?;
            Tensor::cat(&vec![&z; n], 0)?
        }
    };
    let latents = if add_noise {
        let first = timesteps.first().copied().unwrap_or_default();
        let eps = noise.randn(init_latents.dims(), DType::F32, device)?;
        scheduler.add_noise(&init_latents, &eps, first)?
    } else {
        init_latents
    };
    let guidance = Guidance {
        scale: params.guidance_scale,
        rescale: params.guidance_rescale,
    };
    let embeds = encode_prompt(model, &params.prompts)?;
    let layout = match model.kind {
        ModelKind::Refiner => TimeIdsLayout::AestheticScore,
        ModelKind::Base => TimeIdsLayout::Image2Image,
    };
    let cond = build_conditioning(model, params, &embeds, latent_hw, guidance, layout)?;
    let stage = if model.kind == ModelKind::Refiner {
        "refiner"
    } else {
        "img2img"
    };
    denoise(
        &*model.unet()?,
        scheduler.as_mut(),
        latents,
        &timesteps,
        &cond,
        guidance,
        noise,
        LoopControl {
            cancel: &control.cancel,
            observer: control.observer,
            stage,
        },
    )
}

/// Encodes images `x` `[B, 3, H, W]` in [-1, 1] to scaled latents
/// `scaling_factor · (mean + std · noise)`, tiled as the model's
/// [`LoadOptions::vae_tiling`](super::LoadOptions) decides; `noise` draws the posterior sample.
///
/// # Errors
/// Invalid image sizes, a pass refused by the tiling limits, tensor or model failures.
pub fn encode_latents(
    model: &SdxlModel,
    x: &Tensor,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    let vae = model.vae()?;
    let dist = tiling::encode(&vae, &x.to_dtype(vae.dtype())?, &model.options.vae_tiling)?;
    let eps = noise.randn(dist.mean.dims(), DType::F32, &model.options.device)?;
    let z = dist
        .sample(&eps.to_dtype(vae.dtype())?)?
        .to_dtype(DType::F32)?;
    Ok((z * vae.scaling_factor())?)
}

/// Decodes scaled latents to the VAE's raw output `[B, 3, H, W]` (f32, about [-1, 1]), tiled as
/// the model's [`LoadOptions::vae_tiling`](super::LoadOptions) decides. The output is not checked
/// for NaN ([`decode_images`] does).
///
/// # Errors
/// [`Error::InvalidArgument`] for a pass refused by the tiling limits (an enormous latent with
/// tiling off); tensor or model failures.
pub fn decode_latents(model: &SdxlModel, latents: &Tensor) -> Result<Tensor> {
    decode_with(&*model.vae()?, &model.options.vae_tiling, latents)
}

/// [`decode_latents`] with a VAE at hand.
fn decode_with(vae: &AutoencoderKL, tiling: &TilingOptions, latents: &Tensor) -> Result<Tensor> {
    // Refuse an oversized pass before the scaled copy of the latents is made.
    tiling::decode_strategy(vae, latents, tiling)?;
    let z = (latents.to_dtype(DType::F32)? / vae.scaling_factor())?;
    Ok(tiling::decode(vae, &z.to_dtype(vae.dtype())?, tiling)?.to_dtype(DType::F32)?)
}

/// Whether every value of `t` is finite (`0 · x` is NaN exactly where `x` is NaN or infinite).
fn all_finite(t: &Tensor) -> Result<bool> {
    let zeros = (t.to_dtype(DType::F32)? * 0.0)?;
    Ok(zeros.sum_all()?.to_scalar::<f32>()?.is_finite())
}

/// What to do about a VAE that decoded finite latents into NaN or infinity.
fn vae_overflow_hint(vae_dtype: DType) -> String {
    if matches!(vae_dtype, DType::F16 | DType::BF16) {
        format!(
            ": the VAE overflowed in {vae_dtype:?}; decode in f32 (leave `vae_dtype` unset with a \
             VAE whose config sets force_upcast, or set it to F32) or use an fp16-fix VAE \
             (LoadOptions::vae_path, CLI `--vae PATH`)"
        )
    } else {
        ": the VAE overflowed in f32, so its weights are probably broken; try another VAE \
         (LoadOptions::vae_path, CLI `--vae PATH`)"
            .to_string()
    }
}

/// Decodes scaled latents to RGB images, rounding as diffusers does.
///
/// # Errors
/// [`Error::NonFinite`] with advice when the latents are not finite (the denoiser overflowed)
/// or the VAE overflows (an f16 VAE without the fp16 fix); the errors of [`decode_latents`].
pub fn decode_images(model: &SdxlModel, latents: &Tensor) -> Result<Vec<RgbImage>> {
    if !all_finite(latents)? {
        let advice = match model.options.dtype {
            DType::F16 => {
                "; the UNet probably overflowed in F16: run it in f32 or bf16 (CLI \
                           `--dtype f32` or `--dtype bf16`)"
            }
            _ => "",
        };
        return Err(Error::NonFinite {
            what: "denoising".into(),
            hint: format!(": the latents hold NaN or infinity before decoding{advice}"),
        });
    }
    let vae = model.vae()?;
    let decoded = decode_with(&vae, &model.options.vae_tiling, latents)?;
    if !all_finite(&decoded)? {
        return Err(Error::NonFinite {
            what: "VAE decode".into(),
            hint: vae_overflow_hint(vae.dtype()),
        });
    }
    RgbImage::from_decoded(&decoded)
}

/// The denoising of a whole job: `base` from noise, or from `init` pixels (`[1, 3, H, W]` in
/// [0, 1], image-to-image at `params.strength`), then, when given, `refiner` for the part of the
/// schedule after its hand-off fraction. Returns the final latents and the model whose VAE
/// decodes them.
///
/// # Errors
/// Invalid parameters or model pairing, [`Error::Cancelled`], model failures.
pub fn generate_latents<'m>(
    base: &'m SdxlModel,
    refiner: Option<(&'m SdxlModel, f64)>,
    params: &GenerateParams,
    init: Option<&Tensor>,
    control: RunControl<'_>,
) -> Result<(Tensor, &'m SdxlModel)> {
    let RunControl { cancel, observer } = control;
    if let Some((r, _)) = refiner {
        if r.kind != ModelKind::Refiner {
            return Err(Error::invalid(
                "the refiner path holds a base model; pass an SDXL refiner folder",
            ));
        }
    }
    let base_params = GenerateParams {
        denoising_end: refiner.map(|(_, start)| start).or(params.denoising_end),
        ..params.clone()
    };
    let latents = match init {
        Some(pixels) => image_to_image(
            base,
            &base_params,
            &InitImage::Pixels(pixels.clone()),
            None,
            RunControl {
                cancel: cancel.clone(),
                observer: &mut *observer,
            },
        )?,
        None => text_to_image(
            base,
            &base_params,
            None,
            RunControl {
                cancel: cancel.clone(),
                observer: &mut *observer,
            },
        )?,
    };
    match refiner {
        None => Ok((latents, base)),
        Some((refiner, start)) => {
            let refiner_params = GenerateParams {
                denoising_end: None,
                denoising_start: Some(start),
                ..params.clone()
            };
            let latents = image_to_image(
                refiner,
                &refiner_params,
                &InitImage::Latents(latents),
                None,
                RunControl { cancel, observer },
            )?;
            Ok((latents, refiner))
        }
    }
}

/// The whole job: [`generate_latents`] from noise, decoded to images by the model that
/// finished it.
///
/// # Errors
/// Invalid parameters or model pairing, [`Error::Cancelled`], model failures.
pub fn generate(
    base: &SdxlModel,
    refiner: Option<(&SdxlModel, f64)>,
    params: &GenerateParams,
    control: RunControl<'_>,
) -> Result<Vec<RgbImage>> {
    let (latents, decoder) = generate_latents(base, refiner, params, None, control)?;
    decode_images(decoder, &latents)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn finiteness_check_catches_nan_and_both_infinities() {
        let check = |v: f32| {
            let t = Tensor::from_vec(vec![1.0, v, -3e38], (1, 3), &Device::Cpu).unwrap();
            all_finite(&t).unwrap()
        };
        assert!(check(3e38));
        assert!(!check(f32::NAN));
        assert!(!check(f32::INFINITY));
        assert!(!check(f32::NEG_INFINITY));
        let half = Tensor::full(half::f16::INFINITY, (2, 2), &Device::Cpu).unwrap();
        assert!(!all_finite(&half).unwrap());
    }
}
