//! Parity of the alpha-based schedulers (DDIM, DDPM, DPM-Solver++, UniPC, LCM) with diffusers:
//! every `manifest.json → schedulers` case of those classes is rebuilt from the base model's
//! `scheduler_config.json` plus the case's overrides and replayed against
//! `goldens/schedulers.safetensors` (timesteps, sigmas, init_noise_sigma, scaled inputs, model
//! outputs of the fake model, prev_sample, pred_original_sample), with the recorded noise
//! draws injected in order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;

use candle_core::{DType, Device, IndexOp, Tensor};
use sdxl_core::schedulers::ddim::Ddim;
use sdxl_core::schedulers::ddpm::Ddpm;
use sdxl_core::schedulers::dpm_solver::DpmSolverMultistep;
use sdxl_core::schedulers::lcm::Lcm;
use sdxl_core::schedulers::unipc::UniPcMultistep;
use sdxl_core::schedulers::{NoiseSource, Scheduler, SchedulerConfig};
use sdxl_core::Error;
use serde_json::Value;

const GOLDENS: &str = "goldens/schedulers.safetensors";

/// The diffusers classes this test covers.
const CLASSES: [&str; 5] = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
];

/// A scheduler of `class` and its typed config as JSON (for the config check).
fn build(class: &str, cfg: &SchedulerConfig) -> (Box<dyn Scheduler>, Value) {
    fn pair<S: Scheduler + 'static, C: serde::Serialize>(
        s: S,
        c: &C,
    ) -> (Box<dyn Scheduler>, Value) {
        let v = serde_json::to_value(c).unwrap();
        (Box::new(s), v)
    }
    match class {
        "DDIMScheduler" => {
            let s = Ddim::from_config(cfg).unwrap();
            let c = s.config().clone();
            pair(s, &c)
        }
        "DDPMScheduler" => {
            let s = Ddpm::from_config(cfg).unwrap();
            let c = s.config().clone();
            pair(s, &c)
        }
        "DPMSolverMultistepScheduler" => {
            let s = DpmSolverMultistep::from_config(cfg).unwrap();
            let c = s.config().clone();
            pair(s, &c)
        }
        "UniPCMultistepScheduler" => {
            let s = UniPcMultistep::from_config(cfg).unwrap();
            let c = s.config().clone();
            pair(s, &c)
        }
        "LCMScheduler" => {
            let s = Lcm::from_config(cfg).unwrap();
            let c = s.config().clone();
            pair(s, &c)
        }
        other => panic!("not an alpha-based scheduler class: {other}"),
    }
}

/// The alpha-based cases of the manifest: `(name, entry)`, sorted by name.
fn cases(manifest: &Value) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = manifest["schedulers"]
        .as_object()
        .expect("manifest has `schedulers`")
        .iter()
        .filter(|(_, v)| v["class"].as_str().is_some_and(|c| CLASSES.contains(&c)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        !out.is_empty(),
        "no alpha-based scheduler case in manifest.json"
    );
    out
}

/// The base model's scheduler config plus the case's overrides.
fn case_config(entry: &Value) -> SchedulerConfig {
    let path = common::base_dir().join("scheduler/scheduler_config.json");
    let mut cfg = SchedulerConfig::from_file(&path).unwrap();
    if let Some(overrides) = entry["overrides"].as_object() {
        for (k, v) in overrides {
            cfg = cfg.with(k, v.clone());
        }
    }
    cfg
}

/// Replays recorded noise draws in order, noting the loop step of each draw.
struct Replay {
    draws: Vec<Tensor>,
    used: usize,
    step: i64,
    steps_drawn: Vec<i64>,
}

impl NoiseSource for Replay {
    fn randn(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> sdxl_core::Result<Tensor> {
        let draw = self.draws.get(self.used).cloned().ok_or_else(|| {
            Error::InvalidArgument(format!("noise draw {} was not recorded", self.used))
        })?;
        assert_eq!(
            draw.dims(),
            shape,
            "noise draw {} has another shape",
            self.used
        );
        self.used += 1;
        self.steps_drawn.push(self.step);
        Ok(draw.to_dtype(dtype)?.to_device(device)?)
    }
}

/// The fake model of index.json: `a·x_in + b·cos(t / period)` in float32.
fn fake_model(x_in: &Tensor, t: f64, fm: &Value) -> Tensor {
    let a = fm["a"].as_f64().unwrap();
    let b = fm["b"].as_f64().unwrap() as f32;
    let period = fm["period"].as_f64().unwrap() as f32;
    let c = b * ((t as f32) / period).cos();
    x_in.affine(a, f64::from(c)).unwrap()
}

fn stack(ts: &[Tensor]) -> Tensor {
    Tensor::stack(ts, 0).unwrap()
}

#[test]
fn alpha_schedulers_replay_diffusers_trajectories() {
    let manifest = common::manifest();
    let fake = common::index()["fake_model"].clone();
    let goldens = common::goldens(GOLDENS);
    let names: HashSet<String> = common::index_entries(GOLDENS)
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    let x_init = common::golden(&goldens, "x_init");
    let mut parity = common::Parity::new();

    for (case, entry) in cases(&manifest) {
        let class = entry["class"].as_str().unwrap();
        let steps = entry["num_inference_steps"].as_u64().unwrap() as usize;
        println!("== {case} ({class}, {steps} steps)");
        let (mut sched, _) = build(class, &case_config(&entry));
        sched.set_timesteps(steps).unwrap();
        sched.set_begin_index(0);
        assert_eq!(
            sched.order() as u64,
            entry["order"].as_u64().unwrap(),
            "{case}: order"
        );

        let key = |what: &str| format!("{case}.{what}");
        let timesteps = sched.timesteps().to_vec();
        assert!(
            timesteps.iter().all(|t| t.fract() == 0.0),
            "{case}: fractional timesteps"
        );
        let ours: Vec<i64> = timesteps.iter().map(|&t| t as i64).collect();
        parity.check_exact(
            &key("timesteps"),
            &ours,
            &common::flat_i64(common::golden(&goldens, &key("timesteps"))),
        );
        if names.contains(&key("sigmas")) {
            let sigmas = sched
                .sigmas()
                .unwrap_or_else(|| panic!("{case}: no sigmas"));
            let ours = Tensor::new(sigmas, &Device::Cpu).unwrap();
            parity.check(
                &key("sigmas"),
                &ours,
                common::golden(&goldens, &key("sigmas")),
            );
        }
        let init_sigma = sched.init_noise_sigma();
        parity.check(
            &key("init_noise_sigma"),
            &Tensor::new(&[init_sigma], &Device::Cpu).unwrap(),
            common::golden(&goldens, &key("init_noise_sigma")),
        );

        let mut noise = Replay {
            draws: match goldens.get(&key("noise")) {
                Some(n) => (0..n.dim(0).unwrap()).map(|k| n.i(k).unwrap()).collect(),
                None => Vec::new(),
            },
            used: 0,
            step: 0,
            steps_drawn: Vec::new(),
        };
        let mut sample = x_init.affine(init_sigma, 0.0).unwrap();
        let (mut xs_in, mut mos, mut prevs, mut origs) = (vec![], vec![], vec![], vec![]);
        for (i, &t) in timesteps.iter().enumerate() {
            noise.step = i as i64;
            let x_in = sched.scale_model_input(&sample, t).unwrap();
            let mo = fake_model(&x_in, t, &fake);
            let out = sched.step(&mo, t, &sample, &mut noise).unwrap();
            xs_in.push(x_in);
            mos.push(mo);
            origs.push(out.pred_original_sample);
            sample = out.prev_sample;
            prevs.push(sample.clone());
        }
        for (what, ours) in [
            ("scaled_model_input", &xs_in),
            ("model_output", &mos),
            ("prev_sample", &prevs),
        ] {
            parity.check(
                &key(what),
                &stack(ours),
                common::golden(&goldens, &key(what)),
            );
        }
        if names.contains(&key("pred_original_sample")) {
            let origs: Vec<Tensor> = origs
                .into_iter()
                .map(|o| o.unwrap_or_else(|| panic!("{case}: no pred_original_sample")))
                .collect();
            parity.check(
                &key("pred_original_sample"),
                &stack(&origs),
                common::golden(&goldens, &key("pred_original_sample")),
            );
        }
        let recorded = entry["num_noise_draws"].as_u64().unwrap() as usize;
        assert_eq!(noise.used, recorded, "{case}: number of noise draws");
        assert_eq!(
            noise.used,
            noise.draws.len(),
            "{case}: unused recorded draws"
        );
        if let Some(idx) = goldens.get(&key("noise_step_index")) {
            parity.check_exact(
                &key("noise_step_index"),
                &noise.steps_drawn,
                &common::flat_i64(idx),
            );
        }
        assert!(
            (init_sigma - entry["init_noise_sigma"].as_f64().unwrap()).abs() < 1e-6,
            "{case}: init_noise_sigma"
        );
    }
    parity.finish();
}

/// Every key of our typed configs exists in diffusers' resulting config of the case, with the
/// same value (numbers to 1e-12 relative).
#[test]
fn alpha_scheduler_configs_match_diffusers() {
    let manifest = common::manifest();
    let mut compared = 0;
    for (case, entry) in cases(&manifest) {
        let class = entry["class"].as_str().unwrap();
        let (_, ours) = build(class, &case_config(&entry));
        let theirs = entry["config"].as_object().expect("case has `config`");
        let mut mismatches: Vec<String> = Vec::new();
        for (k, v) in ours.as_object().unwrap() {
            let Some(t) = theirs.get(k) else {
                mismatches.push(format!("{k}: not in diffusers' config"));
                continue;
            };
            let same = match (v.as_f64(), t.as_f64()) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0),
                _ => v == t,
            };
            if !same {
                mismatches.push(format!("{k}: ours {v} != diffusers {t}"));
            }
            compared += 1;
        }
        println!("{case}: {} keys compared", ours.as_object().unwrap().len());
        assert!(mismatches.is_empty(), "{case}: {}", mismatches.join("; "));
    }
    assert!(compared > 0);
}

/// Step counts of zero or beyond the training timesteps are rejected by every class.
#[test]
fn alpha_schedulers_reject_invalid_step_counts() {
    let manifest = common::manifest();
    let mut seen: HashSet<String> = HashSet::new();
    for (_, entry) in cases(&manifest) {
        let class = entry["class"].as_str().unwrap().to_string();
        if !seen.insert(class.clone()) {
            continue;
        }
        let (mut sched, cfg) = build(&class, &case_config(&entry));
        let train = cfg["num_train_timesteps"].as_u64().unwrap() as usize;
        for n in [0, train + 1] {
            let err = sched.set_timesteps(n).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument(_)),
                "{class} with {n} steps: {err}"
            );
        }
    }
    assert!(!seen.is_empty());
}
