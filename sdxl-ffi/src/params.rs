//! The generation parameters struct and its conversion into an owned request.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use sdxl_core::pipeline::{
    CancelToken, GenerateParams, MicroParams, ModelKind, RgbImage, SchedulerChoice,
};
use sdxl_core::schedulers::SchedulerKind;

use crate::abi::{handle, opt_str, req_str, versioned, Versioned};
use crate::cancel::sdxl_cancel_token;
use crate::guard::run_export;
use crate::model::{sdxl_model, LoadedModel};
use crate::status::{sdxl_status, Failure, FfiResult};

/// The model's own scheduler (`scheduler/scheduler_config.json`), or its own setting for the
/// override fields (`karras`, `timestep_spacing`, `prediction_type`).
pub const SDXL_DEFAULT: i32 = -1;

/// `EulerDiscreteScheduler`.
pub const SDXL_SCHEDULER_EULER: i32 = 0;
/// `EulerAncestralDiscreteScheduler`.
pub const SDXL_SCHEDULER_EULER_ANCESTRAL: i32 = 1;
/// `DDIMScheduler`.
pub const SDXL_SCHEDULER_DDIM: i32 = 2;
/// `DPMSolverMultistepScheduler`, DPM-Solver++ 2M.
pub const SDXL_SCHEDULER_DPMPP_2M: i32 = 3;
/// `DPMSolverMultistepScheduler`, DPM-Solver++ 3M.
pub const SDXL_SCHEDULER_DPMPP_3M: i32 = 4;
/// `DPMSolverMultistepScheduler`, DPM-Solver++ 2M SDE.
pub const SDXL_SCHEDULER_DPMPP_2M_SDE: i32 = 5;
/// `HeunDiscreteScheduler`.
pub const SDXL_SCHEDULER_HEUN: i32 = 6;
/// `KDPM2DiscreteScheduler`.
pub const SDXL_SCHEDULER_KDPM2: i32 = 7;
/// `UniPCMultistepScheduler`.
pub const SDXL_SCHEDULER_UNIPC: i32 = 8;
/// `DDPMScheduler`.
pub const SDXL_SCHEDULER_DDPM: i32 = 9;
/// `LCMScheduler`.
pub const SDXL_SCHEDULER_LCM: i32 = 10;
/// `LMSDiscreteScheduler`.
pub const SDXL_SCHEDULER_LMS: i32 = 11;

/// `timestep_spacing = "leading"`.
pub const SDXL_SPACING_LEADING: i32 = 0;
/// `timestep_spacing = "trailing"`.
pub const SDXL_SPACING_TRAILING: i32 = 1;
/// `timestep_spacing = "linspace"`.
pub const SDXL_SPACING_LINSPACE: i32 = 2;

/// `prediction_type = "epsilon"`.
pub const SDXL_PREDICTION_EPSILON: i32 = 0;
/// `prediction_type = "v_prediction"`.
pub const SDXL_PREDICTION_V_PREDICTION: i32 = 1;
/// `prediction_type = "sample"`.
pub const SDXL_PREDICTION_SAMPLE: i32 = 2;

/// Init image bytes are R, G, B, A (alpha is ignored).
pub const SDXL_PIXEL_RGBA8: i32 = 0;
/// Init image bytes are R, G, B.
pub const SDXL_PIXEL_RGB8: i32 = 1;

/// Denoising with the base model from noise (text-to-image).
pub const SDXL_STAGE_BASE: i32 = 0;
/// Denoising with the refiner after the hand-off.
pub const SDXL_STAGE_REFINER: i32 = 1;
/// Denoising with the base model from an init image (image-to-image).
pub const SDXL_STAGE_IMG2IMG: i32 = 2;

/// Called after every denoising step with the stage (`SDXL_STAGE_*`), the steps done in that
/// stage (1-based), the steps in the stage, the seconds since the run started and the
/// `progress_user_data`. Return 0 to go on, non-zero to stop the run with
/// `SDXL_STATUS_CANCELLED`.
///
/// It runs on the thread running the generation: the caller's for `sdxl_generate`, the job's
/// worker thread for `sdxl_job_start`. It must not unwind (throw or `longjmp`).
pub type sdxl_progress_fn = Option<
    unsafe extern "C" fn(
        stage: i32,
        step: u32,
        total: u32,
        elapsed_seconds: f64,
        user_data: *mut c_void,
    ) -> i32,
>;

/// Called after every denoising step with a cheap RGB preview of the first image: `rgb` holds
/// `width * height * 3` bytes, rows top to bottom, one pixel per latent cell (1/8 of the output
/// size), valid only during the call. Same thread and rules as `sdxl_progress_fn`.
pub type sdxl_preview_fn = Option<
    unsafe extern "C" fn(
        stage: i32,
        step: u32,
        total: u32,
        rgb: *const u8,
        width: u32,
        height: u32,
        user_data: *mut c_void,
    ),
>;

/// Everything one generation needs. Fill it with `sdxl_generate_params_init`, then change
/// fields; it is passed as `const*` and only read during `sdxl_generate` / `sdxl_job_start`
/// (the job copies what it needs, except that callbacks and their user data must stay valid
/// until the job is done).
///
/// Micro-conditioning sizes come in (width, height) pairs where 0, 0 (the default) means
/// diffusers' default: the output size for `original_*`/`target_*`, the positive values for
/// the `negative_*` sizes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sdxl_generate_params {
    /// `sizeof(sdxl_generate_params)`, set by `sdxl_generate_params_init`.
    pub struct_size: u32,
    /// Output width in pixels, a positive multiple of 8 (of the VAE's scale). Default 1024.
    pub width: u32,
    /// Output height in pixels, a positive multiple of 8. Default 1024.
    pub height: u32,
    /// Denoising steps of the whole schedule. Default 50.
    pub steps: u32,
    /// Images to generate (a batch sharing one prompt). Default 1.
    pub num_images: u32,
    /// `SDXL_SCHEDULER_*` or `SDXL_DEFAULT` (default: the model's scheduler config).
    pub scheduler: i32,
    /// Karras sigmas: 1 on, 0 off, `SDXL_DEFAULT` (default) as the scheduler config says.
    pub karras: i32,
    /// `SDXL_SPACING_*` or `SDXL_DEFAULT` (default).
    pub timestep_spacing: i32,
    /// `SDXL_PREDICTION_*` or `SDXL_DEFAULT` (default).
    pub prediction_type: i32,
    /// `original_size` width; 0 (default) = output width.
    pub original_width: u32,
    /// `original_size` height; 0 (default) = output height.
    pub original_height: u32,
    /// `crops_coords_top_left` top. Default 0.
    pub crop_top: u32,
    /// `crops_coords_top_left` left. Default 0.
    pub crop_left: u32,
    /// `target_size` width; 0 (default) = output width.
    pub target_width: u32,
    /// `target_size` height; 0 (default) = output height.
    pub target_height: u32,
    /// `negative_original_size` width; 0 (default) = not given.
    pub negative_original_width: u32,
    /// `negative_original_size` height; 0 (default) = not given.
    pub negative_original_height: u32,
    /// `negative_crops_coords_top_left` top. Default 0.
    pub negative_crop_top: u32,
    /// `negative_crops_coords_top_left` left. Default 0.
    pub negative_crop_left: u32,
    /// `negative_target_size` width; 0 (default) = not given.
    pub negative_target_width: u32,
    /// `negative_target_size` height; 0 (default) = not given.
    pub negative_target_height: u32,
    /// `SDXL_PIXEL_RGBA8` (default) or `SDXL_PIXEL_RGB8`: the layout of `init_image`.
    pub init_image_format: i32,
    /// Bytes from one init-image row to the next; 0 (default) = tightly packed.
    pub init_image_stride: u32,
    /// Seed of the torch-compatible generator: seed S draws the same initial noise as diffusers
    /// with `torch.Generator("cpu").manual_seed(S)`. Default 0.
    pub seed: u64,
    /// Classifier-free guidance scale; guidance is off at 1 or below. Default 5.0.
    pub guidance_scale: f64,
    /// `guidance_rescale` in [0, 1]; 0 (default) disables it.
    pub guidance_rescale: f64,
    /// Image-to-image strength in (0, 1]: the fraction of the schedule re-run from the init
    /// image. Default 0.3.
    pub strength: f64,
    /// Fraction of the schedule after which the refiner takes over, in (0, 1). Default 0.8.
    pub refiner_start: f64,
    /// The refiner's `aesthetic_score`. Default 6.0.
    pub aesthetic_score: f64,
    /// The refiner's `negative_aesthetic_score`. Default 2.5.
    pub negative_aesthetic_score: f64,
    /// The prompt (UTF-8, NUL-terminated). Required: NULL gives `SDXL_STATUS_NULL_ARGUMENT`;
    /// pass `""` for an unconditional image. Default NULL.
    pub prompt: *const c_char,
    /// The prompt for the second text encoder; NULL (default) = `prompt`.
    pub prompt_2: *const c_char,
    /// The negative prompt; NULL (default) = none (all-zero negative conditioning for the base,
    /// as diffusers with `negative_prompt=None`).
    pub negative_prompt: *const c_char,
    /// The negative prompt for the second text encoder; NULL (default) = `negative_prompt`.
    pub negative_prompt_2: *const c_char,
    /// Image-to-image: the init image, `width` × `height` pixels in `init_image_format`, rows
    /// top to bottom `init_image_stride` bytes apart; NULL (default) = text-to-image.
    pub init_image: *const u8,
    /// Bytes readable at `init_image`.
    pub init_image_len: usize,
    /// A refiner to hand the last part of the schedule to (`refiner_start`); NULL (default) =
    /// none. It must be an `SDXL_MODEL_REFINER` model.
    pub refiner: *const sdxl_model,
    /// A token that stops the run; NULL (default) = none.
    pub cancel: *const sdxl_cancel_token,
    /// Progress callback; NULL (default) = none.
    pub progress: sdxl_progress_fn,
    /// Passed to `progress`.
    pub progress_user_data: *mut c_void,
    /// Preview callback; NULL (default) = none (previews cost a little time).
    pub preview: sdxl_preview_fn,
    /// Passed to `preview`.
    pub preview_user_data: *mut c_void,
}

// SAFETY: `#[repr(C)]` with `struct_size: u32` first.
unsafe impl Versioned for sdxl_generate_params {
    const NAME: &'static str = "sdxl_generate_params";
}

impl Default for sdxl_generate_params {
    fn default() -> Self {
        let core = GenerateParams::new("");
        let micro = MicroParams::default();
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            width: core.width as u32,
            height: core.height as u32,
            steps: core.steps as u32,
            num_images: core.num_images as u32,
            scheduler: SDXL_DEFAULT,
            karras: SDXL_DEFAULT,
            timestep_spacing: SDXL_DEFAULT,
            prediction_type: SDXL_DEFAULT,
            original_width: 0,
            original_height: 0,
            crop_top: 0,
            crop_left: 0,
            target_width: 0,
            target_height: 0,
            negative_original_width: 0,
            negative_original_height: 0,
            negative_crop_top: 0,
            negative_crop_left: 0,
            negative_target_width: 0,
            negative_target_height: 0,
            init_image_format: SDXL_PIXEL_RGBA8,
            init_image_stride: 0,
            seed: core.seed,
            guidance_scale: core.guidance_scale,
            guidance_rescale: core.guidance_rescale,
            strength: core.strength,
            refiner_start: 0.8,
            aesthetic_score: micro.aesthetic_score,
            negative_aesthetic_score: micro.negative_aesthetic_score,
            prompt: std::ptr::null(),
            prompt_2: std::ptr::null(),
            negative_prompt: std::ptr::null(),
            negative_prompt_2: std::ptr::null(),
            init_image: std::ptr::null(),
            init_image_len: 0,
            refiner: std::ptr::null(),
            cancel: std::ptr::null(),
            progress: None,
            progress_user_data: std::ptr::null_mut(),
            preview: None,
            preview_user_data: std::ptr::null_mut(),
        }
    }
}

/// Fills `params` with the defaults documented on each field, including `struct_size`.
///
/// # Safety
/// `params` must be NULL or point to a writable `sdxl_generate_params`.
#[no_mangle]
pub unsafe extern "C" fn sdxl_generate_params_init(
    params: *mut sdxl_generate_params,
) -> sdxl_status {
    run_export(|| {
        let params = crate::abi::out_ptr(params, "params")?;
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { params.write(sdxl_generate_params::default()) };
        Ok(())
    })
}

/// A C callback with its user data.
#[derive(Clone, Copy)]
pub(crate) struct Callback<F> {
    /// The function.
    pub f: F,
    /// Its `user_data`.
    pub user_data: *mut c_void,
}

// SAFETY: the header documents that callbacks run on the generating thread (a worker thread for
// jobs) and that their user data must be usable there.
unsafe impl<F: Send> Send for Callback<F> {}

/// The progress callback's function type.
pub(crate) type ProgressFn = unsafe extern "C" fn(i32, u32, u32, f64, *mut c_void) -> i32;
/// The preview callback's function type.
pub(crate) type PreviewFn = unsafe extern "C" fn(i32, u32, u32, *const u8, u32, u32, *mut c_void);

/// A generation with everything it needs copied out of the caller's memory.
pub(crate) struct Request {
    /// The base (or, for image-to-image, any) model.
    pub model: Arc<LoadedModel>,
    /// The refiner and the fraction of the schedule where it takes over.
    pub refiner: Option<(Arc<LoadedModel>, f64)>,
    /// The core parameters.
    pub params: GenerateParams,
    /// The init image for image-to-image.
    pub init: Option<RgbImage>,
    /// The caller's cancel token.
    pub cancel: Option<CancelToken>,
    /// Progress callback.
    pub progress: Option<Callback<ProgressFn>>,
    /// Preview callback.
    pub preview: Option<Callback<PreviewFn>>,
}

/// `(height, width)` for a micro-conditioning pair; 0, 0 is "not given".
fn size_pair(width: u32, height: u32, name: &str) -> FfiResult<Option<(usize, usize)>> {
    match (width, height) {
        (0, 0) => Ok(None),
        (0, _) | (_, 0) => Err(Failure::invalid(format!(
            "{name}_width and {name}_height must both be 0 (default) or both positive, got \
             {width}x{height}"
        ))),
        (w, h) => Ok(Some((h as usize, w as usize))),
    }
}

fn scheduler_kind(value: i32) -> FfiResult<Option<SchedulerKind>> {
    let kind = match value {
        SDXL_DEFAULT => return Ok(None),
        SDXL_SCHEDULER_EULER => SchedulerKind::Euler,
        SDXL_SCHEDULER_EULER_ANCESTRAL => SchedulerKind::EulerAncestral,
        SDXL_SCHEDULER_DDIM => SchedulerKind::Ddim,
        SDXL_SCHEDULER_DPMPP_2M => SchedulerKind::DpmPp2M,
        SDXL_SCHEDULER_DPMPP_3M => SchedulerKind::DpmPp3M,
        SDXL_SCHEDULER_DPMPP_2M_SDE => SchedulerKind::DpmPp2MSde,
        SDXL_SCHEDULER_HEUN => SchedulerKind::Heun,
        SDXL_SCHEDULER_KDPM2 => SchedulerKind::Kdpm2,
        SDXL_SCHEDULER_UNIPC => SchedulerKind::UniPc,
        SDXL_SCHEDULER_DDPM => SchedulerKind::Ddpm,
        SDXL_SCHEDULER_LCM => SchedulerKind::Lcm,
        SDXL_SCHEDULER_LMS => SchedulerKind::Lms,
        other => {
            return Err(Failure::invalid(format!(
                "scheduler {other} is not SDXL_DEFAULT (-1) or an SDXL_SCHEDULER_* value (0-11)"
            )))
        }
    };
    Ok(Some(kind))
}

fn scheduler_choice(p: &sdxl_generate_params) -> FfiResult<SchedulerChoice> {
    let karras = match p.karras {
        SDXL_DEFAULT => None,
        0 => Some(false),
        1 => Some(true),
        other => {
            return Err(Failure::invalid(format!(
                "karras {other} is not SDXL_DEFAULT (-1), 0 or 1"
            )))
        }
    };
    let timestep_spacing = match p.timestep_spacing {
        SDXL_DEFAULT => None,
        SDXL_SPACING_LEADING => Some("leading"),
        SDXL_SPACING_TRAILING => Some("trailing"),
        SDXL_SPACING_LINSPACE => Some("linspace"),
        other => {
            return Err(Failure::invalid(format!(
                "timestep_spacing {other} is not SDXL_DEFAULT (-1) or an SDXL_SPACING_* value"
            )))
        }
    };
    let prediction_type = match p.prediction_type {
        SDXL_DEFAULT => None,
        SDXL_PREDICTION_EPSILON => Some("epsilon"),
        SDXL_PREDICTION_V_PREDICTION => Some("v_prediction"),
        SDXL_PREDICTION_SAMPLE => Some("sample"),
        other => {
            return Err(Failure::invalid(format!(
                "prediction_type {other} is not SDXL_DEFAULT (-1) or an SDXL_PREDICTION_* value"
            )))
        }
    };
    Ok(SchedulerChoice {
        kind: scheduler_kind(p.scheduler)?,
        karras,
        timestep_spacing: timestep_spacing.map(str::to_string),
        prediction_type: prediction_type.map(str::to_string),
        overrides: Default::default(),
    })
}

fn micro(p: &sdxl_generate_params) -> FfiResult<MicroParams> {
    Ok(MicroParams {
        original_size: size_pair(p.original_width, p.original_height, "original")?,
        crops_coords_top_left: (p.crop_top as usize, p.crop_left as usize),
        target_size: size_pair(p.target_width, p.target_height, "target")?,
        negative_original_size: size_pair(
            p.negative_original_width,
            p.negative_original_height,
            "negative_original",
        )?,
        negative_crops_coords_top_left: Some((
            p.negative_crop_top as usize,
            p.negative_crop_left as usize,
        )),
        negative_target_size: size_pair(
            p.negative_target_width,
            p.negative_target_height,
            "negative_target",
        )?,
        aesthetic_score: p.aesthetic_score,
        negative_aesthetic_score: p.negative_aesthetic_score,
    })
}

/// Copies the init image out of the caller's buffer as packed RGB.
///
/// # Safety
/// `p.init_image` must be NULL or readable for `p.init_image_len` bytes.
unsafe fn init_image(p: &sdxl_generate_params) -> FfiResult<Option<RgbImage>> {
    if p.init_image.is_null() {
        return Ok(None);
    }
    let channels = match p.init_image_format {
        SDXL_PIXEL_RGBA8 => 4,
        SDXL_PIXEL_RGB8 => 3,
        other => {
            return Err(Failure::invalid(format!(
                "init_image_format {other} is not SDXL_PIXEL_RGBA8 (0) or SDXL_PIXEL_RGB8 (1)"
            )))
        }
    };
    let (w, h) = (p.width as usize, p.height as usize);
    let row = w * channels;
    let stride = match p.init_image_stride as usize {
        0 => row,
        s if s < row => {
            return Err(Failure::invalid(format!(
                "init_image_stride {s} is smaller than a row of {w} pixels ({row} bytes)"
            )))
        }
        s => s,
    };
    let needed = stride
        .checked_mul(h.saturating_sub(1))
        .and_then(|v| v.checked_add(row))
        .ok_or_else(|| Failure::invalid(format!("init_image_stride {stride} is too large")))?;
    if p.init_image_len < needed {
        return Err(Failure::invalid(format!(
            "init_image_len {} is too small for a {w}x{h} image with stride {stride} \
             ({needed} bytes needed)",
            p.init_image_len
        )));
    }
    // SAFETY: the caller guarantees `init_image_len` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(p.init_image, p.init_image_len) };
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let line = bytes.get(y * stride..y * stride + row).unwrap_or_default();
        for px in line.chunks_exact(channels) {
            rgb.extend(px.iter().take(3));
        }
    }
    Ok(Some(RgbImage::new(w, h, rgb)?))
}

/// Reads and checks a caller's parameters into an owned [`Request`].
///
/// # Safety
/// `model` and `params` must be NULL or valid, and the pointers inside `params` as documented
/// on its fields.
pub(crate) unsafe fn request(
    model: *const sdxl_model,
    params: *const sdxl_generate_params,
) -> FfiResult<Request> {
    // SAFETY: forwarded from the caller.
    let model = unsafe { handle(model, "model") }?;
    // SAFETY: forwarded from the caller.
    let p = unsafe { versioned(params, "params") }?;
    // SAFETY: the string fields are NULL or NUL-terminated, as documented.
    let (prompt, prompt_2, negative, negative_2) = unsafe {
        (
            req_str(p.prompt, "params->prompt")?,
            opt_str(p.prompt_2, "params->prompt_2")?,
            opt_str(p.negative_prompt, "params->negative_prompt")?,
            opt_str(p.negative_prompt_2, "params->negative_prompt_2")?,
        )
    };
    let mut core = GenerateParams::new(prompt);
    core.prompts.prompt_2 = prompt_2.map(str::to_string);
    core.prompts.negative_prompt = negative.map(str::to_string);
    core.prompts.negative_prompt_2 = negative_2.map(str::to_string);
    core.width = p.width as usize;
    core.height = p.height as usize;
    core.steps = p.steps as usize;
    core.num_images = p.num_images as usize;
    core.seed = p.seed;
    core.guidance_scale = p.guidance_scale;
    core.guidance_rescale = p.guidance_rescale;
    core.strength = p.strength;
    core.scheduler = scheduler_choice(p)?;
    core.micro = micro(p)?;
    core.validate()?;
    // SAFETY: the init image pointer and length come from the caller, as documented.
    let init = unsafe { init_image(p) }?;
    let refiner = if p.refiner.is_null() {
        None
    } else {
        // SAFETY: a non-NULL refiner is a live handle, as documented.
        let r = unsafe { handle(p.refiner, "params->refiner") }?;
        if r.shared.model.kind != ModelKind::Refiner {
            return Err(Failure::invalid(
                "params->refiner holds a base model; pass an SDXL refiner (or NULL)",
            ));
        }
        if !(p.refiner_start > 0.0 && p.refiner_start < 1.0) {
            return Err(Failure::invalid(format!(
                "refiner_start must be in (0, 1), got {}",
                p.refiner_start
            )));
        }
        Some((Arc::clone(&r.shared), p.refiner_start))
    };
    let cancel = if p.cancel.is_null() {
        None
    } else {
        // SAFETY: a non-NULL token is live, as documented.
        Some(unsafe { handle(p.cancel, "params->cancel") }?.token.clone())
    };
    Ok(Request {
        model: Arc::clone(&model.shared),
        refiner,
        params: core,
        init,
        cancel,
        progress: p.progress.map(|f| Callback {
            f,
            user_data: p.progress_user_data,
        }),
        preview: p.preview.map(|f| Callback {
            f,
            user_data: p.preview_user_data,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_core() {
        let d = sdxl_generate_params::default();
        let core = GenerateParams::new("");
        assert_eq!(d.width as usize, core.width);
        assert_eq!(d.steps as usize, core.steps);
        assert_eq!(d.guidance_scale, core.guidance_scale);
        assert_eq!(
            d.struct_size as usize,
            std::mem::size_of::<sdxl_generate_params>()
        );
    }

    #[test]
    fn size_pairs_need_both_values() {
        assert_eq!(size_pair(0, 0, "x"), Ok(None));
        assert_eq!(size_pair(96, 64, "x"), Ok(Some((64, 96))));
        assert!(size_pair(0, 64, "x").is_err());
    }

    #[test]
    fn rgba_with_stride_becomes_packed_rgb() {
        #[rustfmt::skip]
        let bytes: Vec<u8> = vec![
            1, 2, 3, 255, 4, 5, 6, 255, 0, 0, 0, 0,
            7, 8, 9, 255, 10, 11, 12, 255,
        ];
        let mut p = sdxl_generate_params {
            width: 2,
            height: 2,
            init_image_stride: 12,
            init_image: bytes.as_ptr(),
            init_image_len: bytes.len(),
            ..Default::default()
        };
        // SAFETY: the buffer outlives the call.
        let img = unsafe { init_image(&p) }.ok().flatten();
        assert_eq!(img.map(|i| i.data), Some((1..=12).collect::<Vec<u8>>()));
        p.init_image_len -= 1;
        // SAFETY: as above.
        assert!(unsafe { init_image(&p) }.is_err());
    }
}
