//! Parity of `AutoencoderKL` with diffusers: encode (moments, mean, logvar, std, sample) and
//! decode (post_quant_conv, sample) on the cases of `goldens/vae.safetensors`, for the base's and
//! the refiner's VAE folders; input validation; legacy attention names; half precision.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{golden, Parity};
use sdxl_core::loading::{read_json, Weights};
use sdxl_core::vae::{AutoencoderKL, VaeConfig};
use sdxl_core::Error;

const FILE: &str = "goldens/vae.safetensors";

/// Half-precision tolerance, relative to max(1, max|golden|): float16 keeps 11 significant
/// bits and the decoder stacks a few dozen layers.
const F16_TOLERANCE: f64 = 2e-2;
/// bf16 against the f32 goldens, relative to max(1, max|golden|).
const BF16_TOLERANCE: f64 = 1e-1;

/// The VAE folders under test: the base's and the refiner's.
fn vae_dirs() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("base", common::base_dir().join("vae")),
        ("refiner", common::refiner_dir().join("vae")),
    ]
}

/// Every golden name of the VAE file.
fn golden_names() -> BTreeSet<String> {
    common::index_entries(FILE)
        .iter()
        .map(|e| {
            e["name"]
                .as_str()
                .expect("index entry has a name")
                .to_string()
        })
        .collect()
}

/// The case prefixes (`encode`, `decode0`, …) whose name starts with `kind`, found from the
/// index: the part of each golden name before its first dot.
fn cases(kind: &str) -> Vec<String> {
    let found: BTreeSet<String> = golden_names()
        .iter()
        .filter_map(|n| n.split_once('.').map(|(p, _)| p.to_string()))
        .filter(|p| p.starts_with(kind))
        .collect();
    assert!(!found.is_empty(), "no `{kind}*` case in {FILE}");
    found.into_iter().collect()
}

fn load(dir: &Path, dtype: DType) -> AutoencoderKL {
    AutoencoderKL::load(dir, dtype, &Device::Cpu, None)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", dir.display()))
}

/// Compares `ours` with golden `{case}.{what}` when the fixture has it.
fn check_if_present(
    parity: &mut Parity,
    names: &BTreeSet<String>,
    goldens: &HashMap<String, Tensor>,
    label: &str,
    name: &str,
    ours: &Tensor,
) {
    if names.contains(name) {
        let ours = ours.to_dtype(DType::F32).unwrap();
        parity.check(&format!("{label} {name}"), &ours, golden(goldens, name));
    }
}

fn run_encode(vae: &AutoencoderKL, label: &str, parity: &mut Parity) {
    let names = golden_names();
    let g = common::goldens(FILE);
    for case in cases("encode") {
        let x = golden(&g, &format!("{case}.x"))
            .to_dtype(vae.dtype())
            .unwrap();
        let moments = vae.encode_moments(&x).unwrap();
        check_if_present(
            parity,
            &names,
            &g,
            label,
            &format!("{case}.moments"),
            &moments,
        );
        let dist = vae.encode(&x).unwrap();
        check_if_present(
            parity,
            &names,
            &g,
            label,
            &format!("{case}.mean"),
            &dist.mean,
        );
        check_if_present(
            parity,
            &names,
            &g,
            label,
            &format!("{case}.logvar"),
            &dist.logvar,
        );
        check_if_present(
            parity,
            &names,
            &g,
            label,
            &format!("{case}.std"),
            &dist.std().unwrap(),
        );
        let noise_name = format!("{case}.sample_noise");
        if names.contains(&noise_name) {
            let sample = dist.sample(golden(&g, &noise_name)).unwrap();
            check_if_present(
                parity,
                &names,
                &g,
                label,
                &format!("{case}.sample"),
                &sample,
            );
        }
    }
}

fn run_decode(vae: &AutoencoderKL, label: &str, parity: &mut Parity) {
    let names = golden_names();
    let g = common::goldens(FILE);
    for case in cases("decode") {
        let z = golden(&g, &format!("{case}.z"))
            .to_dtype(vae.dtype())
            .unwrap();
        let post = vae.post_quant_conv(&z).unwrap();
        check_if_present(
            parity,
            &names,
            &g,
            label,
            &format!("{case}.post_quant_conv"),
            &post,
        );
        let sample = vae.decode(&z).unwrap();
        check_if_present(
            parity,
            &names,
            &g,
            label,
            &format!("{case}.sample"),
            &sample,
        );
    }
}

#[test]
fn encode_matches_diffusers() {
    let mut parity = Parity::new();
    for (label, dir) in vae_dirs() {
        run_encode(&load(&dir, DType::F32), label, &mut parity);
    }
    parity.finish();
}

#[test]
fn decode_matches_diffusers() {
    let mut parity = Parity::new();
    for (label, dir) in vae_dirs() {
        run_decode(&load(&dir, DType::F32), label, &mut parity);
    }
    parity.finish();
}

#[test]
fn float16_stays_close() {
    let mut parity = Parity::with_tolerance(F16_TOLERANCE);
    let (_, dir) = &vae_dirs()[0];
    let vae = load(dir, DType::F16);
    run_encode(&vae, "f16", &mut parity);
    run_decode(&vae, "f16", &mut parity);
    parity.finish();
}

#[test]
fn bfloat16_stays_close() {
    // bf16 (8-bit mantissa; the native bf16 convolution on AVX512-BF16 CPUs).
    let mut parity = Parity::with_tolerance(BF16_TOLERANCE);
    let (_, dir) = &vae_dirs()[0];
    let vae = load(dir, DType::BF16);
    run_encode(&vae, "bf16", &mut parity);
    run_decode(&vae, "bf16", &mut parity);
    parity.finish();
}

fn is_invalid<T>(r: sdxl_core::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidArgument(_)))
}

#[test]
fn invalid_inputs_are_rejected() {
    let (_, dir) = &vae_dirs()[0];
    let vae = load(dir, DType::F32);
    let g = common::goldens(FILE);
    let x = golden(&g, &format!("{}.x", cases("encode")[0])).clone();
    let (_, c, h, _) = x.dims4().unwrap();

    // One row short of a multiple of the downscale factor (e.g. 3x63x64).
    let short = x.narrow(2, 0, h - 1).unwrap();
    let err = vae.encode(&short).unwrap_err();
    println!("{:?} -> {err}", short.dims());
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(is_invalid(vae.encode(&x.narrow(1, 0, c - 1).unwrap())));
    assert!(is_invalid(vae.encode(&x.to_dtype(DType::F64).unwrap())));
    assert!(is_invalid(vae.encode(&x.flatten_all().unwrap())));

    let z = golden(&g, &format!("{}.z", cases("decode")[0])).clone();
    let zc = z.dim(1).unwrap();
    assert!(is_invalid(vae.decode(&z.narrow(1, 0, zc - 1).unwrap())));
    assert!(is_invalid(vae.decode(&z.to_dtype(DType::F64).unwrap())));
}

/// The checkpoint of the base VAE as an in-memory map, plus its config.
fn checkpoint() -> (HashMap<String, Tensor>, VaeConfig) {
    let dir = &vae_dirs()[0].1;
    let cfg: VaeConfig = read_json(&dir.join("config.json"), "VAE config").unwrap();
    let map = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (map, cfg)
}

fn from_map(map: HashMap<String, Tensor>, cfg: &VaeConfig) -> sdxl_core::Result<AutoencoderKL> {
    let w = Weights::new(Arc::new(map), DType::F32, &Device::Cpu);
    AutoencoderKL::new(&w, cfg)
}

#[test]
fn legacy_attention_names_and_conv_shapes_decode_the_same() {
    let (map, cfg) = checkpoint();
    let renames = [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ];
    let mut renamed = 0;
    let legacy: HashMap<String, Tensor> = map
        .into_iter()
        .map(
            |(key, t)| match renames.iter().find(|(new, _)| key.contains(new)) {
                Some((new, old)) => {
                    renamed += 1;
                    let t = if t.rank() == 2 {
                        let (o, i) = t.dims2().unwrap();
                        t.reshape((o, i, 1, 1)).unwrap()
                    } else {
                        t
                    };
                    (key.replace(new, old), t)
                }
                None => (key, t),
            },
        )
        .collect();
    assert!(
        renamed > 0,
        "the checkpoint has no attention projections to rename"
    );
    let vae = from_map(legacy, &cfg).unwrap();
    let mut parity = Parity::new();
    run_encode(&vae, "legacy", &mut parity);
    run_decode(&vae, "legacy", &mut parity);
    parity.finish();
}

#[test]
fn missing_or_misshapen_tensors_name_their_key() {
    let (map, cfg) = checkpoint();
    let mut keys: Vec<String> = map.keys().cloned().collect();
    keys.sort();
    for key in [keys.first().unwrap(), keys.last().unwrap()] {
        let mut missing = map.clone();
        missing.remove(key);
        match from_map(missing, &cfg) {
            Err(Error::MissingTensor { key: k }) => assert_eq!(&k, key),
            other => panic!("removing {key}: expected MissingTensor, got {other:?}"),
        }
        let mut misshapen = map.clone();
        let t = misshapen.remove(key).unwrap();
        misshapen.insert(
            key.clone(),
            t.flatten_all().unwrap().narrow(0, 0, 1).unwrap(),
        );
        match from_map(misshapen, &cfg) {
            Err(Error::ShapeMismatch { key: k, .. }) => assert_eq!(&k, key),
            other => panic!("reshaping {key}: expected ShapeMismatch, got {other:?}"),
        }
    }
}
