//! The C API reproduces diffusers: for every `manifest.json → t2i` case, `sdxl_generate` with
//! `seed = latents_seed` (and the case's prompts, size, steps, guidance, rescale,
//! micro-conditioning and scheduler) gives the golden `<case>.image_uint8` within ±1 per value
//! and `<case>.latents_out` within the f32 parity tolerance; the base → refiner hand-off of
//! `manifest.json → handoff` gives `refiner.latents_out` and `refiner.image`; image-to-image
//! from an RGB8 buffer with padded rows gives exactly the Rust API's result.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../sdxl-core/tests/common/mod.rs"]
mod common;

use std::ffi::{c_char, CStr, CString};
use std::ptr;

use candle_core::{Device, Tensor};
use common::{golden, goldens, manifest, Parity};
use serde_json::Value;

use sdxl::*;

fn last_error() -> String {
    let mut buf = vec![0 as c_char; 1024];
    // SAFETY: the buffer holds 1024 bytes.
    unsafe { sdxl_last_error_message(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: the library NUL-terminates the message.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn ok(status: sdxl_status, what: &str) {
    assert_eq!(status, SDXL_STATUS_OK, "{what}: {}", last_error());
}

/// Owns the C strings a params struct points to.
#[derive(Default)]
struct Strings(Vec<CString>);

impl Strings {
    fn keep(&mut self, s: &str) -> *const c_char {
        self.0.push(CString::new(s).expect("no NUL in prompts"));
        self.0.last().map_or(ptr::null(), |c| c.as_ptr())
    }
}

/// `(width, height)` from a diffusers `(height, width)` pair.
fn wh(v: &Value) -> (u32, u32) {
    let a = v.as_array().expect("a [height, width] pair");
    (a[1].as_u64().unwrap() as u32, a[0].as_u64().unwrap() as u32)
}

/// Sets the scheduler fields from a manifest `scheduler_swap` (`[class, overrides]`).
fn apply_swap(p: &mut sdxl_generate_params, swap: &Value) {
    let Some([class, overrides]) = swap.as_array().map(Vec::as_slice) else {
        return;
    };
    let o = overrides.as_object().cloned().unwrap_or_default();
    let class = class.as_str().expect("scheduler class");
    let sde = o
        .get("algorithm_type")
        .and_then(Value::as_str)
        .is_some_and(|a| a.starts_with("sde"));
    let order3 = o.get("solver_order").and_then(Value::as_u64) == Some(3);
    p.scheduler = match class {
        "EulerDiscreteScheduler" => SDXL_SCHEDULER_EULER,
        "EulerAncestralDiscreteScheduler" => SDXL_SCHEDULER_EULER_ANCESTRAL,
        "DDIMScheduler" => SDXL_SCHEDULER_DDIM,
        "DPMSolverMultistepScheduler" if sde => SDXL_SCHEDULER_DPMPP_2M_SDE,
        "DPMSolverMultistepScheduler" if order3 => SDXL_SCHEDULER_DPMPP_3M,
        "DPMSolverMultistepScheduler" => SDXL_SCHEDULER_DPMPP_2M,
        "HeunDiscreteScheduler" => SDXL_SCHEDULER_HEUN,
        "KDPM2DiscreteScheduler" => SDXL_SCHEDULER_KDPM2,
        "UniPCMultistepScheduler" => SDXL_SCHEDULER_UNIPC,
        "DDPMScheduler" => SDXL_SCHEDULER_DDPM,
        "LCMScheduler" => SDXL_SCHEDULER_LCM,
        "LMSDiscreteScheduler" => SDXL_SCHEDULER_LMS,
        other => panic!("scheduler class {other} has no SDXL_SCHEDULER_* constant"),
    };
    for (key, value) in o {
        match key.as_str() {
            "use_karras_sigmas" => p.karras = i32::from(value.as_bool().expect("bool")),
            "timestep_spacing" => {
                p.timestep_spacing = match value.as_str().expect("spacing") {
                    "leading" => SDXL_SPACING_LEADING,
                    "trailing" => SDXL_SPACING_TRAILING,
                    "linspace" => SDXL_SPACING_LINSPACE,
                    s => panic!("spacing {s}"),
                }
            }
            "prediction_type" => {
                p.prediction_type = match value.as_str().expect("prediction") {
                    "epsilon" => SDXL_PREDICTION_EPSILON,
                    "v_prediction" => SDXL_PREDICTION_V_PREDICTION,
                    "sample" => SDXL_PREDICTION_SAMPLE,
                    s => panic!("prediction type {s}"),
                }
            }
            "algorithm_type" | "solver_order" => {}
            other => panic!("the C API cannot express the scheduler override `{other}`"),
        }
    }
}

/// Fresh parameters from `sdxl_generate_params_init`.
fn init_params() -> sdxl_generate_params {
    let mut init = std::mem::MaybeUninit::<sdxl_generate_params>::uninit();
    // SAFETY: `init` is writable; the function fills every field.
    ok(
        unsafe { sdxl_generate_params_init(init.as_mut_ptr()) },
        "params init",
    );
    // SAFETY: initialised by the call above.
    unsafe { init.assume_init() }
}

/// Sets the fields named by diffusers pipeline kwargs; any kwarg without a field fails.
fn apply_kwargs(p: &mut sdxl_generate_params, kwargs: &Value, strings: &mut Strings) {
    for (key, v) in kwargs.as_object().expect("kwargs") {
        match key.as_str() {
            "prompt" => p.prompt = strings.keep(v.as_str().expect("prompt")),
            "prompt_2" => p.prompt_2 = v.as_str().map_or(ptr::null(), |s| strings.keep(s)),
            "negative_prompt" => {
                p.negative_prompt = v.as_str().map_or(ptr::null(), |s| strings.keep(s))
            }
            "negative_prompt_2" => {
                p.negative_prompt_2 = v.as_str().map_or(ptr::null(), |s| strings.keep(s))
            }
            "height" => p.height = v.as_u64().expect("height") as u32,
            "width" => p.width = v.as_u64().expect("width") as u32,
            "num_inference_steps" => p.steps = v.as_u64().expect("steps") as u32,
            "guidance_scale" => p.guidance_scale = v.as_f64().expect("guidance"),
            "guidance_rescale" => p.guidance_rescale = v.as_f64().expect("rescale"),
            "strength" => p.strength = v.as_f64().expect("strength"),
            "denoising_end" | "denoising_start" => {
                p.refiner_start = v.as_f64().expect("hand-off fraction")
            }
            "aesthetic_score" => p.aesthetic_score = v.as_f64().expect("score"),
            "negative_aesthetic_score" => p.negative_aesthetic_score = v.as_f64().expect("score"),
            "original_size" => (p.original_width, p.original_height) = wh(v),
            "target_size" => (p.target_width, p.target_height) = wh(v),
            "negative_original_size" => {
                (p.negative_original_width, p.negative_original_height) = wh(v)
            }
            "negative_target_size" => (p.negative_target_width, p.negative_target_height) = wh(v),
            "crops_coords_top_left" => (p.crop_left, p.crop_top) = wh(v),
            "negative_crops_coords_top_left" => (p.negative_crop_left, p.negative_crop_top) = wh(v),
            other => panic!("kwarg `{other}` has no sdxl_generate_params field"),
        }
    }
}

fn load(dir: &std::path::Path) -> *mut sdxl_model {
    let dir = CString::new(dir.to_str().expect("UTF-8 path")).unwrap();
    let mut model = ptr::null_mut();
    // SAFETY: valid path, default options, writable output.
    ok(
        unsafe { sdxl_model_load(dir.as_ptr(), ptr::null(), &mut model) },
        "load",
    );
    model
}

/// Runs `sdxl_generate` with buffers of the queried sizes: (RGBA bytes, latents).
fn generate(model: *const sdxl_model, p: &sdxl_generate_params, what: &str) -> (Vec<u8>, Vec<f32>) {
    let (mut image_len, mut latents_len) = (0usize, 0usize);
    // SAFETY: live model, filled params, writable outputs.
    unsafe {
        ok(sdxl_generate_image_size(p, &mut image_len), "image size");
        ok(
            sdxl_generate_latents_size(model, p, &mut latents_len),
            "latents size",
        );
    }
    let mut rgba = vec![0u8; image_len];
    let mut latents = vec![0f32; latents_len];
    // SAFETY: buffers of the queried sizes.
    let status = unsafe {
        sdxl_generate(
            model,
            p,
            rgba.as_mut_ptr(),
            rgba.len(),
            latents.as_mut_ptr(),
            latents.len(),
        )
    };
    ok(status, what);
    (rgba, latents)
}

/// The RGB values of an RGBA buffer (checking that alpha is opaque).
fn rgb_of(rgba: &[u8]) -> Vec<i64> {
    assert!(rgba.chunks_exact(4).all(|px| px[3] == 255), "alpha is 255");
    rgba.chunks_exact(4)
        .flat_map(|px| px[..3].iter().map(|&v| i64::from(v)))
        .collect()
}

/// Compares 8-bit images within ±1 per value, printing the worst difference.
fn check_u8(name: &str, ours: &[i64], golden: &[i64]) -> Option<String> {
    assert_eq!(ours.len(), golden.len(), "{name}: image size");
    let worst = ours
        .iter()
        .zip(golden)
        .map(|(a, b)| (a - b).abs())
        .max()
        .unwrap_or(0);
    let off = ours.iter().zip(golden).filter(|(a, b)| a != b).count();
    let pass = worst <= 1;
    println!(
        "{} {name} (C API): worst abs {worst}, {off} of {} values differ, tol 1",
        if pass { "ok  " } else { "FAIL" },
        ours.len()
    );
    (!pass).then(|| format!("{name}: image differs by {worst} > 1"))
}

/// A [0, 1] image tensor `[1, 3, H, W]` as 8-bit values `[H, W, 3]`, rounded half to even.
fn to_u8_hwc(image01: &Tensor) -> Vec<i64> {
    let hwc = image01.squeeze(0).unwrap().permute((1, 2, 0)).unwrap();
    common::flat_f64(&hwc)
        .into_iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as i64)
        .collect()
}

#[test]
fn c_api_text_to_image_matches_the_diffusers_pipeline() {
    let g = goldens("goldens/pipeline_t2i.safetensors");
    let model = load(&common::base_dir());
    let mut latents_parity = Parity::new();
    let mut failures = Vec::new();
    let cases = manifest()["t2i"].as_array().expect("t2i cases").clone();
    for case in cases.iter().filter(|c| c["latents_seed"].is_u64()) {
        let name = case["case"].as_str().expect("case name");
        let mut strings = Strings::default();
        let mut p = init_params();
        apply_kwargs(&mut p, &case["kwargs"], &mut strings);
        apply_swap(&mut p, &case["scheduler_swap"]);
        p.seed = case["latents_seed"].as_u64().expect("latents_seed");
        let (rgba, latents) = generate(model, &p, name);

        let golden_latents = golden(&g, &format!("{name}.latents_out"));
        let ours = Tensor::from_vec(latents, golden_latents.dims(), &Device::Cpu).unwrap();
        latents_parity.check(
            &format!("{name}.latents_out (C API)"),
            &ours,
            golden_latents,
        );
        // The golden image is [n, H, W, 3] uint8.
        let golden_image = common::flat_i64(golden(&g, &format!("{name}.image_uint8")));
        failures.extend(check_u8(
            &format!("{name}.image_uint8"),
            &rgb_of(&rgba),
            &golden_image,
        ));
    }
    // SAFETY: the handle came from sdxl_model_load.
    unsafe { sdxl_model_free(model) };
    latents_parity.finish();
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn c_api_base_to_refiner_handoff_matches_diffusers() {
    let g = goldens("goldens/pipeline_base_refiner.safetensors");
    let m = manifest();
    let case = &m["handoff"];
    let base = load(&common::base_dir());
    let refiner = load(&common::refiner_dir());
    let mut strings = Strings::default();
    let mut p = init_params();
    apply_kwargs(&mut p, &case["base_kwargs"], &mut strings);
    let from_base = p;
    apply_kwargs(&mut p, &case["refiner_kwargs"], &mut strings);
    // One parameter set drives both stages, so the two calls must agree.
    assert_eq!(
        (
            from_base.steps,
            from_base.guidance_scale,
            from_base.refiner_start
        ),
        (p.steps, p.guidance_scale, p.refiner_start),
        "the base and refiner calls differ in steps, guidance or hand-off point"
    );
    p.refiner = refiner;
    p.seed = case["latents_seed"].as_u64().expect("latents_seed");
    let (rgba, latents) = generate(base, &p, "base + refiner");
    // SAFETY: handles from sdxl_model_load.
    unsafe {
        sdxl_model_free(refiner);
        sdxl_model_free(base);
    }
    let mut parity = Parity::new();
    let golden_latents = golden(&g, "refiner.latents_out");
    let ours = Tensor::from_vec(latents, golden_latents.dims(), &Device::Cpu).unwrap();
    parity.check("refiner.latents_out (C API)", &ours, golden_latents);
    parity.finish();
    let golden_image = to_u8_hwc(golden(&g, "refiner.image"));
    let failure = check_u8("refiner.image", &rgb_of(&rgba), &golden_image);
    assert!(failure.is_none(), "{failure:?}");
}

#[test]
fn c_api_image_to_image_reads_rgb8_with_stride_like_the_core() {
    use sdxl_core::pipeline::{
        decode_images, image_to_image, GenerateParams, InitImage, LoadOptions, RgbImage,
        RunControl, SdxlModel,
    };
    let g = goldens("goldens/pipeline_img2img.safetensors");
    let m = manifest();
    let case = &m["img2img"];
    let image01 = golden(&g, "image01");
    let (_, _, h, w) = image01.dims4().unwrap();
    let rgb: Vec<u8> = to_u8_hwc(image01).into_iter().map(|v| v as u8).collect();
    // RGB8 rows padded to a stride of 3*w + 5 bytes.
    let stride = 3 * w + 5;
    let mut padded = vec![0xAAu8; stride * h];
    for y in 0..h {
        padded[y * stride..y * stride + 3 * w].copy_from_slice(&rgb[y * 3 * w..(y + 1) * 3 * w]);
    }
    let mut strings = Strings::default();
    let mut p = init_params();
    apply_kwargs(&mut p, &case["kwargs"], &mut strings);
    p.width = w as u32;
    p.height = h as u32;
    p.seed = case["generator_seed"].as_u64().expect("generator seed");
    p.init_image = padded.as_ptr();
    p.init_image_len = padded.len();
    p.init_image_stride = stride as u32;
    p.init_image_format = SDXL_PIXEL_RGB8;
    let model = load(&common::base_dir());
    let (rgba, _) = generate(model, &p, "img2img");
    // SAFETY: the handle came from sdxl_model_load.
    unsafe { sdxl_model_free(model) };

    // The same run through the Rust API.
    let base = SdxlModel::load(&common::base_dir(), &LoadOptions::default()).unwrap();
    let mut params = GenerateParams::new(case["kwargs"]["prompt"].as_str().unwrap());
    params.prompts.negative_prompt = case["kwargs"]["negative_prompt"].as_str().map(String::from);
    params.width = w;
    params.height = h;
    params.steps = p.steps as usize;
    params.guidance_scale = p.guidance_scale;
    params.strength = p.strength;
    params.seed = p.seed;
    let init = RgbImage::new(w, h, rgb)
        .unwrap()
        .to_tensor01(&Device::Cpu)
        .unwrap();
    let latents = image_to_image(
        &base,
        &params,
        &InitImage::Pixels(init),
        None,
        RunControl::none(),
    )
    .unwrap();
    let expected = &decode_images(&base, &latents).unwrap()[0];
    let expected: Vec<i64> = expected.data.iter().map(|&v| i64::from(v)).collect();
    let ours = rgb_of(&rgba);
    let same = ours.iter().zip(&expected).filter(|(a, b)| a == b).count();
    println!(
        "img2img via the C API: {same} of {} values equal the Rust API's",
        ours.len()
    );
    assert_eq!(
        ours, expected,
        "the C API's img2img differs from the Rust API's"
    );
}
