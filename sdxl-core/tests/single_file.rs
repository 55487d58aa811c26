//! Single-file checkpoints in the original SDXL ("SGM") layout: the fixtures'
//! `*.sgm.safetensors` (the tiny base and refiner converted by `to_sgm.py`) must load through the
//! public API and give the same goldens as the diffusers folders: the inferred architecture,
//! every tensor, the shipped tokenizers, `encode_prompt`, the UNet, the VAE and text-to-image,
//! with components resident or read on demand. Malformed files, pickles and other checkpoints
//! must fail with typed errors.
//!
//! The files are discovered by listing the fixture root for `*.sgm.safetensors`; each file's
//! kind is the one inferred from its tensors (cross-checked with the `sdxl_kind` metadata
//! `to_sgm.py` writes). Head counts and group-norm groups are not stored in single files: the
//! parity tests take them from the folder configs ([`SingleFileHints`]), and
//! `single_files_infer_the_folder_architecture` prints whether the default rules agree.
//! Tolerance: the project's f32 rule (`common::Parity`); weights are compared exactly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::replay::{diffusers_prompts, embeds_by_name, encode_prompt_cases, t2i_case_params};
use common::{golden, goldens, manifest, Parity};
use sdxl_core::loading::single_file::{
    defaults, SingleFile, SingleFileArchitecture, SingleFileHints, TEXT_ENCODER, TEXT_ENCODER_2,
    UNET, VAE,
};
use sdxl_core::loading::{component_weight_files, read_json, SafetensorsFiles, TensorSource};
use sdxl_core::pipeline::{
    decode_latents, encode_prompt, text_to_image, LoadOptions, ModelKind, RunControl, SdxlModel,
};
use sdxl_core::text::clip::ClipTextConfig;
use sdxl_core::unet::{UNet2DConditionModel, UNetConditioning, UNetConfig};
use sdxl_core::vae::VaeConfig;
use sdxl_core::Error;
use serde_json::Value;

/// One `*.sgm.safetensors` of the fixture root with the diffusers folder it was made from.
struct Fixture {
    path: PathBuf,
    kind: ModelKind,
    folder: PathBuf,
}

impl Fixture {
    fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The folder's values for what single files do not store.
    fn hints(&self) -> SingleFileHints {
        let unet = UNetConfig::load(&self.folder.join("unet")).unwrap();
        let vae: VaeConfig = read_json(&self.folder.join("vae/config.json"), "VAE").unwrap();
        let heads = |name: &str| {
            let path = self.folder.join(name).join("config.json");
            path.is_file().then(|| {
                read_json::<ClipTextConfig>(&path, "CLIP config")
                    .unwrap()
                    .num_attention_heads
            })
        };
        SingleFileHints {
            unet_attention_heads: Some(
                unet.attention_head_dim
                    .expand(unet.block_out_channels.len(), "attention_head_dim")
                    .unwrap(),
            ),
            unet_norm_num_groups: unet.norm_num_groups,
            vae_norm_num_groups: Some(vae.norm_num_groups),
            text_encoder_heads: heads("text_encoder"),
            text_encoder_2_heads: heads("text_encoder_2"),
        }
    }

    fn open(&self) -> SingleFile {
        SingleFile::open(&self.path, &self.hints())
            .unwrap_or_else(|e| panic!("{}: {e}", self.path.display()))
    }

    fn load(&self, options: &LoadOptions) -> SdxlModel {
        SdxlModel::load_single_file(&self.path, options, &self.hints())
            .unwrap_or_else(|e| panic!("{}: {e}", self.path.display()))
    }
}

/// The `__metadata__` of a safetensors file's header.
fn metadata(path: &Path) -> Value {
    let (header, _) = read_header(&std::fs::read(path).unwrap());
    header["__metadata__"].clone()
}

/// `(header JSON, data bytes)` of a safetensors file.
fn read_header(bytes: &[u8]) -> (Value, Vec<u8>) {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    (header, bytes[8 + len..].to_vec())
}

/// A safetensors file from a header and data bytes, as given (not validated).
fn write_raw(path: &Path, header: &Value, data: &[u8]) {
    let json = serde_json::to_vec(header).unwrap();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json);
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

/// Every single file of the fixture root, with its inferred kind and its folder.
fn fixtures() -> Vec<Fixture> {
    let root = common::fixtures_root();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".sgm.safetensors"))
        .collect();
    paths.sort();
    assert!(
        !paths.is_empty(),
        "no *.sgm.safetensors under {}",
        root.display()
    );
    let found: Vec<Fixture> = paths
        .into_iter()
        .map(|path| {
            let keys = SafetensorsFiles::open(std::slice::from_ref(&path))
                .unwrap()
                .keys();
            let (kind, _) =
                sdxl_core::loading::single_file::detect::layout_counts(&keys, &path).unwrap();
            if let Some(recorded) = metadata(&path)["sdxl_kind"].as_str() {
                assert_eq!(
                    format!("{kind:?}").to_lowercase(),
                    recorded,
                    "{}",
                    path.display()
                );
            }
            let folder = match kind {
                ModelKind::Base => common::base_dir(),
                ModelKind::Refiner => common::refiner_dir(),
            };
            Fixture { path, kind, folder }
        })
        .collect();
    for kind in [ModelKind::Base, ModelKind::Refiner] {
        assert!(
            found.iter().any(|f| f.kind == kind),
            "no {kind:?} single file"
        );
    }
    found
}

fn fixture(kind: ModelKind) -> Fixture {
    fixtures()
        .into_iter()
        .find(|f| f.kind == kind)
        .expect("a single file of this kind")
}

/// A fresh temporary folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdxl-single-file-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn clip_sizes(c: &ClipTextConfig) -> Vec<(&'static str, String)> {
    vec![
        ("vocab_size", c.vocab_size.to_string()),
        ("hidden_size", c.hidden_size.to_string()),
        ("intermediate_size", c.intermediate_size.to_string()),
        ("num_hidden_layers", c.num_hidden_layers.to_string()),
        ("num_attention_heads", c.num_attention_heads.to_string()),
        (
            "max_position_embeddings",
            c.max_position_embeddings.to_string(),
        ),
        ("hidden_act", c.hidden_act.clone()),
        ("layer_norm_eps", c.layer_norm_eps.to_string()),
        ("eos_token_id", c.eos_token_id.to_string()),
    ]
}

/// Asserts that `arch` describes the same networks as the folder's configs.
fn assert_same_architecture(arch: &SingleFileArchitecture, folder: &Path, label: &str) {
    let unet = UNetConfig::load(&folder.join("unet")).unwrap();
    let ours = &arch.unet;
    assert_eq!(
        ours.layout().unwrap(),
        unet.layout().unwrap(),
        "{label} UNet layout"
    );
    let summary = |c: &UNetConfig| {
        (
            c.in_channels,
            c.out_channels,
            c.down_block_types.clone(),
            c.up_block_types.clone(),
            c.block_out_channels.clone(),
            c.layers_per_block
                .expand(c.block_out_channels.len(), "l")
                .unwrap(),
            c.text_time_dims().unwrap(),
            c.groups().unwrap(),
            c.time_embed_dim(),
            (c.use_linear_projection, c.flip_sin_to_cos),
            (c.freq_shift, c.norm_eps),
            (c.conv_in_kernel, c.conv_out_kernel),
        )
    };
    assert_eq!(summary(ours), summary(&unet), "{label} UNet config");

    let mut vae: VaeConfig = read_json(&folder.join("vae/config.json"), "VAE").unwrap();
    vae.sample_size = arch.vae.sample_size.clone(); // informational only
    assert_eq!(arch.vae, vae, "{label} VAE config");

    for (name, ours) in [
        ("text_encoder", arch.text_encoder.as_ref()),
        ("text_encoder_2", Some(&arch.text_encoder_2)),
    ] {
        let path = folder.join(name).join("config.json");
        let theirs = path
            .is_file()
            .then(|| read_json::<ClipTextConfig>(&path, "CLIP").unwrap());
        assert_eq!(
            ours.map(clip_sizes),
            theirs.as_ref().map(clip_sizes),
            "{label} {name}"
        );
        if let (Some(o), Some(t)) = (ours, &theirs) {
            if t.declares_projection() == Some(true) {
                assert_eq!(o.projection_dim, t.projection_dim, "{label} {name}");
            }
        }
    }
}

#[test]
fn single_files_infer_the_folder_architecture() {
    for f in fixtures() {
        let file = f.open();
        assert_eq!(file.kind(), f.kind);
        assert!(
            file.source().unmapped_keys().is_empty(),
            "{}: stored keys with no diffusers name: {:?}",
            f.name(),
            file.source().unmapped_keys()
        );
        assert_same_architecture(file.architecture(), &f.folder, &f.name());
        // What the documented rules alone give for this file (they are the real SDXL values for
        // real checkpoints; a test model may need hints).
        let by_rule = SingleFile::open(&f.path, &SingleFileHints::default())
            .map(|d| d.architecture() == file.architecture());
        println!(
            "{}: {:?}, UNet {:?} channels, {} input channels; default rules reproduce the folder: {by_rule:?}",
            f.name(),
            f.kind,
            file.architecture().unet.block_out_channels,
            file.architecture().unet.in_channels
        );
    }
}

#[test]
fn single_file_tensors_equal_the_folder_tensors() {
    // Exact: the adapter only renames, splits, transposes and reshapes.
    for f in fixtures() {
        let file = f.open();
        let source = file.source();
        for component in [UNET, VAE, TEXT_ENCODER, TEXT_ENCODER_2] {
            let dir = f.folder.join(component);
            let prefix = format!("{component}.");
            let ours: BTreeSet<String> = source
                .keys()
                .into_iter()
                .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
                .collect();
            if !dir.is_dir() {
                assert!(ours.is_empty(), "{}: unexpected {component}", f.name());
                continue;
            }
            let stem = if component.starts_with("text") {
                "model"
            } else {
                "diffusion_pytorch_model"
            };
            let folder =
                SafetensorsFiles::open(&component_weight_files(&dir, stem, None).unwrap()).unwrap();
            let theirs: BTreeSet<String> = folder.keys().into_iter().collect();
            assert_eq!(ours, theirs, "{} {component}: key sets", f.name());
            let mut worst = (0f64, String::new());
            for key in &theirs {
                let a = source
                    .load(&format!("{prefix}{key}"), &Device::Cpu)
                    .unwrap();
                let b = folder.load(key, &Device::Cpu).unwrap();
                assert_eq!(a.dims(), b.dims(), "{key}");
                let d = common::flat_f64(&a)
                    .iter()
                    .zip(common::flat_f64(&b))
                    .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                if d >= worst.0 {
                    worst = (d, key.clone());
                }
            }
            println!(
                "{} {component}: {} tensors, worst |diff| {:.1e} ({})",
                f.name(),
                theirs.len(),
                worst.0,
                worst.1
            );
            assert_eq!(worst.0, 0.0, "{} {component}: {}", f.name(), worst.1);
        }
    }
}

#[test]
fn shipped_tokenizers_match_transformers() {
    let tokens = common::tokens();
    let mut p = Parity::new();
    let names: Vec<String> = tokens["pad_id"]
        .as_object()
        .expect("per-tokenizer pad ids")
        .keys()
        .cloned()
        .collect();
    for name in names {
        let tok = match name.as_str() {
            "tokenizer" => defaults::tokenizer().unwrap(),
            "tokenizer_2" => defaults::tokenizer_2().unwrap(),
            other => panic!("tokens.json names an unknown tokenizer `{other}`"),
        };
        p.check_exact(
            &format!("{name} pad id"),
            &[i64::from(tok.pad_id())],
            &[tokens["pad_id"][&name].as_i64().unwrap()],
        );
        for case in tokens["cases"].as_array().expect("cases") {
            let text = case["prompt"].as_str().expect("prompt");
            let golden: Vec<i64> = case[&name]["input_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let ours: Vec<i64> = tok
                .encode(text)
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect();
            p.check_exact(
                &format!("{name}/{} input_ids", case["name"].as_str().unwrap_or("?")),
                &ours,
                &golden,
            );
        }
    }
    p.finish();
}

#[test]
fn encode_prompt_matches_diffusers() {
    let g = goldens("goldens/encode_prompt.safetensors");
    let options = LoadOptions::default();
    let models: Vec<(ModelKind, SdxlModel)> = fixtures()
        .iter()
        .map(|f| (f.kind, f.load(&options)))
        .collect();
    let mut p = Parity::new();
    for case in encode_prompt_cases() {
        let (_, model) = models.iter().find(|(k, _)| *k == case.kind).expect("model");
        let e = encode_prompt(model, &diffusers_prompts(&case.kwargs)).expect("encode_prompt");
        for (key, t) in embeds_by_name(&e) {
            let gname = format!("{}.{key}", case.name);
            p.check(&format!("single file {gname}"), t, golden(&g, &gname));
        }
    }
    p.finish();
}

/// The UNet golden file of a model kind.
fn unet_goldens(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::Base => "goldens/unet_base.safetensors",
        ModelKind::Refiner => "goldens/unet_refiner.safetensors",
    }
}

/// Runs every `<case>.out` of the kind's UNet goldens.
fn check_unet(unet: &UNet2DConditionModel, kind: ModelKind, label: &str, p: &mut Parity) {
    let file = unet_goldens(kind);
    let g = goldens(file);
    let cond = UNetConditioning {
        encoder_hidden_states: golden(&g, "encoder_hidden_states")
            .to_dtype(unet.dtype())
            .unwrap(),
        text_embeds: golden(&g, "text_embeds").to_dtype(unet.dtype()).unwrap(),
        time_ids: golden(&g, "time_ids").to_dtype(unet.dtype()).unwrap(),
    };
    let cases: Vec<String> = common::index_entries(file)
        .iter()
        .filter_map(|e| e["name"].as_str()?.strip_suffix(".out").map(str::to_string))
        .collect();
    assert!(!cases.is_empty(), "no `<case>.out` in {file}");
    for case in cases {
        let sample = golden(&g, &format!("{case}.sample"))
            .to_dtype(unet.dtype())
            .unwrap();
        let t = common::flat_f64(golden(&g, &format!("{case}.timestep")))[0];
        let out = unet.forward(&sample, t, &cond).unwrap();
        p.check(
            &format!("{label} {file} {case}.out"),
            &out.to_dtype(DType::F32).unwrap(),
            golden(&g, &format!("{case}.out")),
        );
    }
}

#[test]
fn unet_matches_diffusers() {
    let mut p = Parity::new();
    for f in fixtures() {
        let model = f.load(&LoadOptions::default());
        check_unet(&model.unet().unwrap(), f.kind, &f.name(), &mut p);
    }
    p.finish();
}

#[test]
fn vae_matches_diffusers() {
    let file = "goldens/vae.safetensors";
    let g = goldens(file);
    let names: BTreeSet<String> = common::index_entries(file)
        .iter()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect();
    let case_of = |suffix: &str| -> Vec<String> {
        names
            .iter()
            .filter_map(|n| n.strip_suffix(suffix).map(str::to_string))
            .collect()
    };
    let mut p = Parity::new();
    for f in fixtures() {
        let model = f.load(&LoadOptions::default());
        let encode_cases = case_of(".x");
        let decode_cases = case_of(".z");
        assert!(!encode_cases.is_empty() && !decode_cases.is_empty());
        for case in encode_cases {
            let dist = model
                .vae()
                .unwrap()
                .encode(golden(&g, &format!("{case}.x")))
                .unwrap();
            for (what, t) in [("mean", &dist.mean), ("logvar", &dist.logvar)] {
                let name = format!("{case}.{what}");
                p.check(&format!("{} {name}", f.name()), t, golden(&g, &name));
            }
        }
        for case in decode_cases {
            let out = model
                .vae()
                .unwrap()
                .decode(golden(&g, &format!("{case}.z")))
                .unwrap();
            let name = format!("{case}.sample");
            p.check(&format!("{} {name}", f.name()), &out, golden(&g, &name));
        }
    }
    p.finish();
}

#[test]
fn text_to_image_matches_diffusers() {
    let g = goldens("goldens/pipeline_t2i.safetensors");
    let base = fixture(ModelKind::Base).load(&LoadOptions::default());
    let mut p = Parity::new();
    let cases = manifest()["t2i"].as_array().expect("t2i cases").clone();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["case"].as_str().expect("case name");
        let params = t2i_case_params(&case);
        let latents_in = golden(&g, &format!("{name}.latents_in"));
        let out = text_to_image(&base, &params, Some(latents_in), RunControl::none())
            .expect("text_to_image");
        p.check(
            &format!("single file {name}.latents_out"),
            &out,
            golden(&g, &format!("{name}.latents_out")),
        );
        let decoded = decode_latents(&base, &out).unwrap();
        p.check(
            &format!("single file {name}.vae_decode_out"),
            &decoded,
            golden(&g, &format!("{name}.vae_decode_out")),
        );
    }
    p.finish();
}

#[test]
fn single_files_load_on_demand_with_identical_results() {
    // Components of a single file read on demand compute exactly what resident ones compute.
    let g = goldens("goldens/pipeline_t2i.safetensors");
    let t2i = manifest()["t2i"].as_array().expect("t2i cases").clone();
    for f in fixtures() {
        let resident = f.load(&LoadOptions::default());
        for (residency, options) in common::residencies() {
            let model = f.load(&options);
            let label = format!("{} {residency}", f.name());
            for case in encode_prompt_cases().iter().filter(|c| c.kind == f.kind) {
                let prompts = diffusers_prompts(&case.kwargs);
                let ours = encode_prompt(&model, &prompts).unwrap();
                let expected = encode_prompt(&resident, &prompts).unwrap();
                for ((key, a), (_, b)) in embeds_by_name(&ours)
                    .into_iter()
                    .zip(embeds_by_name(&expected))
                {
                    common::assert_identical(&format!("{label}: {}.{key}", case.name), a, b);
                }
            }
            if f.kind != ModelKind::Base {
                continue;
            }
            for case in &t2i {
                let name = case["case"].as_str().expect("case name");
                let params = t2i_case_params(case);
                let latents_in = golden(&g, &format!("{name}.latents_in"));
                let run = |m: &SdxlModel| {
                    let out = text_to_image(m, &params, Some(latents_in), RunControl::none())
                        .expect("text_to_image");
                    decode_latents(m, &out).expect("decode")
                };
                common::assert_identical(
                    &format!("{label}: {name} decoded"),
                    &run(&model),
                    &run(&resident),
                );
            }
        }
    }
}

#[test]
fn half_precision_single_files_load() {
    // f16 files (as `sd_xl_base_1.0.safetensors` is): a copy of each fixture with every float
    // tensor in f16, loaded as f32 and as f16. Tolerance 1e-2 · max(1, max|golden|): the weights
    // are rounded to 11 significant bits.
    let dir = temp_dir("f16");
    let mut p = Parity::with_tolerance(1e-2);
    for f in fixtures() {
        let tensors = candle_core::safetensors::load(&f.path, &Device::Cpu).unwrap();
        let half: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, t)| {
                let t = if t.dtype().is_float() {
                    t.to_dtype(DType::F16).unwrap()
                } else {
                    t
                };
                (k, t)
            })
            .collect();
        let path = dir.join(f.name());
        candle_core::safetensors::save(&half, &path).unwrap();
        let copy = Fixture {
            path,
            kind: f.kind,
            folder: f.folder.clone(),
        };
        assert_eq!(copy.open().architecture(), f.open().architecture());
        for dtype in [DType::F32, DType::F16] {
            let options = LoadOptions {
                dtype,
                ..LoadOptions::default()
            };
            let model = copy.load(&options);
            assert_eq!(model.unet().unwrap().dtype(), dtype);
            assert_eq!(
                model.vae().unwrap().dtype(),
                DType::F32,
                "force_upcast keeps the VAE in f32"
            );
            check_unet(
                &model.unet().unwrap(),
                f.kind,
                &format!("f16 file as {dtype:?}"),
                &mut p,
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    p.finish();
}

/// The error of loading `path` through the public entry point.
fn load_error(path: &Path) -> Error {
    match SdxlModel::load(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => {
            println!(
                "{}: {e}",
                path.file_name().unwrap_or_default().to_string_lossy()
            );
            e
        }
    }
}

#[test]
fn pickles_are_refused_without_reading_them() {
    let dir = temp_dir("pickle");
    for name in ["model.ckpt", "model.pt", "model.pth", "pytorch_model.bin"] {
        let path = dir.join(name);
        std::fs::write(&path, b"not read").unwrap();
        let e = load_error(&path);
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("arbitrary code") && m.contains("safetensors")),
            "{e}"
        );
    }
    // A torch zip archive and a protocol-2 pickle stream named `.safetensors`.
    for (name, bytes) in [
        (
            "zip.safetensors",
            b"PK\x03\x04\x14\x00\x00\x00\x00\x00".as_slice(),
        ),
        (
            "pickle.safetensors",
            b"\x80\x02}q\x00(X\x05\x00\x00\x00".as_slice(),
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = load_error(&path);
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("pickle")),
            "{e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_files_are_invalid_checkpoints() {
    let dir = temp_dir("malformed");
    let source = fixture(ModelKind::Base).path;
    let bytes = std::fs::read(&source).unwrap();
    let (header, data) = read_header(&bytes);
    let last_tensor = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .map(|(k, _)| k.clone())
        .unwrap();

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let short_header = dir.join("short-header.safetensors");
    std::fs::write(&short_header, &bytes[..100]).unwrap();
    let huge_length = dir.join("huge-header-length.safetensors");
    let mut b = bytes.clone();
    b[..8].copy_from_slice(&(bytes.len() as u64 * 4).to_le_bytes());
    std::fs::write(&huge_length, b).unwrap();
    // Offsets past the end of the data.
    let past_end = dir.join("offsets-past-end.safetensors");
    let mut h = header.clone();
    let end = h[&last_tensor]["data_offsets"][1].as_u64().unwrap();
    h[&last_tensor]["data_offsets"][1] = (end + 4096).into();
    write_raw(&past_end, &h, &data);
    // A shape whose size disagrees with its byte range.
    let wrong_shape = dir.join("shape-lies.safetensors");
    let mut h = header.clone();
    let shape = h[&last_tensor]["shape"].as_array().unwrap().clone();
    let mut bigger: Vec<u64> = shape.iter().map(|d| d.as_u64().unwrap()).collect();
    bigger[0] += 1;
    h[&last_tensor]["shape"] = serde_json::json!(bigger);
    write_raw(&wrong_shape, &h, &data);

    for path in [
        &truncated,
        &short_header,
        &huge_length,
        &past_end,
        &wrong_shape,
    ] {
        let e = load_error(path);
        assert!(
            matches!(e, Error::InvalidCheckpoint { .. }),
            "{}: {e}",
            path.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inconsistent_tensors_are_typed_errors() {
    // Files that parse but whose tensors are missing, misshapen or not SDXL's.
    let dir = temp_dir("inconsistent");
    let f = fixture(ModelKind::Base);
    let tensors = candle_core::safetensors::load(&f.path, &Device::Cpu).unwrap();
    let write = |name: &str, edit: &dyn Fn(&mut HashMap<String, Tensor>)| {
        let mut t = tensors.clone();
        edit(&mut t);
        let path = dir.join(name);
        candle_core::safetensors::save(&t, &path).unwrap();
        path
    };
    let find = |pattern: &str| -> String {
        let mut keys: Vec<&String> = tensors.keys().filter(|k| k.ends_with(pattern)).collect();
        keys.sort();
        (*keys
            .first()
            .unwrap_or_else(|| panic!("no key ending {pattern}")))
        .clone()
    };
    let conv_out = find("diffusion_model.out.2.weight");
    let missing = write("missing.safetensors", &|t| {
        t.remove(&conv_out);
    });
    assert!(
        matches!(load_error(&missing), Error::MissingTensor { key } if key.contains("conv_out")),
    );
    // A tensor the inference reads, and one only the UNet constructor reads.
    for (pattern, expect_shape_mismatch) in [
        ("diffusion_model.input_blocks.0.0.weight", false),
        ("diffusion_model.input_blocks.1.0.in_layers.2.weight", true),
    ] {
        let key = find(pattern);
        let path = write("misshapen.safetensors", &|t| {
            let w = t[&key].flatten_all().unwrap();
            t.insert(key.clone(), w);
        });
        match load_error(&path) {
            Error::ShapeMismatch { key: k, .. } if expect_shape_mismatch => {
                assert!(k.starts_with("unet.down_blocks.0.resnets.0"), "{k}")
            }
            Error::InvalidCheckpoint { reason, .. } if !expect_shape_mismatch => {
                assert!(reason.contains("conv_in"), "{reason}")
            }
            other => panic!("{pattern}: {other}"),
        }
    }
    let in_proj = find("resblocks.0.attn.in_proj_weight");
    let fused = write("unsplittable.safetensors", &|t| {
        let w = t[&in_proj]
            .narrow(0, 1, t[&in_proj].dim(0).unwrap() - 1)
            .unwrap();
        t.insert(in_proj.clone(), w);
    });
    assert!(
        matches!(load_error(&fused), Error::InvalidCheckpoint { reason, .. } if reason.contains("in_proj"))
    );
    let other_layout = write("unet-only.safetensors", &|t| {
        t.retain(|k, _| k.starts_with("model.diffusion_model."));
    });
    assert!(matches!(load_error(&other_layout), Error::Unsupported(_)));
    // Other safetensors files of the fixtures are not SDXL checkpoints.
    let golden_file = common::fixtures_root().join("goldens/vae.safetensors");
    assert!(matches!(load_error(&golden_file), Error::Unsupported(_)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Full-size check: the real SDXL base converted to the single-file layout.
///
/// Make the file with `/work/venv/bin/python shared/reference/to_sgm.py
/// $SDXL_FULL/base-diffusers $SDXL_FULL/base.sgm.safetensors` (6.9 GB, f16) and run with
/// `SDXL_SGM_BASE=$SDXL_FULL/base.sgm.safetensors cargo test -p sdxl-core --test single_file
/// -- --ignored --nocapture` (~11 GB of RAM: the UNet in f32). The architecture is inferred with
/// the default rules (no hints): it must be the real SDXL base.
#[test]
#[ignore = "needs the full-size base converted to a single file, path in $SDXL_SGM_BASE"]
fn full_size_single_file_matches_diffusers() {
    let path = PathBuf::from(
        std::env::var_os("SDXL_SGM_BASE").expect("set SDXL_SGM_BASE to the base single file"),
    );
    let reference = common::fixtures_root().join("../fullsize");
    let g = candle_core::safetensors::load(reference.join("goldens.safetensors"), &Device::Cpu)
        .unwrap();
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(reference.join("manifest.json")).unwrap())
            .unwrap();
    let file = SingleFile::open(&path, &SingleFileHints::default()).unwrap();
    let arch = file.architecture();
    assert_eq!(arch.kind, ModelKind::Base);
    assert!(file.source().unmapped_keys().is_empty());
    println!(
        "inferred: UNet {:?}, heads {:?}, depths {:?}, context {:?}, time ids {:?}",
        arch.unet.block_out_channels,
        arch.unet.attention_head_dim,
        arch.unet.transformer_layers_per_block,
        arch.unet.cross_attention_dim,
        arch.unet.text_time_dims()
    );
    let w = file.weights(DType::F32, &Device::Cpu);
    let mut p = Parity::new();
    for (component, cfg, prefix) in [
        (TEXT_ENCODER, arch.text_encoder.clone().unwrap(), "te1"),
        (TEXT_ENCODER_2, arch.text_encoder_2.clone(), "te2"),
    ] {
        let enc = sdxl_core::text::clip::ClipTextModel::new(&w.pp(component), &cfg).unwrap();
        let out = enc
            .forward(golden(&g, &format!("{prefix}.input_ids")))
            .unwrap();
        p.check(
            &format!("{prefix}.penultimate"),
            &out.penultimate,
            golden(&g, &format!("{prefix}.penultimate")),
        );
        if let Some(te) = &out.text_embeds {
            p.check(
                &format!("{prefix}.text_embeds"),
                te,
                golden(&g, &format!("{prefix}.text_embeds")),
            );
        }
    }
    {
        let vae = sdxl_core::vae::AutoencoderKL::new(&w.pp(VAE), &arch.vae).unwrap();
        let dec = vae.decode(golden(&g, "vae_decode.latent")).unwrap();
        p.check("vae_decode.sample", &dec, golden(&g, "vae_decode.sample"));
    }
    let unet = UNet2DConditionModel::new(&w.pp(UNET), &arch.unet).unwrap();
    let case = m["goldens"]
        .as_array()
        .expect("goldens")
        .iter()
        .filter_map(|e| e["name"].as_str()?.strip_suffix(".encoder_hidden_states"))
        .find(|c| c.starts_with("unet_base"))
        .expect("a base UNet case with its own conditioning")
        .to_string();
    let get = |k: &str| golden(&g, &format!("{case}.{k}")).clone();
    let cond = UNetConditioning {
        encoder_hidden_states: get("encoder_hidden_states"),
        text_embeds: get("text_embeds"),
        time_ids: get("time_ids"),
    };
    let t = common::flat_f64(&get("timestep"))[0];
    let start = std::time::Instant::now();
    let out = unet.forward(&get("sample"), t, &cond).unwrap();
    println!("{case}: forward {:.1}s", start.elapsed().as_secs_f64());
    p.check(&format!("{case}.noise_pred"), &out, &get("noise_pred"));
    p.finish();
}
