//! End-to-end pipeline parity with diffusers: `encode_prompt`, text-to-image, image-to-image
//! (SDEdit) and the base → refiner hand-off, every recorded intermediate compared.
//!
//! Cases, prompts, sizes, schedulers and seeds come from `manifest.json`; tensor names from
//! `index.json`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sdxl_core::pipeline::RunControl;

use candle_core::Tensor;
use common::noise::NoiseReplay;
use common::replay::{
    check_u8, diffusers_prompts, embeds_by_name, encode_prompt_cases, params_from, t2i_case_params,
    Recorder,
};
use common::{base_model, golden, goldens, manifest, refiner_model, Parity};
use sdxl_core::pipeline::{
    decode_latents, encode_prompt, image_to_image, text_to_image, InitImage, RgbImage,
};
use sdxl_core::schedulers::NoiseSource;

/// The decoded image in [0, 1], as diffusers' `postprocess(output_type="pt")` gives it.
fn image01(decoded: Tensor) -> Tensor {
    ((decoded / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
}

#[test]
fn encode_prompt_matches_diffusers() {
    let g = goldens("goldens/encode_prompt.safetensors");
    let base = base_model();
    let refiner = refiner_model();
    let mut p = Parity::new();
    for case in encode_prompt_cases() {
        let model = case.model(&base, &refiner);
        let e = encode_prompt(model, &diffusers_prompts(&case.kwargs)).expect("encode_prompt");
        for (key, t) in embeds_by_name(&e) {
            let gname = format!("{}.{key}", case.name);
            p.check(&gname, t, golden(&g, &gname));
        }
    }
    p.finish();
}

#[test]
fn text_to_image_matches_diffusers() {
    let g = goldens("goldens/pipeline_t2i.safetensors");
    let base = base_model();
    let mut p = Parity::new();
    for case in manifest()["t2i"].as_array().expect("t2i cases") {
        let name = case["case"].as_str().expect("case name");
        let params = t2i_case_params(case);
        let latents_in = golden(&g, &format!("{name}.latents_in"));
        let mut rec = Recorder::default();
        let out = text_to_image(
            &base,
            &params,
            Some(latents_in),
            RunControl::observing(&mut rec),
        )
        .expect("t2i");
        rec.check(&mut p, &g, name);
        p.check(
            &format!("{name}.latents_out"),
            &out,
            golden(&g, &format!("{name}.latents_out")),
        );
        let decoded = decode_latents(&base, &out).unwrap();
        p.check(
            &format!("{name}.vae_decode_out"),
            &decoded,
            golden(&g, &format!("{name}.vae_decode_out")),
        );
        let images = RgbImage::from_decoded(&decoded).unwrap();
        check_u8(
            &format!("{name}.image_uint8"),
            &images,
            golden(&g, &format!("{name}.image_uint8")),
        );
    }
    p.finish();
}

#[test]
fn seeded_latents_are_the_diffusers_latents() {
    // With no latents given, seed S must draw exactly torch.randn(generator=manual_seed(S)).
    let g = goldens("goldens/pipeline_t2i.safetensors");
    let base = base_model();
    let mut p = Parity::new();
    for case in manifest()["t2i"].as_array().expect("t2i cases") {
        let name = case["case"].as_str().expect("case name");
        let mut params = t2i_case_params(case);
        params.seed = case["latents_seed"].as_u64().expect("seed");
        let mut rec = Recorder::default();
        text_to_image(&base, &params, None, RunControl::observing(&mut rec)).expect("t2i");
        let first = &rec.steps[0]["step_sample"];
        let sigma = case["init_noise_sigma"].as_f64().expect("sigma");
        let expected = (golden(&g, &format!("{name}.latents_in")) * sigma).unwrap();
        p.check(&format!("{name}: seeded initial latents"), first, &expected);
    }
    p.finish();
}

#[test]
fn image_to_image_matches_diffusers() {
    let g = goldens("goldens/pipeline_img2img.safetensors");
    let base = base_model();
    let m = manifest();
    let case = &m["img2img"];
    let image = golden(&g, "image01");
    let (_, _, h, w) = image.dims4().unwrap();
    let params = params_from(&case["kwargs"], Some((h, w)));
    let mut p = Parity::new();
    // Replay diffusers' two draws (posterior sample, then add_noise), then check that the
    // seeded generator reproduces them too.
    let replay = NoiseReplay::new(vec![
        golden(&g, "noise_posterior").clone(),
        golden(&g, "noise_add").clone(),
    ]);
    for (label, mut noise) in [("replayed noise", Some(replay)), ("seeded generator", None)] {
        let mut params = params.clone();
        params.seed = case["generator_seed"].as_u64().expect("generator seed");
        let mut rec = Recorder::default();
        let out = image_to_image(
            &base,
            &params,
            &InitImage::Pixels(image.clone()),
            noise.as_mut().map(|n| n as &mut dyn NoiseSource),
            RunControl::observing(&mut rec),
        )
        .expect("img2img");
        println!("-- {label}");
        p.check(
            "noisy_latents",
            &rec.steps[0]["step_sample"],
            golden(&g, "noisy_latents"),
        );
        rec.check(&mut p, &g, "sdedit");
        p.check("latents_out", &out, golden(&g, "latents_out"));
        let img01 = image01(decode_latents(&base, &out).unwrap());
        p.check("image", &img01, golden(&g, "image"));
    }
    p.finish();
}

#[test]
fn base_to_refiner_handoff_matches_diffusers() {
    let g = goldens("goldens/pipeline_base_refiner.safetensors");
    let base = base_model();
    let refiner = refiner_model();
    let m = manifest();
    let h = &m["handoff"];
    let mut p = Parity::new();
    let base_params = params_from(&h["base_kwargs"], None);
    let mut rec = Recorder::default();
    let lat = text_to_image(
        &base,
        &base_params,
        Some(golden(&g, "base.latents_in")),
        RunControl::observing(&mut rec),
    )
    .expect("base");
    rec.check(&mut p, &g, "base");
    p.check("base.latents_out", &lat, golden(&g, "base.latents_out"));
    let (_, _, lh, lw) = lat.dims4().unwrap();
    let scale = base.vae_config().downscale_factor();
    let refiner_params = params_from(&h["refiner_kwargs"], Some((lh * scale, lw * scale)));
    let mut rec = Recorder::default();
    let out = image_to_image(
        &refiner,
        &refiner_params,
        &InitImage::Latents(lat),
        None,
        RunControl::observing(&mut rec),
    )
    .expect("refiner");
    assert_eq!(
        rec.steps.len(),
        h["refiner_timesteps"].as_array().map_or(0, Vec::len)
    );
    rec.check(&mut p, &g, "refiner");
    p.check(
        "refiner.latents_out",
        &out,
        golden(&g, "refiner.latents_out"),
    );
    let img01 = image01(decode_latents(&refiner, &out).unwrap());
    p.check("refiner.image", &img01, golden(&g, "refiner.image"));
    p.finish();
}
