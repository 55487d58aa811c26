//! Parity of both CLIP text encoders with transformers 5.24, loading of the refiner's encoder,
//! and load/input errors.
//!
//! Cases are discovered from `index.json`: golden names are `<group>.<output>`, each group's
//! `call` names the pipeline component that produced it (`out = pipe.<component>(ids, …)`), and
//! `<group>.input_ids` holds its input. Tolerance: max |ours - golden| <= 1e-4 * max(1, max
//! |golden|) (f32).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdxl_core::loading::{read_json, ModelIndex, Weights};
use sdxl_core::text::clip::{ClipTextConfig, ClipTextModel, ClipTextOutput};
use sdxl_core::Error;

const GOLDEN_FILE: &str = "goldens/text_encoders.safetensors";
const INPUT_IDS: &str = "input_ids";

/// One encoder's goldens: the component folder name and the output names to compare.
struct Group {
    prefix: String,
    component: String,
    outputs: Vec<String>,
}

/// The component called in a golden's producing call: `out = pipe.<component>(...)`.
fn component_of(call: &str) -> String {
    let marker = "out = pipe.";
    let start = call
        .find(marker)
        .unwrap_or_else(|| panic!("no `{marker}` in call `{call}`"))
        + marker.len();
    call[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

fn groups() -> Vec<Group> {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for entry in common::index_entries(GOLDEN_FILE) {
        let name = entry["name"].as_str().expect("golden name").to_string();
        let (prefix, output) = name
            .split_once('.')
            .unwrap_or_else(|| panic!("golden `{name}` is not `<group>.<output>`"));
        let component = component_of(entry["call"].as_str().expect("golden call"));
        let group = groups.entry(prefix.to_string()).or_insert_with(|| Group {
            prefix: prefix.to_string(),
            component: component.clone(),
            outputs: Vec::new(),
        });
        assert_eq!(
            group.component, component,
            "goldens of `{prefix}` mix components"
        );
        if output != INPUT_IDS {
            group.outputs.push(output.to_string());
        }
    }
    assert!(!groups.is_empty(), "no goldens listed for {GOLDEN_FILE}");
    groups.into_values().collect()
}

/// Our tensor for a golden output name.
fn output_tensor(out: &ClipTextOutput, name: &str) -> Tensor {
    match name {
        "hidden_states" => {
            let all = out.hidden_states.as_ref().expect("hidden states requested");
            Tensor::stack(all, 0).unwrap()
        }
        "penultimate" => out.penultimate.clone(),
        "last_hidden_state" => out.last_hidden_state.clone(),
        "pooler_output" | "pooled_unprojected" => out.pooled.clone(),
        "text_embeds" => out.text_embeds.clone().expect("encoder has a projection"),
        other => panic!("golden output `{other}` has no counterpart in ClipTextOutput"),
    }
}

fn load_encoder(model_dir: &Path, component: &str) -> ClipTextModel {
    ClipTextModel::load(&model_dir.join(component), DType::F32, &Device::Cpu, None)
        .unwrap_or_else(|e| panic!("loading {component}: {e}"))
}

#[test]
fn encoders_match_transformers_goldens() {
    let goldens = common::goldens(GOLDEN_FILE);
    let base = common::base_dir();
    let mut parity = common::Parity::new();
    for group in groups() {
        let model = load_encoder(&base, &group.component);
        let ids = common::golden(&goldens, &format!("{}.{INPUT_IDS}", group.prefix));
        let out = model.forward_with_hidden_states(ids).unwrap();
        for output in &group.outputs {
            let name = format!("{}.{output}", group.prefix);
            parity.check(
                &name,
                &output_tensor(&out, output),
                common::golden(&goldens, &name),
            );
        }

        // The plain forward gives the same tensors without keeping every hidden state, and u32
        // ids give the same result as i64 ids.
        let plain = model.forward(&ids.to_dtype(DType::U32).unwrap()).unwrap();
        assert!(plain.hidden_states.is_none());
        assert_eq!(
            common::max_abs_diff(&plain.penultimate, &out.penultimate),
            0.0
        );
        assert_eq!(common::max_abs_diff(&plain.pooled, &out.pooled), 0.0);
        assert_eq!(plain.text_embeds.is_some(), model.has_projection());

        check_prompt_embeddings(&model, ids, &group, &goldens, &mut parity);
    }
    parity.finish();
}

/// [`ClipTextModel::prompt_embeddings`] (the last layer run at the pooling positions only, or
/// not at all) gives the full pass's penultimate states bit for bit and the golden
/// `text_embeds` within the parity tolerance.
fn check_prompt_embeddings(
    model: &ClipTextModel,
    ids: &Tensor,
    group: &Group,
    goldens: &HashMap<String, Tensor>,
    parity: &mut common::Parity,
) {
    let out = model.forward(ids).unwrap();
    let sdxl = model.prompt_embeddings(ids).unwrap();
    let dtype = sdxl.penultimate.dtype();
    common::assert_identical(
        &format!(
            "{}.penultimate (prompt_embeddings, {dtype:?})",
            group.prefix
        ),
        &sdxl.penultimate,
        &out.penultimate,
    );
    assert_eq!(sdxl.text_embeds.is_some(), model.has_projection());
    if let Some(embeds) = &sdxl.text_embeds {
        assert_eq!(embeds.dtype(), dtype);
        let name = format!("{}.text_embeds", group.prefix);
        assert!(
            group.outputs.iter().any(|o| o == "text_embeds"),
            "no golden {name} for an encoder with a projection"
        );
        parity.check(
            &format!("{name} (prompt_embeddings, {dtype:?})"),
            embeds,
            common::golden(goldens, &name),
        );
    }
}

#[test]
fn refiner_text_encoders_load_and_run() {
    let refiner = common::refiner_dir();
    let index = ModelIndex::read(&refiner).unwrap();
    let goldens = common::goldens(GOLDEN_FILE);
    let ids = common::golden(&goldens, &format!("{}.{INPUT_IDS}", groups()[0].prefix));
    let batch = ids.dim(0).unwrap();
    let components = [
        ("text_encoder", &index.text_encoder),
        ("text_encoder_2", &index.text_encoder_2),
    ];
    let mut loaded = 0;
    for (component, entry) in components {
        let Some((Some(_), Some(class))) = entry else {
            continue;
        };
        let model = load_encoder(&refiner, component);
        let cfg = model.config().clone();
        assert_eq!(
            model.has_projection(),
            class == "CLIPTextModelWithProjection"
        );
        let out = model.forward(ids).unwrap();
        let seq = ids.dim(1).unwrap();
        assert_eq!(out.penultimate.dims(), &[batch, seq, cfg.hidden_size]);
        assert_eq!(out.pooled.dims(), &[batch, cfg.hidden_size]);
        if let Some(embeds) = &out.text_embeds {
            assert_eq!(embeds.dims(), &[batch, cfg.projection_dim]);
            let finite = common::flat_f64(embeds).iter().all(|v| v.is_finite());
            assert!(finite, "refiner {component} text_embeds are not finite");
        }
        println!("refiner {component} ({class}) loads and runs");
        loaded += 1;
    }
    assert!(loaded > 0, "the refiner declares no text encoder");
}

#[test]
fn missing_folder_is_not_found() {
    let dir = common::base_dir().join("no_such_text_encoder");
    let err = ClipTextModel::load(&dir, DType::F32, &Device::Cpu, None).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { path, .. } if path == &dir),
        "{err}"
    );
}

/// The checkpoint of a base component as an in-memory map, with its config.
fn checkpoint(component: &str) -> (HashMap<String, Tensor>, ClipTextConfig) {
    let dir = common::base_dir().join(component);
    let cfg = read_json(&dir.join("config.json"), "config").unwrap();
    let map = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    (map, cfg)
}

fn build(map: HashMap<String, Tensor>, cfg: &ClipTextConfig) -> sdxl_core::Result<ClipTextModel> {
    ClipTextModel::new(&Weights::new(Arc::new(map), DType::F32, &Device::Cpu), cfg)
}

#[test]
fn every_misshapen_or_missing_weight_is_named() {
    for group in groups() {
        let (map, cfg) = checkpoint(&group.component);
        let mut keys: Vec<&String> = map
            .keys()
            .filter(|k| k.ends_with(".weight") || k.ends_with(".bias"))
            .collect();
        keys.sort();
        for key in keys {
            let original = &map[key];
            let mut dims = original.dims().to_vec();
            dims[0] += 1;
            let mut changed = map.clone();
            changed.insert(
                key.clone(),
                Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu).unwrap(),
            );
            match build(changed, &cfg) {
                Err(Error::ShapeMismatch {
                    key: k,
                    expected,
                    found,
                }) => {
                    assert_eq!(&k, key);
                    assert_eq!(expected, original.dims());
                    assert_eq!(found, dims);
                }
                other => panic!("{key} with shape {dims:?}: expected ShapeMismatch, got {other:?}"),
            }

            let mut removed = map.clone();
            removed.remove(key);
            match build(removed, &cfg) {
                Err(Error::MissingTensor { key: k }) => assert_eq!(&k, key),
                other => panic!("{key} removed: expected MissingTensor, got {other:?}"),
            }
        }
    }
}

#[test]
fn checkpoint_without_text_model_prefix_loads_identically() {
    let goldens = common::goldens(GOLDEN_FILE);
    for group in groups() {
        let (map, cfg) = checkpoint(&group.component);
        let stripped: HashMap<String, Tensor> = map
            .iter()
            .map(|(k, t)| {
                let k = k.strip_prefix("text_model.").unwrap_or(k);
                (k.to_string(), t.clone())
            })
            .collect();
        let ids = common::golden(&goldens, &format!("{}.{INPUT_IDS}", group.prefix));
        let a = build(map, &cfg).unwrap().forward(ids).unwrap();
        let b = build(stripped, &cfg).unwrap().forward(ids).unwrap();
        assert_eq!(
            common::max_abs_diff(&a.last_hidden_state, &b.last_hidden_state),
            0.0
        );
        assert_eq!(a.text_embeds.is_some(), b.text_embeds.is_some());
    }
}

#[test]
fn invalid_input_ids_are_rejected() {
    let group = &groups()[0];
    let model = load_encoder(&common::base_dir(), &group.component);
    let cfg = model.config().clone();
    let dev = Device::Cpu;
    let too_long = Tensor::zeros((1, cfg.max_position_embeddings + 1), DType::U32, &dev).unwrap();
    let out_of_vocab = Tensor::new(&[[0u32, cfg.vocab_size as u32]], &dev).unwrap();
    let negative = Tensor::new(&[[0i64, -1]], &dev).unwrap();
    let float = Tensor::zeros((1, 2), DType::F32, &dev).unwrap();
    let rank_one = Tensor::zeros(2, DType::U32, &dev).unwrap();
    let empty_batch = Tensor::zeros((0, 3), DType::U32, &dev).unwrap();
    for (what, ids) in [
        ("too long", too_long),
        ("out of vocabulary", out_of_vocab),
        ("negative", negative),
        ("float", float),
        ("rank 1", rank_one),
        ("empty batch", empty_batch),
    ] {
        match model.forward(&ids) {
            Err(Error::InvalidArgument(msg)) => println!("{what}: {msg}"),
            other => panic!("{what}: expected InvalidArgument, got {other:?}"),
        }
    }
    // A shorter sequence is accepted, as in transformers.
    let short = Tensor::zeros((2, 5), DType::U32, &dev).unwrap();
    let out = model.forward(&short).unwrap();
    assert_eq!(out.penultimate.dims(), &[2, 5, cfg.hidden_size]);
}

#[test]
fn half_precision_stays_close_to_the_goldens() {
    // Stated tolerances for reduced precision (rounding the weights to 16 bits dominates the
    // error): f16 1e-2, bf16 6e-2, relative to max(1, max|golden|).
    let goldens = common::goldens(GOLDEN_FILE);
    let base = common::base_dir();
    for (dtype, rel) in [(DType::F16, 1e-2), (DType::BF16, 6e-2)] {
        let mut parity = common::Parity::with_tolerance(rel);
        for group in groups() {
            let dir = base.join(&group.component);
            let model = ClipTextModel::load(&dir, dtype, &Device::Cpu, None).unwrap();
            let ids = common::golden(&goldens, &format!("{}.{INPUT_IDS}", group.prefix));
            let out = model.forward_with_hidden_states(ids).unwrap();
            for output in &group.outputs {
                let name = format!("{}.{output}", group.prefix);
                let ours = output_tensor(&out, output);
                assert_eq!(ours.dtype(), dtype, "{name} left the model dtype");
                parity.check(
                    &format!("{name} ({dtype:?})"),
                    &ours,
                    common::golden(&goldens, &name),
                );
            }
            check_prompt_embeddings(&model, ids, &group, &goldens, &mut parity);
        }
        parity.finish();
    }
}
