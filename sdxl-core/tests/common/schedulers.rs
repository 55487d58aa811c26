//! Replaying the scheduler goldens: the manifest's cases of some classes, their configs (the
//! base model's scheduler config plus the case's overrides), the fake model of
//! `index.json → fake_model` and README's denoising loop driven by it.

use candle_core::Tensor;
use sdxl_core::schedulers::{Scheduler, SchedulerConfig};
use serde_json::Value;

use super::noise::NoiseReplay;

/// The `manifest.json → schedulers` cases whose `class` is one of `classes`, as
/// `(case name, entry)` sorted by name; panics when there is none.
pub fn scheduler_cases(classes: &[&str]) -> Vec<(String, Value)> {
    let manifest = super::manifest();
    let mut out: Vec<(String, Value)> = manifest["schedulers"]
        .as_object()
        .expect("manifest has `schedulers`")
        .iter()
        .filter(|(_, v)| v["class"].as_str().is_some_and(|c| classes.contains(&c)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        !out.is_empty(),
        "no case of {classes:?} in manifest.json → schedulers"
    );
    out
}

/// `Cls.from_config(base_scheduler_config, **overrides)`: the base model's
/// `scheduler_config.json` with a case's `overrides` object (null for none).
pub fn scheduler_config(overrides: &Value) -> SchedulerConfig {
    let path = super::base_dir().join("scheduler/scheduler_config.json");
    let mut cfg = SchedulerConfig::from_file(&path).unwrap();
    if let Some(map) = overrides.as_object() {
        for (k, v) in map {
            cfg = cfg.with(k, v.clone());
        }
    }
    cfg
}

/// The fake model of `index.json → fake_model`: `mo = a·x_in + b·cos(t / period)`, in float32
/// as the fixture script computes it.
pub struct FakeModel {
    a: f64,
    b: f32,
    period: f32,
}

impl FakeModel {
    /// The fake model's constants from `index.json`.
    pub fn from_index() -> Self {
        let fm = &super::index()["fake_model"];
        let get = |k: &str| fm[k].as_f64().unwrap_or_else(|| panic!("fake_model.{k}"));
        Self {
            a: get("a"),
            b: get("b") as f32,
            period: get("period") as f32,
        }
    }

    /// The model output for `x_in` at timestep `t`.
    pub fn eval(&self, x_in: &Tensor, t: f64) -> Tensor {
        let c = self.b * ((t as f32) / self.period).cos();
        x_in.affine(self.a, f64::from(c)).unwrap()
    }
}

/// The per-step tensors of one replayed denoising loop.
pub struct Trajectory {
    /// `scale_model_input` of each step.
    pub scaled_model_input: Vec<Tensor>,
    /// The fake model's output of each step.
    pub model_output: Vec<Tensor>,
    /// The step's `prev_sample`.
    pub prev_sample: Vec<Tensor>,
    /// The step's `pred_original_sample`, where the scheduler gives one.
    pub pred_original_sample: Vec<Option<Tensor>>,
}

impl Trajectory {
    /// README's loop over the scheduler's timesteps (set beforehand): the sample starts as
    /// `x_init · init_noise_sigma`; each step scales it, evaluates `model` and steps, drawing
    /// noise from `noise` (whose step is set to the loop index).
    pub fn run(
        s: &mut dyn Scheduler,
        x_init: &Tensor,
        model: &FakeModel,
        noise: &mut NoiseReplay,
    ) -> Self {
        let mut out = Self {
            scaled_model_input: Vec::new(),
            model_output: Vec::new(),
            prev_sample: Vec::new(),
            pred_original_sample: Vec::new(),
        };
        let mut sample = x_init.affine(s.init_noise_sigma(), 0.0).unwrap();
        let timesteps = s.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            noise.set_step(i);
            let x_in = s.scale_model_input(&sample, t).unwrap();
            let mo = model.eval(&x_in, t);
            let step = s.step(&mo, t, &sample, noise).unwrap();
            sample = step.prev_sample.clone();
            out.scaled_model_input.push(x_in);
            out.model_output.push(mo);
            out.prev_sample.push(step.prev_sample);
            out.pred_original_sample.push(step.pred_original_sample);
        }
        out
    }
}

/// The tensors stacked along a new first dimension.
pub fn stack(ts: &[Tensor]) -> Tensor {
    Tensor::stack(ts, 0).unwrap()
}
