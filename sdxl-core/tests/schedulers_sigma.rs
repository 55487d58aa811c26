//! Parity of the sigma-based (k-diffusion style) schedulers with diffusers: Euler, Euler
//! ancestral, Heun, KDPM2 and LMS.
//!
//! Cases come from `manifest.json → schedulers` (every entry whose `class` is one of these
//! families); each is rebuilt from the base model's `scheduler_config.json` plus the case's
//! overrides and replays README's loop with the fake model of `index.json → fake_model`, drawing
//! any noise from the recorded `.noise` tensors. Tolerance: max |ours - golden| <=
//! 1e-4 · max(1, max |golden|) per golden tensor; integer-valued timesteps must match exactly.
//!
//! LMS has no goldens (scipy was missing when they were made); it is checked against its own
//! derivation: order-1 LMS is Euler, and the coefficients of every step sum to `σ_{i+1} - σ_i`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;

use candle_core::{Device, Tensor};
use common::noise::NoiseReplay;
use common::schedulers::{scheduler_cases, scheduler_config, stack, FakeModel, Trajectory};
use common::{flat_f64, flat_i64, golden, Parity};
use sdxl_core::schedulers::euler::EulerDiscrete;
use sdxl_core::schedulers::euler_ancestral::EulerAncestralDiscrete;
use sdxl_core::schedulers::heun::HeunDiscrete;
use sdxl_core::schedulers::kdpm2::KDpm2Discrete;
use sdxl_core::schedulers::lms::{lms_coefficient, LmsDiscrete};
use sdxl_core::schedulers::{Scheduler, SchedulerConfig};
use serde_json::Value;

const FILE: &str = "goldens/schedulers.safetensors";
const EULER: &str = "EulerDiscreteScheduler";

/// The diffusers classes this test covers.
const CLASSES: [&str; 5] = [
    EULER,
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler",
];

/// Builds the family a diffusers class name stands for (one of [`CLASSES`]).
fn build(class: &str, cfg: &SchedulerConfig) -> Box<dyn Scheduler> {
    match class {
        EULER => Box::new(EulerDiscrete::from_config(cfg).unwrap()),
        "EulerAncestralDiscreteScheduler" => {
            Box::new(EulerAncestralDiscrete::from_config(cfg).unwrap())
        }
        "HeunDiscreteScheduler" => Box::new(HeunDiscrete::from_config(cfg).unwrap()),
        "KDPM2DiscreteScheduler" => Box::new(KDpm2Discrete::from_config(cfg).unwrap()),
        "LMSDiscreteScheduler" => Box::new(LmsDiscrete::from_config(cfg).unwrap()),
        other => panic!("{other} is not a sigma scheduler"),
    }
}

fn f64_tensor(v: &[f64]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

/// Timesteps: exact when the golden is an integer tensor or integer-valued, else Parity.
fn check_timesteps(p: &mut Parity, name: &str, ours: &[f64], golden: &Tensor) {
    let g = flat_f64(golden);
    let integral = |v: &[f64]| v.iter().all(|x| x.fract() == 0.0);
    if golden.dtype().is_int() || (integral(&g) && integral(ours)) {
        let ours_i: Vec<i64> = ours.iter().map(|&x| x as i64).collect();
        p.check_exact(name, &ours_i, &flat_i64(golden));
    } else {
        p.check(name, &f64_tensor(ours), golden);
    }
}

#[test]
fn sigma_schedulers_match_diffusers_trajectories() {
    let g = common::goldens(FILE);
    let names: HashSet<String> = common::index_entries(FILE)
        .iter()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect();
    let x_init = golden(&g, "x_init");
    let fake = FakeModel::from_index();
    let mut p = Parity::new();
    for (case, entry) in &scheduler_cases(&CLASSES) {
        let class = entry["class"].as_str().unwrap();
        let has = |suffix: &str| names.contains(&format!("{case}.{suffix}"));
        let gold = |suffix: &str| golden(&g, &format!("{case}.{suffix}"));
        println!("-- {case} ({class}, overrides {})", entry["overrides"]);
        let mut s = build(class, &scheduler_config(&entry["overrides"]));
        let steps = entry["num_inference_steps"].as_u64().unwrap() as usize;
        s.set_timesteps(steps).unwrap();
        s.set_begin_index(0);
        assert_eq!(
            Some(s.order() as u64),
            entry["order"].as_u64(),
            "{case}: order"
        );
        assert_eq!(
            Some(s.timesteps().len() as u64),
            entry["num_timesteps"].as_u64(),
            "{case}: number of timesteps"
        );

        check_timesteps(
            &mut p,
            &format!("{case}.timesteps"),
            s.timesteps(),
            gold("timesteps"),
        );
        if has("sigmas") {
            let sigmas = s.sigmas().expect("sigma schedulers expose sigmas");
            p.check(
                &format!("{case}.sigmas"),
                &f64_tensor(sigmas),
                gold("sigmas"),
            );
        }
        let init_sigma = s.init_noise_sigma();
        p.check(
            &format!("{case}.init_noise_sigma"),
            &f64_tensor(&[init_sigma]),
            gold("init_noise_sigma"),
        );

        let mut noise = NoiseReplay::stacked(has("noise").then(|| gold("noise")));
        let run = Trajectory::run(s.as_mut(), x_init, &fake, &mut noise);
        let origs: Vec<Tensor> = run.pred_original_sample.into_iter().flatten().collect();
        let check_stack = |p: &mut Parity, suffix: &str, ours: &[Tensor]| {
            if has(suffix) {
                p.check(&format!("{case}.{suffix}"), &stack(ours), gold(suffix));
            }
        };
        check_stack(&mut p, "scaled_model_input", &run.scaled_model_input);
        check_stack(&mut p, "model_output", &run.model_output);
        check_stack(&mut p, "prev_sample", &run.prev_sample);
        if has("pred_original_sample") {
            assert_eq!(
                origs.len(),
                run.prev_sample.len(),
                "{case}: pred_original_sample per step"
            );
            check_stack(&mut p, "pred_original_sample", &origs);
        }
        assert_eq!(
            noise.used(),
            noise.recorded(),
            "{case}: number of noise draws"
        );
        if let Some(k) = entry["num_noise_draws"].as_u64() {
            assert_eq!(noise.used() as u64, k, "{case}: manifest num_noise_draws");
        }
        if has("noise_step_index") {
            p.check_exact(
                &format!("{case}.noise_step_index"),
                noise.draw_steps(),
                &flat_i64(gold("noise_step_index")),
            );
        }
    }
    p.finish();
}

#[test]
fn lms_matches_its_derivation() {
    let g = common::goldens(FILE);
    let x_init = golden(&g, "x_init");
    let fake = FakeModel::from_index();
    let mut p = Parity::new();
    let mut none = NoiseReplay::new(Vec::new());
    // Every Euler case doubles as an LMS case: same config, same sigma schedule.
    let euler_cases: Vec<(String, Value)> = scheduler_cases(&CLASSES)
        .into_iter()
        .filter(|(_, v)| v["class"] == EULER)
        .collect();
    assert!(
        !euler_cases.is_empty(),
        "no EulerDiscrete case to compare LMS with"
    );
    for (case, entry) in &euler_cases {
        let cfg = scheduler_config(&entry["overrides"]);
        let steps = entry["num_inference_steps"].as_u64().unwrap() as usize;
        let mut euler = EulerDiscrete::from_config(&cfg).unwrap();
        let mut lms = LmsDiscrete::from_config(&cfg).unwrap();
        for s in [&mut euler as &mut dyn Scheduler, &mut lms] {
            s.set_timesteps(steps).unwrap();
            s.set_begin_index(0);
        }
        let sigmas = lms.sigmas().unwrap().to_vec();
        p.check(
            &format!("lms[{case}].sigmas vs euler"),
            &f64_tensor(&sigmas),
            &f64_tensor(euler.sigmas().unwrap()),
        );
        check_timesteps(
            &mut p,
            &format!("lms[{case}].timesteps vs euler"),
            lms.timesteps(),
            &f64_tensor(euler.timesteps()),
        );

        // Order 1 (the first step) is exactly an Euler step.
        let t0 = lms.timesteps()[0];
        let sample = x_init.affine(lms.init_noise_sigma(), 0.0).unwrap();
        let mo = fake.eval(&lms.scale_model_input(&sample, t0).unwrap(), t0);
        let ours = lms.step(&mo, t0, &sample, &mut none).unwrap();
        euler.scale_model_input(&sample, t0).unwrap();
        let reference = euler.step(&mo, t0, &sample, &mut none).unwrap();
        p.check(
            &format!("lms[{case}] first step vs euler"),
            &ours.prev_sample,
            &reference.prev_sample,
        );

        // The Lagrange weights of every step sum to the sigma step.
        let mut worst = 0f64;
        for t in 0..lms.timesteps().len() {
            let order = (t + 1).min(4);
            let sum: f64 = (0..order)
                .map(|k| lms_coefficient(&sigmas, order, t, k).unwrap())
                .sum();
            worst = worst.max((sum - (sigmas[t + 1] - sigmas[t])).abs());
        }
        println!("lms[{case}]: worst |sum of coefficients - sigma step| {worst:.3e}");
        assert!(
            worst < 1e-9,
            "{case}: LMS coefficients do not sum to the sigma step"
        );

        // The remaining multistep steps stay finite.
        let mut sample = ours.prev_sample;
        let rest = lms.timesteps()[1..].to_vec();
        for &t in &rest {
            let mo = fake.eval(&lms.scale_model_input(&sample, t).unwrap(), t);
            sample = lms.step(&mo, t, &sample, &mut none).unwrap().prev_sample;
        }
        let finite = flat_f64(&sample).iter().all(|v| v.is_finite());
        assert!(finite, "{case}: LMS trajectory is not finite");
    }
    p.finish();
}

#[test]
fn add_noise_uses_the_begin_sigma() {
    let g = common::goldens(FILE);
    let x_init = golden(&g, "x_init");
    let mut p = Parity::new();
    let mut seen = HashSet::new();
    for (case, entry) in scheduler_cases(&CLASSES) {
        let class = entry["class"].as_str().unwrap().to_string();
        if !seen.insert(class.clone()) {
            continue;
        }
        let mut s = build(&class, &scheduler_config(&entry["overrides"]));
        let steps = entry["num_inference_steps"].as_u64().unwrap() as usize;
        s.set_timesteps(steps).unwrap();
        let begin = s.timesteps().len() / 2;
        s.set_begin_index(begin);
        let t = s.timesteps()[begin];
        let sigma = s.sigmas().unwrap()[begin];
        let noise = x_init.affine(-0.5, 0.25).unwrap();
        let ours = s.add_noise(x_init, &noise, t).unwrap();
        let expected = (x_init + noise.affine(sigma, 0.0).unwrap()).unwrap();
        p.check(
            &format!("{case}.add_noise at begin {begin}"),
            &ours,
            &expected,
        );
    }
    p.finish();
}
