//! Full-size SDXL (random weights, the real architecture and key names) against
//! `../shared/reference/fullsize/goldens.safetensors`.
//!
//! Ignored by default: it needs the weight folders written by
//! `../shared/bench/torch_baseline.py --save` under `$SDXL_FULL` (`base-diffusers/`,
//! `refiner-diffusers/`), about 11 GB, and ~16 GB of RAM. Run with
//! `SDXL_FULL=… cargo test --release -p sdxl-core --test fullsize -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{golden, Parity};
use sdxl_core::pipeline::{encode_prompt, LoadOptions, Prompts, SdxlModel};
use sdxl_core::unet::{UNet2DConditionModel, UNetConditioning};
use serde_json::Value;

fn full_root() -> PathBuf {
    PathBuf::from(
        std::env::var_os("SDXL_FULL")
            .expect("set SDXL_FULL to the folder holding base-diffusers/ and refiner-diffusers/"),
    )
}

fn reference() -> PathBuf {
    common::fixtures_root().join("../fullsize")
}

fn manifest() -> Value {
    let path = reference().join("manifest.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fullsize manifest")).expect("JSON")
}

fn names_with_prefix(m: &Value, prefix: &str) -> Vec<String> {
    let mut cases: Vec<String> = m["goldens"]
        .as_array()
        .expect("goldens")
        .iter()
        .filter_map(|g| g["name"].as_str())
        .filter_map(|n| n.split_once('.').map(|(c, _)| c.to_string()))
        .filter(|c| c.starts_with(prefix))
        .collect();
    cases.dedup();
    cases
}

/// UNet inputs of a case; cases without their own conditioning use the `encode_prompt.*`
/// goldens in the pipeline's CFG order (negative first).
fn unet_case(unet: &UNet2DConditionModel, g: &HashMap<String, Tensor>, case: &str, p: &mut Parity) {
    let get = |k: &str| g.get(&format!("{case}.{k}")).cloned();
    let ctx = get("encoder_hidden_states").unwrap_or_else(|| {
        Tensor::cat(
            &[
                golden(g, "encode_prompt.negative_prompt_embeds"),
                golden(g, "encode_prompt.prompt_embeds"),
            ],
            0,
        )
        .unwrap()
    });
    let pooled = get("text_embeds").unwrap_or_else(|| {
        Tensor::cat(
            &[
                golden(g, "encode_prompt.negative_pooled_prompt_embeds"),
                golden(g, "encode_prompt.pooled_prompt_embeds"),
            ],
            0,
        )
        .unwrap()
    });
    let cond = UNetConditioning {
        encoder_hidden_states: ctx,
        text_embeds: pooled,
        time_ids: get("time_ids").expect("time_ids"),
    };
    let t = get("timestep")
        .expect("timestep")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let start = std::time::Instant::now();
    let out = unet
        .forward(&get("sample").expect("sample"), t as f64, &cond)
        .unwrap();
    println!("{case}: forward {:.1}s", start.elapsed().as_secs_f64());
    p.check(
        &format!("{case}.noise_pred"),
        &out,
        golden(g, &format!("{case}.noise_pred")),
    );
}

#[test]
#[ignore = "needs the full-size weights under $SDXL_FULL"]
fn full_size_components_match_diffusers() {
    let g = candle_core::safetensors::load(reference().join("goldens.safetensors"), &Device::Cpu)
        .unwrap();
    let m = manifest();
    let mut p = Parity::new();
    let opts = LoadOptions::default();
    {
        let base = SdxlModel::load(&full_root().join("base-diffusers"), &opts).expect("base loads");
        let text = base.text().unwrap();
        for (enc, prefix) in [
            (text.encoder_1.as_ref().map(|e| &e.1), "te1"),
            (Some(&text.encoder_2.1), "te2"),
        ] {
            let enc = enc.expect("base has both encoders");
            let out = enc
                .forward(golden(&g, &format!("{prefix}.input_ids")))
                .unwrap();
            p.check(
                &format!("{prefix}.penultimate"),
                &out.penultimate,
                golden(&g, &format!("{prefix}.penultimate")),
            );
            p.check(
                &format!("{prefix}.last_hidden_state"),
                &out.last_hidden_state,
                golden(&g, &format!("{prefix}.last_hidden_state")),
            );
            if let (Some(te), Some(gt)) =
                (&out.text_embeds, g.get(&format!("{prefix}.text_embeds")))
            {
                p.check(&format!("{prefix}.text_embeds"), te, gt);
            }
        }
        let prompts = &m["prompts"];
        let e = encode_prompt(
            &base,
            &Prompts {
                prompt: prompts["PROMPT"].as_str().expect("PROMPT").into(),
                negative_prompt: prompts["NEGATIVE"].as_str().map(str::to_string),
                ..Prompts::default()
            },
        )
        .unwrap();
        for (k, t) in [
            ("prompt_embeds", &e.prompt_embeds),
            ("negative_prompt_embeds", &e.negative_prompt_embeds),
            ("pooled_prompt_embeds", &e.pooled_prompt_embeds),
            (
                "negative_pooled_prompt_embeds",
                &e.negative_pooled_prompt_embeds,
            ),
        ] {
            p.check(
                &format!("encode_prompt.{k}"),
                t,
                golden(&g, &format!("encode_prompt.{k}")),
            );
        }
        let vae = base.vae().unwrap();
        let dec = vae.decode(golden(&g, "vae_decode.latent")).unwrap();
        p.check("vae_decode.sample", &dec, golden(&g, "vae_decode.sample"));
        let dist = vae.encode(golden(&g, "vae_encode.image")).unwrap();
        p.check("vae_encode.mean", &dist.mean, golden(&g, "vae_encode.mean"));
        p.check(
            "vae_encode.logvar",
            &dist.logvar,
            golden(&g, "vae_encode.logvar"),
        );
        for case in names_with_prefix(&m, "unet_base") {
            unet_case(&base.unet().unwrap(), &g, &case, &mut p);
        }
    }
    let refiner_unet = UNet2DConditionModel::load(
        &full_root().join("refiner-diffusers/unet"),
        DType::F32,
        &Device::Cpu,
        None,
    )
    .unwrap();
    for case in names_with_prefix(&m, "unet_refiner") {
        unet_case(&refiner_unet, &g, &case, &mut p);
    }
    p.finish();
}
