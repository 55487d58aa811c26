//! Parity of the SDXL UNet (base and refiner) with diffusers' `UNet2DConditionModel` forward.
//!
//! Cases are discovered from `index.json`: every `<case>.out` golden with its `<case>.sample`
//! and `<case>.timestep`, plus the shared `encoder_hidden_states`, `text_embeds` and `time_ids`.
//! Embedding taps (`<case>.tap.time_proj`, `time_embedding`, `add_time_proj`, `add_embedding`)
//! are checked wherever the fixtures hold them. Tolerance: the project's f32 rule (see
//! `common::Parity`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdxl_core::conditioning::sinusoidal_embedding;
use sdxl_core::loading::{component_weight_files, SafetensorsFiles, TensorSource};
use sdxl_core::unet::{UNet2DConditionModel, UNetConditioning};
use sdxl_core::Error;

fn load_unet(model_dir: &Path) -> UNet2DConditionModel {
    UNet2DConditionModel::load(&model_dir.join("unet"), DType::F32, &Device::Cpu, None)
        .unwrap_or_else(|e| panic!("loading {}: {e}", model_dir.display()))
}

fn shared_conditioning(g: &HashMap<String, Tensor>) -> UNetConditioning {
    UNetConditioning {
        encoder_hidden_states: common::golden(g, "encoder_hidden_states").clone(),
        text_embeds: common::golden(g, "text_embeds").clone(),
        time_ids: common::golden(g, "time_ids").clone(),
    }
}

/// The case names of a golden file: every `<case>.out` entry of `index.json`.
fn cases(file: &str) -> Vec<String> {
    let names: Vec<String> = common::index_entries(file)
        .iter()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .filter_map(|n| n.strip_suffix(".out").map(str::to_string))
        .collect();
    assert!(
        !names.is_empty(),
        "no `<case>.out` entries for {file} in index.json"
    );
    names
}

/// The sinusoidal projections have no module output in `forward_with_hook`; check their taps
/// directly. Returns the tap names it checked.
fn check_projection_taps(
    p: &mut common::Parity,
    unet: &UNet2DConditionModel,
    g: &HashMap<String, Tensor>,
    case: &str,
    timestep: f64,
    cond: &UNetConditioning,
    file: &str,
) -> Vec<String> {
    let cfg = unet.config();
    let batch = cond.time_ids.dim(0).unwrap();
    let mut checked = Vec::new();
    let name = format!("{case}.tap.time_proj");
    if let Some(golden) = g.get(&name) {
        let t = Tensor::full(timestep as f32, batch, &Device::Cpu).unwrap();
        let dim = cfg.block_out_channels[0];
        let ours = sinusoidal_embedding(&t, dim, cfg.flip_sin_to_cos, cfg.freq_shift, 1.0, 10000.0)
            .unwrap();
        p.check(&format!("{file} {name}"), &ours, golden);
        checked.push(name);
    }
    let name = format!("{case}.tap.add_time_proj");
    if let Some(golden) = g.get(&name) {
        let ours = unet.add_embedding.fourier_features(&cond.time_ids).unwrap();
        p.check(&format!("{file} {name}"), &ours, golden);
        checked.push(name);
    }
    checked
}

fn check_file(file: &str, model_dir: &Path) {
    let unet = load_unet(model_dir);
    let g = common::goldens(file);
    let cond = shared_conditioning(&g);
    let mut p = common::Parity::new();
    for case in cases(file) {
        let sample = common::golden(&g, &format!("{case}.sample"));
        let timestep = common::flat_f64(common::golden(&g, &format!("{case}.timestep")))[0];
        let mut checked = check_projection_taps(&mut p, &unet, &g, &case, timestep, &cond, file);
        let mut taps = Vec::new();
        let out = unet
            .forward_with_hook(sample, timestep, &cond, &mut |name, t| {
                taps.push((format!("{case}.tap.{name}"), t.clone()));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{file} {case}: {e}"));
        for (name, ours) in &taps {
            if let Some(golden) = g.get(name) {
                p.check(&format!("{file} {name}"), ours, golden);
                checked.push(name.clone());
            }
        }
        // Every tap the fixtures hold for this case must have been compared.
        let prefix = format!("{case}.tap.");
        for entry in common::index_entries(file) {
            let name = entry["name"].as_str().unwrap_or_default();
            assert!(
                !name.starts_with(&prefix) || checked.iter().any(|c| c == name),
                "{file}: golden tap `{name}` has no counterpart in forward_with_hook"
            );
        }
        p.check(
            &format!("{file} {case}.out"),
            &out,
            common::golden(&g, &format!("{case}.out")),
        );
    }
    p.finish();
}

#[test]
fn unet_base_matches_diffusers() {
    check_file("goldens/unet_base.safetensors", &common::base_dir());
}

#[test]
fn unet_refiner_matches_diffusers() {
    check_file("goldens/unet_refiner.safetensors", &common::refiner_dir());
}

#[test]
fn latent_not_multiple_of_downsampling_is_invalid_argument() {
    let unet = load_unet(&common::base_dir());
    let g = common::goldens("goldens/unet_base.safetensors");
    let cond = shared_conditioning(&g);
    let batch = cond.time_ids.dim(0).unwrap();
    let sample = Tensor::zeros(
        (batch, unet.config().in_channels, 8, 9),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    match unet.forward(&sample, 500.0, &cond) {
        Err(Error::InvalidArgument(msg)) => {
            println!("8x9 latent rejected: {msg}");
            assert!(msg.contains("8x9"), "{msg}");
        }
        other => panic!("expected InvalidArgument for an 8x9 latent, got {other:?}"),
    }
}

#[test]
fn time_ids_of_the_other_model_are_invalid_argument() {
    // The refiner's time-id rows fed to the base UNet (and vice versa) must fail with a clear
    // message instead of a shape error deep inside the add-embedding.
    let base_g = common::goldens("goldens/unet_base.safetensors");
    let refiner_g = common::goldens("goldens/unet_refiner.safetensors");
    for (model_dir, own, other) in [
        (common::base_dir(), &base_g, &refiner_g),
        (common::refiner_dir(), &refiner_g, &base_g),
    ] {
        let unet = load_unet(&model_dir);
        let mut cond = shared_conditioning(own);
        let batch = cond.time_ids.dim(0).unwrap();
        let other_ids = common::golden(other, "time_ids").narrow(0, 0, 1).unwrap();
        let n = other_ids.dim(1).unwrap();
        cond.time_ids = other_ids
            .broadcast_as((batch, n))
            .unwrap()
            .contiguous()
            .unwrap();
        let factor = 1 << unet.config().num_downsamplers();
        let shape = (batch, unet.config().in_channels, factor, factor);
        let sample = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        match unet.forward(&sample, 1.0, &cond) {
            Err(Error::InvalidArgument(msg)) => {
                println!("{}: {msg}", model_dir.display());
                assert!(msg.contains("add-embedding"), "{msg}");
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }
}

#[test]
fn unet_runs_in_half_precision() {
    // dtype genericity: the same weights loaded as f16 or bf16 give the f32 goldens within half
    // precision, tolerance rel * max(1, max|golden|): f16 1e-2 (11-bit mantissa), bf16 6e-2
    // (8-bit mantissa; on AVX512-BF16 CPUs this runs the native bf16 GEMM and convolution).
    let file = "goldens/unet_base.safetensors";
    let dir = common::base_dir().join("unet");
    let g = common::goldens(file);
    let cond = shared_conditioning(&g);
    for (dtype, name, rel) in [(DType::F16, "f16", 1e-2), (DType::BF16, "bf16", 6e-2)] {
        let unet = UNet2DConditionModel::load(&dir, dtype, &Device::Cpu, None).unwrap();
        let mut p = common::Parity::with_tolerance(rel);
        for case in cases(file) {
            let sample = common::golden(&g, &format!("{case}.sample"));
            let timestep = common::flat_f64(common::golden(&g, &format!("{case}.timestep")))[0];
            let out = unet.forward(sample, timestep, &cond).unwrap();
            assert_eq!(out.dtype(), dtype);
            p.check(
                &format!("{name} {file} {case}.out"),
                &out,
                common::golden(&g, &format!("{case}.out")),
            );
        }
        p.finish();
    }
}

#[test]
fn linear_layers_are_reachable_by_checkpoint_name() {
    // Every 2-D weight of each checkpoint is visited under its own key, with its stored shape,
    // except the resnets' `time_emb_proj` (owned by the shared resnet layer).
    for dir in [common::base_dir(), common::refiner_dir()] {
        let unet_dir = dir.join("unet");
        let files = component_weight_files(&unet_dir, "diffusion_pytorch_model", None).unwrap();
        let source = SafetensorsFiles::open(&files).unwrap();
        let mut expected: Vec<String> = source
            .keys()
            .into_iter()
            .filter(|k| !k.contains("time_emb_proj"))
            .filter_map(|k| k.strip_suffix(".weight").map(str::to_string))
            .filter(|k| source.shape(&format!("{k}.weight")).unwrap().len() == 2)
            .collect();
        let mut unet = load_unet(&dir);
        let mut visited = Vec::new();
        unet.visit_linears_mut(&mut |name, linear| {
            let stored = source.shape(&format!("{name}.weight"));
            let (out, inp) = linear.weight_dims();
            assert_eq!(stored, Some(vec![out, inp]), "{name}");
            visited.push(name.to_string());
            Ok(())
        })
        .unwrap();
        expected.sort();
        visited.sort();
        assert_eq!(visited, expected, "{}", dir.display());
        println!("{}: {} linear layers visited", dir.display(), visited.len());
    }
}
