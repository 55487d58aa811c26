//! Loading from the layouts users have: variants (`*.fp16.safetensors`), sharded checkpoints,
//! per-component dtypes, and every kind of bad input giving its own typed error.
//!
//! Each test builds a scratch copy of (part of) the fixture base model in a temporary folder.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdxl_core::loading::component_weight_files;
use sdxl_core::pipeline::{LoadOptions, SdxlModel};
use sdxl_core::unet::UNet2DConditionModel;
use sdxl_core::vae::AutoencoderKL;
use sdxl_core::Error;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdxl-loading-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
            let mut perms = std::fs::metadata(&to).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(&to, perms).unwrap();
        }
    }
}

fn unet_weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// A fixed UNet input sized from the model's own config.
fn unet_output(unet: &UNet2DConditionModel) -> Tensor {
    let cfg = unet.config();
    let (add_dim, expected) = cfg.text_time_dims().unwrap();
    let n_ids = 6;
    let pooled = expected - n_ids * add_dim;
    let ctx = cfg
        .cross_attention_dim
        .expand(1, "cross_attention_dim")
        .unwrap()[0];
    let f = 1 << cfg.num_downsamplers();
    let dev = &Device::Cpu;
    let sample = Tensor::ones((1, cfg.in_channels, 2 * f, 2 * f), DType::F32, dev).unwrap();
    let cond = sdxl_core::unet::UNetConditioning {
        encoder_hidden_states: Tensor::ones((1, 77, ctx), DType::F32, dev).unwrap(),
        text_embeds: Tensor::ones((1, pooled), DType::F32, dev).unwrap(),
        time_ids: Tensor::ones((1, n_ids), DType::F32, dev).unwrap(),
    };
    let dt = unet.dtype();
    let cond = sdxl_core::unet::UNetConditioning {
        encoder_hidden_states: cond.encoder_hidden_states.to_dtype(dt).unwrap(),
        text_embeds: cond.text_embeds.to_dtype(dt).unwrap(),
        time_ids: cond.time_ids.to_dtype(dt).unwrap(),
    };
    unet.forward(&sample.to_dtype(dt).unwrap(), 500.0, &cond)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn variant_files_are_chosen_by_the_variant_option() {
    let src = common::base_dir().join("unet");
    let dir = scratch("variant");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    // The fp16 variant holds half-precision weights, as real `*.fp16.safetensors` do.
    let half: HashMap<String, Tensor> = unet_weights(&src)
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&half, dir.join("diffusion_pytorch_model.fp16.safetensors"))
        .unwrap();
    // Only the variant exists: it is accepted without the option, and required with it.
    let files = component_weight_files(&dir, "diffusion_pytorch_model", None).unwrap();
    assert!(files[0].ends_with("diffusion_pytorch_model.fp16.safetensors"));
    let files = component_weight_files(&dir, "diffusion_pytorch_model", Some("fp16")).unwrap();
    assert!(files[0].ends_with("diffusion_pytorch_model.fp16.safetensors"));
    let missing = component_weight_files(&dir, "diffusion_pytorch_model", Some("bf16"));
    assert!(
        matches!(missing, Err(Error::NotFound { .. })),
        "{missing:?}"
    );
    // With both present, no option picks the plain file.
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let files = component_weight_files(&dir, "diffusion_pytorch_model", None).unwrap();
    assert!(files[0].ends_with("diffusion_pytorch_model.safetensors"));
    // The f16 weights load in f32 and in f16 and agree with the f32 checkpoint.
    let reference =
        unet_output(&UNet2DConditionModel::load(&src, DType::F32, &Device::Cpu, None).unwrap());
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let unet = UNet2DConditionModel::load(&dir, dtype, &Device::Cpu, Some("fp16")).unwrap();
        let out = unet_output(&unet);
        let tol = if dtype == DType::F32 { 5e-2 } else { 1e-1 };
        let d = common::max_abs_diff(&out, &reference);
        println!("fp16 variant loaded as {dtype:?}: max diff to f32 weights {d:.3e} (tol {tol})");
        assert!(d < tol);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sharded_checkpoints_load_through_their_index() {
    let src = common::base_dir().join("unet");
    let dir = scratch("sharded");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut names: Vec<String> = unet_weights(&src).keys().cloned().collect();
    names.sort();
    let all = unet_weights(&src);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> =
            chunk.iter().map(|k| (k.clone(), all[k].clone())).collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for k in chunk {
            weight_map.insert(k.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::to_string(&index).unwrap(),
    )
    .unwrap();
    let files = component_weight_files(&dir, "diffusion_pytorch_model", None).unwrap();
    assert_eq!(files.len(), 2);
    let sharded =
        unet_output(&UNet2DConditionModel::load(&dir, DType::F32, &Device::Cpu, None).unwrap());
    let single =
        unet_output(&UNet2DConditionModel::load(&src, DType::F32, &Device::Cpu, None).unwrap());
    assert_eq!(common::max_abs_diff(&sharded, &single), 0.0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_gives_distinct_typed_errors() {
    let base = common::base_dir();
    // Missing folder.
    let r = SdxlModel::load(
        Path::new("/nonexistent/sdxl-model"),
        &LoadOptions::default(),
    );
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");

    let dir = scratch("bad");
    copy_dir(&base, &dir);
    // Unreadable JSON names the file.
    std::fs::write(dir.join("unet/config.json"), "{ not json").unwrap();
    match UNet2DConditionModel::load(&dir.join("unet"), DType::F32, &Device::Cpu, None) {
        Err(Error::Json { path, .. }) => assert!(path.ends_with("unet/config.json")),
        other => panic!("expected Json error, got {other:?}"),
    }
    // Unknown block type is named.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("unet/config.json")).unwrap())
            .unwrap();
    cfg["down_block_types"][0] = "MysteryBlock2D".into();
    std::fs::write(dir.join("unet/config.json"), cfg.to_string()).unwrap();
    match UNet2DConditionModel::load(&dir.join("unet"), DType::F32, &Device::Cpu, None) {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("MysteryBlock2D"), "{msg}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // A config that disagrees with the weights: the misshapen tensor is named with both shapes.
    let mut vae_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("vae/config.json")).unwrap())
            .unwrap();
    vae_cfg["latent_channels"] = 8.into();
    std::fs::write(dir.join("vae/config.json"), vae_cfg.to_string()).unwrap();
    match AutoencoderKL::load(&dir.join("vae"), DType::F32, &Device::Cpu, None) {
        Err(Error::ShapeMismatch {
            key,
            expected,
            found,
        }) => {
            println!("shape mismatch: {key} expected {expected:?} found {found:?}");
            assert!(key.contains("conv"), "{key}");
            assert_ne!(expected, found);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    // Missing weights file of a component; pickle-only weights are refused, never unpickled.
    std::fs::remove_file(dir.join("text_encoder/model.safetensors")).unwrap();
    let r = SdxlModel::load(&dir, &LoadOptions::default());
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    std::fs::write(
        dir.join("text_encoder/pytorch_model.bin"),
        b"not really a pickle",
    )
    .unwrap();
    std::fs::write(dir.join("text_encoder/model.bin"), b"not really a pickle").unwrap();
    let r = component_weight_files(&dir.join("text_encoder"), "model", None);
    assert!(
        matches!(r, Err(Error::Unsupported(ref m)) if m.contains("pickle")),
        "{r:?}"
    );
    // A truncated safetensors file is a checkpoint error, not a panic.
    let unet_file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet_file).unwrap();
    std::fs::write(&unet_file, &bytes[..bytes.len() / 2]).unwrap();
    let r = component_weight_files(&dir.join("unet"), "diffusion_pytorch_model", None)
        .and_then(|f| sdxl_core::loading::Weights::from_safetensors(&f, DType::F32, &Device::Cpu));
    assert!(matches!(r, Err(Error::InvalidCheckpoint { .. })), "{r:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn components_loaded_on_demand_are_checked_at_load() {
    // A component that is only read when used must still fail at load, naming the tensor that
    // does not fit its config, not at the first generation.
    let base = common::base_dir();
    for (component, key, value) in [
        ("text_encoder", "intermediate_size", 40),
        ("unet", "out_channels", 8),
        ("vae", "latent_channels", 8),
    ] {
        let dir = scratch(&format!("on-demand-{component}"));
        copy_dir(&base, &dir);
        let path = dir.join(component).join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg[key] = value.into();
        std::fs::write(&path, cfg.to_string()).unwrap();
        let r = SdxlModel::load(&dir, &LoadOptions::default().low_memory());
        match r {
            Err(Error::ShapeMismatch { key, .. }) => println!("{component}: {key}"),
            other => panic!("{component}: expected ShapeMismatch at load, got {other:?}"),
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn components_load_alone_in_any_dtype() {
    let base = common::base_dir();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let vae = AutoencoderKL::load(&base.join("vae"), dtype, &Device::Cpu, None).unwrap();
        assert_eq!(vae.dtype(), dtype);
        let model = SdxlModel::load(
            &base,
            &LoadOptions {
                dtype,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        assert_eq!(model.unet().unwrap().dtype(), dtype);
        // The SDXL VAE overflows in f16: with force_upcast it stays in f32.
        let expected_vae = if dtype == DType::F16 && vae.force_upcast() {
            DType::F32
        } else {
            dtype
        };
        assert_eq!(model.vae().unwrap().dtype(), expected_vae, "{dtype:?}");
    }
}

/// Linear weights packed for the native bf16 GEMM straight from the memory-mapped files (through
/// the reused conversion buffer) hold exactly the checkpoint's values rounded to bf16, whatever
/// float type the file stores, and equal those packed from an in-memory source (the default
/// `TensorSource::load_packed`). On a CPU without AVX512-BF16 nothing is packed.
#[test]
fn packed_weights_hold_the_checkpoints_values() {
    use sdxl_core::kernels::matmul::PackedWeight;
    use sdxl_core::loading::Weights;
    use std::sync::Arc;

    let cpu = &Device::Cpu;
    let packs = PackedWeight::applies(DType::BF16, cpu);
    let weights = unet_weights(&common::base_dir().join("unet"));
    let mut linear: Vec<(String, Tensor)> = weights
        .into_iter()
        .filter(|(k, t)| k.ends_with(".weight") && t.rank() == 2)
        .collect();
    linear.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(linear.len() > 20, "{} 2-D weights", linear.len());
    let dir = scratch("packed");
    for stored in [DType::F32, DType::F16, DType::BF16] {
        let map: HashMap<String, Tensor> = linear
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(stored).unwrap()))
            .collect();
        let file = dir.join(format!("{stored:?}.safetensors"));
        candle_core::safetensors::save(&map, &file).unwrap();
        let mapped = Weights::from_safetensors(&[file], DType::BF16, cpu).unwrap();
        let in_memory = Weights::new(Arc::new(map.clone()), DType::BF16, cpu);
        let mut worst = 0f32;
        for (key, t) in &linear {
            let (out_dim, in_dim) = t.dims2().unwrap();
            let as_f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let expected = as_f32(&map[key].to_dtype(DType::BF16).unwrap());
            for w in [&mapped, &in_memory] {
                let packed = w.get_packed((out_dim, in_dim), key).unwrap();
                let Some(packed) = packed else {
                    assert!(!packs, "{key}: not packed on a CPU that packs");
                    continue;
                };
                assert!(packs, "{key}: packed on a CPU without AVX512-BF16");
                assert_eq!(packed.dims(), (out_dim, in_dim), "{key}");
                let diff = common::max_abs_diff(&as_f32(&packed.weight().unwrap()), &expected);
                worst = worst.max(diff);
            }
        }
        println!("stored {stored:?}: worst |packed - checkpoint as bf16| = {worst}");
        assert_eq!(worst, 0.0, "stored {stored:?}");
        // The stored shape is checked before anything is read.
        let (key, t) = linear
            .iter()
            .find(|(_, t)| {
                let (o, i) = t.dims2().unwrap();
                o != i
            })
            .unwrap();
        let (out_dim, in_dim) = t.dims2().unwrap();
        let r = mapped.get_packed((in_dim, out_dim), key);
        match (packs, r) {
            (true, Err(Error::ShapeMismatch { key: k, .. })) => assert_eq!(&k, key),
            (false, Ok(None)) => {}
            (_, other) => panic!("{key} read with its dims swapped: {other:?}"),
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
