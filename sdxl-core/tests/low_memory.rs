//! Components loaded on demand (`LoadOptions::low_memory`, `Residency::OnDemand`) compute
//! exactly what resident components compute: prompt embeddings, text-to-image latents and
//! images, image-to-image from pixels (VAE encode) and the base → refiner hand-off, compared
//! bit for bit on the tiny fixture models. LoRAs on such models: `tests/lora.rs`; single-file
//! checkpoints: `tests/single_file.rs`.
//!
//! Cases, prompts, sizes and seeds come from `manifest.json`, as in `tests/pipeline.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::replay::t2i_case_params;
use common::replay::{diffusers_prompts, embeds_by_name, encode_prompt_cases, params_from};
use common::{
    assert_identical, base_dir, golden, goldens, load_model, manifest, refiner_dir, residencies,
};
use sdxl_core::pipeline::{
    decode_images, encode_prompt, generate_latents, text_to_image, LoadOptions, RunControl,
    SdxlModel,
};

/// The base and refiner fixtures loaded with `options`.
fn models(options: &LoadOptions) -> (SdxlModel, SdxlModel) {
    (
        load_model(&base_dir(), options),
        load_model(&refiner_dir(), options),
    )
}

#[test]
fn on_demand_components_are_read_for_each_use() {
    let (resident, _) = models(&LoadOptions::default());
    let (low, _) = models(&LoadOptions::default().low_memory());
    assert!(resident.text().unwrap().resident().is_some());
    assert!(resident.unet().unwrap().resident().is_some());
    assert!(resident.vae().unwrap().resident().is_some());
    assert!(low.text().unwrap().resident().is_none());
    assert!(low.unet().unwrap().resident().is_none());
    assert!(low.vae().unwrap().resident().is_none());
    // The configs answer without reading anything.
    assert_eq!(low.unet_config(), resident.unet_config());
    assert_eq!(low.vae_config(), resident.vae_config());
}

#[test]
fn encode_prompt_is_identical_on_demand() {
    let (base, refiner) = models(&LoadOptions::default());
    for (label, options) in residencies() {
        let (b, r) = models(&options);
        for case in encode_prompt_cases() {
            let prompts = diffusers_prompts(&case.kwargs);
            let ours = encode_prompt(case.model(&b, &r), &prompts).unwrap();
            let resident = encode_prompt(case.model(&base, &refiner), &prompts).unwrap();
            for ((key, a), (_, b)) in embeds_by_name(&ours)
                .into_iter()
                .zip(embeds_by_name(&resident))
            {
                assert_identical(&format!("{label}: {}.{key}", case.name), a, b);
            }
        }
    }
}

#[test]
fn text_to_image_is_identical_on_demand() {
    let g = goldens("goldens/pipeline_t2i.safetensors");
    let cases = manifest()["t2i"].as_array().expect("t2i cases").clone();
    assert!(!cases.is_empty());
    let (base, _) = models(&LoadOptions::default());
    for (label, options) in residencies() {
        let (model, _) = models(&options);
        for case in &cases {
            let name = case["case"].as_str().expect("case name");
            let params = t2i_case_params(case);
            let latents_in = golden(&g, &format!("{name}.latents_in"));
            let run = |m: &SdxlModel| {
                let latents = text_to_image(m, &params, Some(latents_in), RunControl::none())
                    .expect("text_to_image");
                let images = decode_images(m, &latents).expect("decode");
                (latents, images)
            };
            let (latents, images) = run(&model);
            let (expected_latents, expected_images) = run(&base);
            assert_identical(
                &format!("{label}: {name} latents"),
                &latents,
                &expected_latents,
            );
            assert!(
                images
                    .iter()
                    .map(|i| &i.data)
                    .eq(expected_images.iter().map(|i| &i.data)),
                "{label}: {name}: images differ"
            );
        }
    }
}

#[test]
fn image_to_image_and_refiner_handoff_are_identical_on_demand() {
    let m = manifest();
    let g = goldens("goldens/pipeline_img2img.safetensors");
    let image = golden(&g, "image01");
    let (_, _, h, w) = image.dims4().unwrap();
    let mut img2img = params_from(&m["img2img"]["kwargs"], Some((h, w)));
    img2img.seed = m["img2img"]["generator_seed"].as_u64().expect("seed");
    let handoff = &m["handoff"];
    let mut t2i = params_from(&handoff["base_kwargs"], None);
    t2i.denoising_end = None;
    t2i.seed = handoff["latents_seed"].as_u64().expect("seed");
    let start = handoff["refiner_kwargs"]["denoising_start"]
        .as_f64()
        .expect("denoising_start");
    let run = |(base, refiner): &(SdxlModel, SdxlModel)| {
        let (from_pixels, _) =
            generate_latents(base, None, &img2img, Some(image), RunControl::none())
                .expect("img2img");
        let (refined, _) =
            generate_latents(base, Some((refiner, start)), &t2i, None, RunControl::none())
                .expect("base + refiner");
        (from_pixels, refined)
    };
    let (pixels_expected, refined_expected) = run(&models(&LoadOptions::default()));
    for (label, options) in residencies() {
        let (pixels, refined) = run(&models(&options));
        assert_identical(
            &format!("{label}: img2img latents"),
            &pixels,
            &pixels_expected,
        );
        assert_identical(
            &format!("{label}: base + refiner latents"),
            &refined,
            &refined_expected,
        );
    }
}
