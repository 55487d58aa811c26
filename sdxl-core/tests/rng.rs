//! `TorchRng` against torch's CPU `randn` (goldens/rng.safetensors), bit for bit.
//!
//! Cases come from `manifest.json → rng` (seeds, shapes) and the file's `index.json` entries:
//! `seed{S}.{shape}` is a full draw, `seed{S}.{shape}.{first|last}{N}` / `.sum` / `.sum_f64_bits`
//! summarise a large draw, and `seed{S}.sequential_…` stacks consecutive draws from one
//! generator (the entry's first dimension counts the draws).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sdxl_core::rng::TorchRng;
use sdxl_core::schedulers::NoiseSource;
use serde_json::Value;

const FILE: &str = "goldens/rng.safetensors";

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|d| d.as_u64().expect("a non-negative integer") as usize)
        .collect()
}

fn shape_tag(shape: &[usize]) -> String {
    shape
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("x")
}

/// Counts values whose bits differ and the largest distance in units in the last place.
fn bit_diff(ours: &[f32], golden: &[f32]) -> (usize, u32) {
    assert_eq!(ours.len(), golden.len());
    ours.iter()
        .zip(golden)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .fold((0, 0), |(n, worst), (a, b)| {
            (n + 1, worst.max(a.to_bits().abs_diff(b.to_bits())))
        })
}

struct Checker {
    parity: common::Parity,
    bit_failures: Vec<String>,
}

impl Checker {
    /// Bit-exact comparison, also reported through `Parity` with a zero tolerance.
    fn check(&mut self, name: &str, ours: &[f32], golden: &Tensor) {
        let g: Vec<f32> = golden.flatten_all().unwrap().to_vec1().unwrap();
        let ours_t = Tensor::from_vec(ours.to_vec(), golden.dims(), &Device::Cpu).unwrap();
        self.parity.check(name, &ours_t, golden);
        let (n, ulps) = bit_diff(ours, &g);
        if n > 0 {
            println!(
                "     {name}: {n} of {} values differ in their bits (max {ulps} ulp)",
                g.len()
            );
            self.bit_failures
                .push(format!("{name}: {n} values differ, max {ulps} ulp"));
        }
    }
}

#[test]
fn randn_matches_torch_cpu_bit_for_bit() {
    let manifest = common::manifest();
    let rng = &manifest["rng"];
    let seeds: Vec<u64> = rng["seeds"]
        .as_array()
        .expect("manifest rng.seeds")
        .iter()
        .map(|s| s.as_u64().expect("a u64 seed"))
        .collect();
    let shapes: Vec<Vec<usize>> = rng["shapes"]
        .as_array()
        .expect("manifest rng.shapes")
        .iter()
        .map(usizes)
        .collect();
    println!("cpu capability of the goldens: {}", rng["cpu_capability"]);
    let goldens = common::goldens(FILE);
    let entries = common::index_entries(FILE);
    assert!(!entries.is_empty(), "no index entries for {FILE}");

    // One fresh draw per (seed, shape), shared by the entries that summarise it.
    let mut draws: HashMap<(u64, String), Vec<f32>> = HashMap::new();
    let mut checker = Checker {
        parity: common::Parity::with_tolerance(0.0),
        bit_failures: Vec::new(),
    };
    let mut covered: Vec<(u64, String)> = Vec::new();
    for entry in &entries {
        let name = entry["name"].as_str().expect("entry name");
        let golden = common::golden(&goldens, name);
        let (seed_part, rest) = name.split_once('.').expect("seed{S}.{case}");
        let seed: u64 = seed_part
            .strip_prefix("seed")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no seed"));
        assert!(seeds.contains(&seed), "{name}: seed {seed} not in manifest");

        if rest.starts_with("sequential_") {
            // Consecutive draws of shape dims[1..] from one generator, stacked.
            let dims = usizes(&entry["shape"]);
            let (count, each) = dims.split_first().expect("stacked shape");
            let mut g = TorchRng::new(seed);
            let mut ours = Vec::new();
            for _ in 0..*count {
                let t = NoiseSource::randn(&mut g, each, DType::F32, &Device::Cpu).unwrap();
                ours.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            checker.check(name, &ours, golden);
            continue;
        }

        let (tag, summary) = match rest.split_once('.') {
            Some((tag, summary)) => (tag, Some(summary)),
            None => (rest, None),
        };
        let shape = shapes
            .iter()
            .find(|s| shape_tag(s) == tag)
            .unwrap_or_else(|| panic!("{name}: shape {tag} not in manifest"));
        covered.push((seed, tag.to_string()));
        let full = draws
            .entry((seed, tag.to_string()))
            .or_insert_with(|| {
                let t = TorchRng::new(seed)
                    .randn(shape, DType::F32, &Device::Cpu)
                    .unwrap();
                assert_eq!(t.dims(), shape.as_slice());
                t.flatten_all().unwrap().to_vec1().unwrap()
            })
            .clone();
        let n = golden.elem_count();
        match summary {
            None => checker.check(name, &full, golden),
            Some("sum") => {
                let sum = full.iter().map(|&v| v as f64).sum::<f64>() as f32;
                checker.check(name, &[sum], golden);
            }
            Some("sum_f64_bits") => {
                let sum: f64 = full.iter().map(|&v| v as f64).sum();
                let bits = sum.to_bits() as i64;
                checker
                    .parity
                    .check_exact(name, &[bits], &common::flat_i64(golden));
            }
            Some(s) if s.starts_with("first") => checker.check(name, &full[..n], golden),
            Some(s) if s.starts_with("last") => {
                checker.check(name, &full[full.len() - n..], golden)
            }
            Some(other) => panic!("{name}: unknown summary `{other}`"),
        }
    }

    // Every (seed, shape) of the manifest must have been compared.
    for seed in &seeds {
        for shape in &shapes {
            let key = (*seed, shape_tag(shape));
            assert!(
                covered.contains(&key),
                "no golden for seed {seed}, shape {shape:?}"
            );
        }
    }
    let Checker {
        parity,
        bit_failures,
    } = checker;
    assert!(
        bit_failures.is_empty(),
        "values differ from torch in their bits:\n{}",
        bit_failures.join("\n")
    );
    parity.finish();
}
