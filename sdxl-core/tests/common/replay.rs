//! Replaying recorded diffusers pipeline calls: their keyword arguments as our prompts and
//! parameters, a step recorder compared with the `{case}.loop.*`/`{case}.unet.*` goldens, and
//! the uint8 image check.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use sdxl_core::pipeline::{
    GenerateParams, LongPrompts, ModelKind, PromptEmbeds, Prompts, RgbImage, SdxlModel,
    StepObserver, StepTensors,
};
use serde_json::Value;

use super::{golden, Parity};

/// The per-step tensors a [`Recorder`] keeps, by their golden names (`loop.<key>`).
pub const LOOP_KEYS: [&str; 5] = [
    "unet_sample",
    "unet_out",
    "step_model_output",
    "step_sample",
    "step_prev_sample",
];

/// The conditioning tensors a [`Recorder`] keeps, by their golden names (`unet.<key>`).
pub const UNET_KEYS: [&str; 3] = ["encoder_hidden_states", "text_embeds", "time_ids"];

/// A string kwarg, `None` when absent or null.
fn opt_str(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

/// A `(a, b)` kwarg such as `original_size`, `None` when absent or null.
fn pair(v: &Value) -> Option<(usize, usize)> {
    let a = v.as_array()?;
    Some((a.first()?.as_u64()? as usize, a.get(1)?.as_u64()? as usize))
}

/// The prompt texts of diffusers kwargs, with our defaults for everything else (weighting on,
/// long prompts chunked).
pub fn prompt_texts(kw: &Value) -> Prompts {
    Prompts {
        prompt: kw["prompt"].as_str().unwrap_or_default().to_string(),
        prompt_2: opt_str(&kw["prompt_2"]),
        negative_prompt: opt_str(&kw["negative_prompt"]),
        negative_prompt_2: opt_str(&kw["negative_prompt_2"]),
        ..Prompts::default()
    }
}

/// The prompts of a replayed diffusers call: diffusers has no weighting syntax and truncates
/// prompts longer than one window.
pub fn diffusers_prompts(kw: &Value) -> Prompts {
    Prompts {
        weighting: false,
        long_prompts: LongPrompts::Truncate,
        ..prompt_texts(kw)
    }
}

/// Pipeline keyword arguments as recorded in the manifest → our parameters. `size` replaces
/// `height`/`width` for calls that take them from the input image.
pub fn params_from(kw: &Value, size: Option<(usize, usize)>) -> GenerateParams {
    let mut p = GenerateParams::new("");
    p.prompts = diffusers_prompts(kw);
    let (h, w) = size.unwrap_or_else(|| {
        (
            kw["height"].as_u64().expect("height") as usize,
            kw["width"].as_u64().expect("width") as usize,
        )
    });
    p.height = h;
    p.width = w;
    p.steps = kw["num_inference_steps"].as_u64().expect("steps") as usize;
    if let Some(g) = kw["guidance_scale"].as_f64() {
        p.guidance_scale = g;
    }
    if let Some(g) = kw["guidance_rescale"].as_f64() {
        p.guidance_rescale = g;
    }
    if let Some(s) = kw["strength"].as_f64() {
        p.strength = s;
    }
    p.denoising_end = kw["denoising_end"].as_f64();
    p.denoising_start = kw["denoising_start"].as_f64();
    let m = &mut p.micro;
    m.original_size = pair(&kw["original_size"]);
    if let Some(c) = pair(&kw["crops_coords_top_left"]) {
        m.crops_coords_top_left = c;
    }
    m.target_size = pair(&kw["target_size"]);
    m.negative_original_size = pair(&kw["negative_original_size"]);
    m.negative_crops_coords_top_left = pair(&kw["negative_crops_coords_top_left"]);
    m.negative_target_size = pair(&kw["negative_target_size"]);
    if let Some(a) = kw["aesthetic_score"].as_f64() {
        m.aesthetic_score = a;
    }
    if let Some(a) = kw["negative_aesthetic_score"].as_f64() {
        m.negative_aesthetic_score = a;
    }
    p
}

/// Applies a manifest `scheduler_swap` (`[class, overrides]`, absent or null for none), as
/// `Cls.from_config(pipe.scheduler.config, **overrides)`.
fn apply_swap(p: &mut GenerateParams, swap: &Value) {
    if let Some([class, overrides]) = swap.as_array().map(Vec::as_slice) {
        p.scheduler
            .overrides
            .insert("_class_name".into(), class.clone());
        if let Some(o) = overrides.as_object() {
            p.scheduler.overrides.extend(o.clone());
        }
    }
}

/// The parameters of a `manifest.json → t2i` case: its `kwargs` with its `scheduler_swap`.
pub fn t2i_case_params(case: &Value) -> GenerateParams {
    let mut p = params_from(&case["kwargs"], None);
    apply_swap(&mut p, &case["scheduler_swap"]);
    p
}

/// One `manifest.json → encode_prompt_cases` entry.
pub struct EncodeCase {
    /// The case name, prefix of its goldens (`{name}.prompt_embeds`, ...).
    pub name: String,
    /// The model it ran on: cases named `refiner…` use the refiner.
    pub kind: ModelKind,
    /// The `encode_prompt` keyword arguments.
    pub kwargs: Value,
}

impl EncodeCase {
    /// `base` or `refiner`, as the case's [`EncodeCase::kind`] says.
    pub fn model<'a>(&self, base: &'a SdxlModel, refiner: &'a SdxlModel) -> &'a SdxlModel {
        match self.kind {
            ModelKind::Base => base,
            ModelKind::Refiner => refiner,
        }
    }
}

/// Every `manifest.json → encode_prompt_cases` entry, in manifest order.
pub fn encode_prompt_cases() -> Vec<EncodeCase> {
    super::manifest()["encode_prompt_cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|case| {
            let name = case["case"].as_str().expect("case name").to_string();
            let kind = if name.starts_with("refiner") {
                ModelKind::Refiner
            } else {
                ModelKind::Base
            };
            EncodeCase {
                name,
                kind,
                kwargs: case["kwargs"].clone(),
            }
        })
        .collect()
}

/// `encode_prompt`'s outputs by their golden names (`{case}.<name>`).
pub fn embeds_by_name(e: &PromptEmbeds) -> [(&'static str, &Tensor); 4] {
    [
        ("prompt_embeds", &e.prompt_embeds),
        ("negative_prompt_embeds", &e.negative_prompt_embeds),
        ("pooled_prompt_embeds", &e.pooled_prompt_embeds),
        (
            "negative_pooled_prompt_embeds",
            &e.negative_pooled_prompt_embeds,
        ),
    ]
}

/// Records every denoising step's tensors (the [`LOOP_KEYS`]) and the conditioning of the
/// first step (the [`UNET_KEYS`]).
#[derive(Default)]
pub struct Recorder {
    /// One map per step, keyed by [`LOOP_KEYS`].
    pub steps: Vec<HashMap<&'static str, Tensor>>,
    /// The timestep of each step.
    pub timesteps: Vec<f64>,
    conditioning: Option<HashMap<&'static str, Tensor>>,
}

impl StepObserver for Recorder {
    fn wants_tensors(&self) -> bool {
        true
    }

    fn on_tensors(&mut self, t: &StepTensors<'_>) {
        self.timesteps.push(t.timestep);
        let values = [
            t.model_input,
            t.model_output,
            t.guided_output,
            t.sample,
            t.prev_sample,
        ];
        self.steps.push(
            LOOP_KEYS
                .into_iter()
                .zip(values.map(Tensor::clone))
                .collect(),
        );
        let c = t.conditioning;
        self.conditioning.get_or_insert_with(|| {
            let values = [&c.encoder_hidden_states, &c.text_embeds, &c.time_ids];
            UNET_KEYS
                .into_iter()
                .zip(values.map(Tensor::clone))
                .collect()
        });
    }
}

impl Recorder {
    /// Our value of a recorded golden `loop.<key>` (stacked over the steps; `loop.timesteps`
    /// as f64) or `unet.<key>`.
    pub fn value(&self, group: &str, key: &str) -> Tensor {
        match group {
            "loop" if key == "timesteps" => {
                Tensor::new(self.timesteps.as_slice(), &Device::Cpu).unwrap()
            }
            "loop" => {
                let steps: Vec<Tensor> = self
                    .steps
                    .iter()
                    .map(|s| {
                        s.get(key)
                            .unwrap_or_else(|| panic!("no loop.{key}"))
                            .clone()
                    })
                    .collect();
                Tensor::stack(&steps, 0).unwrap()
            }
            "unet" => self.conditioning.as_ref().expect("a step ran")[key].clone(),
            _ => panic!("unknown group {group}"),
        }
    }

    /// Compares the recorded loop with `{prefix}.loop.timesteps`, `{prefix}.loop.<LOOP_KEYS>`
    /// and `{prefix}.unet.<UNET_KEYS>`, in that order.
    pub fn check(&self, p: &mut Parity, g: &HashMap<String, Tensor>, prefix: &str) {
        let loop_keys = std::iter::once("timesteps").chain(LOOP_KEYS);
        let keys = loop_keys
            .map(|k| ("loop", k))
            .chain(UNET_KEYS.map(|k| ("unet", k)));
        for (group, key) in keys {
            let name = format!("{prefix}.{group}.{key}");
            p.check(&name, &self.value(group, key), golden(g, &name));
        }
    }
}

/// Compares uint8 images: every value within ±1, the count of differing values printed.
pub fn check_u8(name: &str, ours: &[RgbImage], golden: &Tensor) {
    let g: Vec<u8> = golden.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let o: Vec<u8> = ours.iter().flat_map(|i| i.data.iter().copied()).collect();
    assert_eq!(o.len(), g.len(), "{name}: size");
    let worst = o
        .iter()
        .zip(&g)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    let differing = o.iter().zip(&g).filter(|(a, b)| a != b).count();
    println!(
        "{name}: worst |diff| {worst}, {differing} of {} values differ",
        g.len()
    );
    assert!(worst <= 1, "{name}: a value differs by {worst}");
}
