//! Shared helpers for the parity tests: finding the fixtures, discovering cases from
//! `index.json`/`manifest.json`, loading golden tensors and comparing with a stated tolerance.
//!
//! Replaying recorded diffusers calls: [`replay`] (pipeline kwargs, step recorder, image
//! check), [`noise`] (recorded noise draws) and [`schedulers`] (scheduler cases, fake model).
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod noise;
pub mod replay;
pub mod schedulers;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdxl_core::pipeline::{LoadOptions, Residency, SdxlModel};
use serde_json::Value;

/// The fixture root: `$SDXL_FIXTURES`, or `../shared/reference/fixtures` relative to the
/// repository root.
pub fn fixtures_root() -> PathBuf {
    match std::env::var_os("SDXL_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("..")
            .join("shared/reference/fixtures"),
    }
}

fn read_json(name: &str) -> Value {
    let path = fixtures_root().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&without_non_finite(&text))
        .unwrap_or_else(|e| panic!("bad JSON {}: {e}", path.display()))
}

/// Python's json writes the non-JSON tokens `-Infinity`, `Infinity` and `NaN` (e.g.
/// `lambda_min_clipped`); outside strings they are read as `null`.
fn without_non_finite(text: &str) -> String {
    let mut clean = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(token) = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t))
            {
                clean.push_str("null");
                rest = &rest[token.len()..];
                continue;
            }
        }
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => in_string = !in_string,
            _ => {}
        }
        clean.push(c);
        rest = &rest[c.len_utf8()..];
    }
    clean
}

/// `index.json`: every golden tensor with its file, name, shape, dtype and producing call.
pub fn index() -> Value {
    read_json("index.json")
}

/// `manifest.json`: configs, cases and settings of the fixture variant.
pub fn manifest() -> Value {
    read_json("manifest.json")
}

/// `tokens.json`: golden token ids.
pub fn tokens() -> Value {
    read_json("tokens.json")
}

/// The base model folder (`model_index.json` with `StableDiffusionXLPipeline`).
pub fn base_dir() -> PathBuf {
    model_dir("StableDiffusionXLPipeline")
}

/// The refiner model folder (`model_index.json` with `requires_aesthetics_score: true`).
pub fn refiner_dir() -> PathBuf {
    model_dir("StableDiffusionXLImg2ImgPipeline")
}

/// Loads a fixture model folder with `options`, panicking with the folder and the error.
pub fn load_model(dir: &Path, options: &LoadOptions) -> SdxlModel {
    SdxlModel::load(dir, options).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The base fixture model with the default options (f32 on the CPU).
pub fn base_model() -> SdxlModel {
    load_model(&base_dir(), &LoadOptions::default())
}

/// The refiner fixture model with the default options (f32 on the CPU).
pub fn refiner_model() -> SdxlModel {
    load_model(&refiner_dir(), &LoadOptions::default())
}

/// Load options worth telling apart for results that must not depend on where components live:
/// all resident (the default), all on demand, and each component alone on demand.
pub fn residencies() -> Vec<(&'static str, LoadOptions)> {
    let on_demand = Residency::OnDemand;
    let d = LoadOptions::default;
    vec![
        ("resident", d()),
        ("low_memory", d().low_memory()),
        (
            "text encoders on demand",
            LoadOptions {
                text_encoders: on_demand,
                ..d()
            },
        ),
        (
            "UNet on demand",
            LoadOptions {
                unet: on_demand,
                ..d()
            },
        ),
        (
            "VAE on demand",
            LoadOptions {
                vae: on_demand,
                ..d()
            },
        ),
    ]
}

fn model_dir(class: &str) -> PathBuf {
    let root = fixtures_root();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("model_index.json").is_file())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .find(|d| {
            let text = std::fs::read_to_string(d.join("model_index.json")).unwrap_or_default();
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            v["_class_name"] == class
        })
        .unwrap_or_else(|| panic!("no {class} folder under {}", root.display()))
}

/// Every golden tensor of a file (relative to the fixture root, e.g. `goldens/vae.safetensors`),
/// as f32 (or the stored integer dtype) on the CPU.
pub fn goldens(file: &str) -> HashMap<String, Tensor> {
    let path = fixtures_root().join(file);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

/// The `index.json` entries (`{file, name, shape, dtype, desc, call}`) of one golden file.
pub fn index_entries(file: &str) -> Vec<Value> {
    index()["tensors"]
        .as_array()
        .expect("index.json has `tensors`")
        .iter()
        .filter(|t| t["file"] == file)
        .cloned()
        .collect()
}

/// Fetches a golden tensor by name, with a clear panic when it is absent.
pub fn golden<'a>(map: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    map.get(name)
        .unwrap_or_else(|| panic!("golden tensor `{name}` not found"))
}

/// Accumulates comparisons against goldens and reports all of them at once.
///
/// Tolerance (the project rule): max |ours - golden| <= `rel` * max(1, max |golden|), with
/// `rel` = 1e-4 for f32 parity.
pub struct Parity {
    rel: f64,
    failures: Vec<String>,
    checked: usize,
}

impl Parity {
    /// A checker with the f32 parity tolerance 1e-4.
    pub fn new() -> Self {
        Self::with_tolerance(1e-4)
    }

    /// A checker with another relative tolerance.
    pub fn with_tolerance(rel: f64) -> Self {
        Self {
            rel,
            failures: Vec::new(),
            checked: 0,
        }
    }

    /// Compares `ours` with `golden` and prints the worst absolute and relative error.
    pub fn check(&mut self, name: &str, ours: &Tensor, golden: &Tensor) {
        self.checked += 1;
        if ours.dims() != golden.dims() {
            self.failures.push(format!(
                "{name}: shape {:?} != golden {:?}",
                ours.dims(),
                golden.dims()
            ));
            println!(
                "FAIL {name}: shape {:?} != golden {:?}",
                ours.dims(),
                golden.dims()
            );
            return;
        }
        let o = flat_f64(ours);
        let g = flat_f64(golden);
        let max_g = g.iter().fold(0f64, |m, v| m.max(v.abs()));
        let mut worst_abs = 0f64;
        let mut worst_rel = 0f64;
        let mut non_finite = false;
        for (a, b) in o.iter().zip(g.iter()) {
            if !a.is_finite() {
                non_finite = true;
            }
            let d = (a - b).abs();
            worst_abs = worst_abs.max(d);
            worst_rel = worst_rel.max(d / b.abs().max(1e-6));
        }
        let tol = self.rel * max_g.max(1.0);
        let ok = !non_finite && worst_abs <= tol;
        println!(
            "{} {name}: worst abs {worst_abs:.3e}, worst rel {worst_rel:.3e}, tol {tol:.3e}, max|golden| {max_g:.3e}",
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            self.failures.push(format!(
                "{name}: worst abs {worst_abs:.3e} > tol {tol:.3e}{}",
                if non_finite {
                    " (non-finite values)"
                } else {
                    ""
                }
            ));
        }
    }

    /// Requires equality of integer tensors (token ids, timesteps).
    pub fn check_exact(&mut self, name: &str, ours: &[i64], golden: &[i64]) {
        self.checked += 1;
        if ours != golden {
            println!("FAIL {name}: {ours:?} != {golden:?}");
            self.failures
                .push(format!("{name}: {ours:?} != golden {golden:?}"));
        } else {
            println!("ok   {name}: exact");
        }
    }

    /// Panics listing every failure; also fails when nothing was checked.
    pub fn finish(self) {
        assert!(
            self.checked > 0,
            "no golden was compared: case discovery found nothing"
        );
        assert!(
            self.failures.is_empty(),
            "{} of {} comparisons failed:\n{}",
            self.failures.len(),
            self.checked,
            self.failures.join("\n")
        );
        println!("{} comparisons passed", self.checked);
    }
}

/// A tensor's values as f64, flattened.
pub fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor converts to f64")
}

/// Exact equality of two tensors: same shape, dtype and values.
pub fn assert_identical(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtype");
    assert!(flat_f64(a) == flat_f64(b), "{what}: values differ");
    println!("ok   {what}: identical");
}

/// max |a - b| over all values (f32 tensors of one shape).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("f32 tensors of one shape")
}

/// A tensor's values as i64, flattened.
pub fn flat_i64(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<i64>())
        .expect("tensor converts to i64")
}
