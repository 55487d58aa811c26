//! Parity of the alpha-based schedulers (DDIM, DDPM, DPM-Solver++, UniPC, LCM) with diffusers:
//! every `manifest.json → schedulers` case of those classes is rebuilt from the base model's
//! `scheduler_config.json` plus the case's overrides and replayed against
//! `goldens/schedulers.safetensors` (timesteps, sigmas, init_noise_sigma, scaled inputs, model
//! outputs of the fake model, prev_sample, pred_original_sample), with the recorded noise
//! draws injected in order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;

use candle_core::{Device, Tensor};
use common::noise::NoiseReplay;
use common::schedulers::{scheduler_cases, scheduler_config, stack, FakeModel, Trajectory};
use sdxl_core::schedulers::ddim::Ddim;
use sdxl_core::schedulers::ddpm::Ddpm;
use sdxl_core::schedulers::dpm_solver::DpmSolverMultistep;
use sdxl_core::schedulers::lcm::Lcm;
use sdxl_core::schedulers::unipc::UniPcMultistep;
use sdxl_core::schedulers::{Scheduler, SchedulerConfig};
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
    fn boxed<S: Scheduler + 'static, C: serde::Serialize>(
        s: S,
        config: fn(&S) -> &C,
    ) -> (Box<dyn Scheduler>, Value) {
        let v = serde_json::to_value(config(&s)).unwrap();
        (Box::new(s), v)
    }
    match class {
        "DDIMScheduler" => boxed(Ddim::from_config(cfg).unwrap(), Ddim::config),
        "DDPMScheduler" => boxed(Ddpm::from_config(cfg).unwrap(), Ddpm::config),
        "DPMSolverMultistepScheduler" => boxed(
            DpmSolverMultistep::from_config(cfg).unwrap(),
            DpmSolverMultistep::config,
        ),
        "UniPCMultistepScheduler" => boxed(
            UniPcMultistep::from_config(cfg).unwrap(),
            UniPcMultistep::config,
        ),
        "LCMScheduler" => boxed(Lcm::from_config(cfg).unwrap(), Lcm::config),
        other => panic!("not an alpha-based scheduler class: {other}"),
    }
}

#[test]
fn alpha_schedulers_replay_diffusers_trajectories() {
    let fake = FakeModel::from_index();
    let goldens = common::goldens(GOLDENS);
    let names: HashSet<String> = common::index_entries(GOLDENS)
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    let x_init = common::golden(&goldens, "x_init");
    let mut parity = common::Parity::new();

    for (case, entry) in scheduler_cases(&CLASSES) {
        let class = entry["class"].as_str().unwrap();
        let steps = entry["num_inference_steps"].as_u64().unwrap() as usize;
        println!("== {case} ({class}, {steps} steps)");
        let (mut sched, _) = build(class, &scheduler_config(&entry["overrides"]));
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

        let mut noise = NoiseReplay::stacked(goldens.get(&key("noise")));
        let run = Trajectory::run(sched.as_mut(), x_init, &fake, &mut noise);
        for (what, ours) in [
            ("scaled_model_input", &run.scaled_model_input),
            ("model_output", &run.model_output),
            ("prev_sample", &run.prev_sample),
        ] {
            parity.check(
                &key(what),
                &stack(ours),
                common::golden(&goldens, &key(what)),
            );
        }
        if names.contains(&key("pred_original_sample")) {
            let origs: Vec<Tensor> = run
                .pred_original_sample
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
        assert_eq!(noise.used(), recorded, "{case}: number of noise draws");
        assert_eq!(
            noise.used(),
            noise.recorded(),
            "{case}: unused recorded draws"
        );
        if let Some(idx) = goldens.get(&key("noise_step_index")) {
            parity.check_exact(
                &key("noise_step_index"),
                noise.draw_steps(),
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
    let mut compared = 0;
    for (case, entry) in scheduler_cases(&CLASSES) {
        let class = entry["class"].as_str().unwrap();
        let (_, ours) = build(class, &scheduler_config(&entry["overrides"]));
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
    let mut seen: HashSet<String> = HashSet::new();
    for (_, entry) in scheduler_cases(&CLASSES) {
        let class = entry["class"].as_str().unwrap().to_string();
        if !seen.insert(class.clone()) {
            continue;
        }
        let (mut sched, cfg) = build(&class, &scheduler_config(&entry["overrides"]));
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
