//! Parity of the micro-conditioning time ids with diffusers' `_get_add_time_ids`.
//!
//! Every entry of `goldens/time_ids.safetensors` is rebuilt from the keyword arguments of the
//! `call` recorded for it in `index.json` (sizes, crops, aesthetic scores, pooled width), under
//! the layout its pipeline class implies; nothing about the cases is hard-coded. Tolerance: exact
//! (0): the values are integers and scores that f32 holds exactly, as diffusers stores them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Device;
use sdxl_core::conditioning::{MicroConditioning, TimeIdsLayout};
use sdxl_core::loading::ModelIndex;
use sdxl_core::unet::UNetConfig;
use sdxl_core::Error;

const FILE: &str = "goldens/time_ids.safetensors";

/// A recorded call: `Class._get_add_time_ids(k=v, …)  # comment`.
struct Call {
    class: String,
    kwargs: HashMap<String, String>,
    comment: String,
}

/// Splits `a=(1, 2), b=3.0` at the commas outside parentheses.
fn split_top_level(args: &str) -> Vec<String> {
    let (mut parts, mut depth, mut current) = (Vec::new(), 0usize, String::new());
    for ch in args.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if ch == ',' && depth == 0 {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(ch);
        }
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_call(call: &str) -> Call {
    let (code, comment) = call.split_once('#').unwrap_or((call, ""));
    let (class, rest) = code
        .split_once("._get_add_time_ids(")
        .unwrap_or_else(|| panic!("not a _get_add_time_ids call: {call}"));
    let args = rest.trim().strip_suffix(')').expect("call ends with `)`");
    let kwargs = split_top_level(args)
        .into_iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("bad kwarg {kv}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Call {
        class: class.trim().to_string(),
        kwargs,
        comment: comment.trim().to_string(),
    }
}

fn pair(v: &str) -> (usize, usize) {
    let inner = v.trim_start_matches('(').trim_end_matches(')');
    let (a, b) = inner
        .split_once(',')
        .unwrap_or_else(|| panic!("not a pair: {v}"));
    (a.trim().parse().unwrap(), b.trim().parse().unwrap())
}

impl Call {
    fn pair(&self, key: &str) -> Option<(usize, usize)> {
        self.kwargs.get(key).map(|v| pair(v))
    }

    fn number(&self, key: &str) -> Option<f64> {
        self.kwargs.get(key).map(|v| v.parse().unwrap())
    }

    fn layout(&self) -> TimeIdsLayout {
        match self.class.as_str() {
            "StableDiffusionXLPipeline" => TimeIdsLayout::Text2Image,
            "StableDiffusionXLImg2ImgPipeline"
                if self.comment.contains("requires_aesthetics_score=True") =>
            {
                TimeIdsLayout::AestheticScore
            }
            "StableDiffusionXLImg2ImgPipeline" => TimeIdsLayout::Image2Image,
            other => panic!("unknown pipeline class {other}"),
        }
    }

    /// The micro-conditioning the call describes; absent arguments keep diffusers' defaults.
    fn micro(&self) -> MicroConditioning {
        let original = self.pair("original_size").expect("original_size");
        let mut m = MicroConditioning::new(original.0, original.1);
        if let Some(c) = self.pair("crops_coords_top_left") {
            m.crops_coords_top_left = c;
        }
        if let Some(t) = self.pair("target_size") {
            m.target_size = t;
        }
        m.negative_original_size = self.pair("negative_original_size");
        m.negative_target_size = self.pair("negative_target_size");
        if let Some(c) = self.pair("negative_crops_coords_top_left") {
            m.negative_crops_coords_top_left = c;
        }
        if let Some(s) = self.number("aesthetic_score") {
            m.aesthetic_score = s;
        }
        if let Some(s) = self.number("negative_aesthetic_score") {
            m.negative_aesthetic_score = s;
        }
        m
    }

    fn pooled_dim(&self) -> usize {
        self.number("text_encoder_projection_dim")
            .expect("text_encoder_projection_dim") as usize
    }
}

/// The model folder whose UNet the layout belongs to (the refiner for the aesthetic score).
fn model_dir(layout: TimeIdsLayout) -> PathBuf {
    match layout {
        TimeIdsLayout::AestheticScore => common::refiner_dir(),
        TimeIdsLayout::Text2Image | TimeIdsLayout::Image2Image => common::base_dir(),
    }
}

#[test]
fn time_ids_match_diffusers() {
    let g = common::goldens(FILE);
    let mut p = common::Parity::with_tolerance(0.0);
    for entry in common::index_entries(FILE) {
        let name = entry["name"].as_str().expect("name");
        let call = parse_call(entry["call"].as_str().expect("call"));
        let layout = call.layout();
        let unet = UNetConfig::load(&model_dir(layout).join("unet")).unwrap();
        let (pos, neg) = call
            .micro()
            .time_ids(layout, &unet, call.pooled_dim(), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // `_get_add_time_ids` returns the positive row, and for img2img also the negative one.
        let ours = if name.ends_with("add_neg_time_ids") {
            neg
        } else {
            pos
        };
        p.check(name, &ours, common::golden(&g, name));
    }
    p.finish();
}

#[test]
fn time_ids_of_the_wrong_layout_are_rejected() {
    for dir in [common::base_dir(), common::refiner_dir()] {
        let index = ModelIndex::read(&dir).unwrap();
        let unet = UNetConfig::load(&dir.join("unet")).unwrap();
        let (right, wrong) = if index.requires_aesthetics_score {
            (TimeIdsLayout::AestheticScore, TimeIdsLayout::Text2Image)
        } else {
            (TimeIdsLayout::Text2Image, TimeIdsLayout::AestheticScore)
        };
        let (d, input) = unet.text_time_dims().unwrap();
        let pooled = input - right.num_ids() * d;
        let micro = MicroConditioning::new(64, 64);
        micro
            .time_ids(right, &unet, pooled, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        match micro.time_ids(wrong, &unet, pooled, &Device::Cpu) {
            Err(Error::InvalidArgument(msg)) => println!("{}: {msg}", dir.display()),
            other => panic!("{}: expected InvalidArgument, got {other:?}", dir.display()),
        }
        match micro.time_ids(right, &unet, pooled + 1, &Device::Cpu) {
            Err(Error::InvalidArgument(msg)) => println!("{}: {msg}", dir.display()),
            other => panic!("{}: expected InvalidArgument, got {other:?}", dir.display()),
        }
    }
}
