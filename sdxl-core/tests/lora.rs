//! LoRA parity with diffusers: kohya names, fused weights, text-to-image with one and with two
//! LoRAs, LoRA'd text encoders, for both file formats; exact removal and the error cases.
//!
//! Adapters, files, scales, cases and fused modules come from `manifest.json → lora`; tensor
//! names from `index.json`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sdxl_core::pipeline::RunControl;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use common::replay::{check_u8, diffusers_prompts, embeds_by_name, params_from, Recorder};
use common::{
    base_model, golden, goldens, index_entries, load_model, manifest, residencies, Parity,
};
use sdxl_core::layers::LayerMut;
use sdxl_core::lora::{
    kohya_module_name, LoraComponent, LoraFormat, LoraOptions, LoraSpec, LoraWeights, SgmUnetLayout,
};
use sdxl_core::pipeline::{
    decode_latents, encode_prompt, text_to_image, LoadOptions, RgbImage, SdxlModel,
};
use sdxl_core::Error;
use serde_json::Value;

const GOLDENS: &str = "goldens/lora.safetensors";
const FORMATS: [(&str, LoraFormat); 2] = [
    ("diffusers", LoraFormat::Diffusers),
    ("kohya", LoraFormat::Kohya),
];

fn lora_manifest() -> Value {
    manifest()["lora"].clone()
}

fn component(name: &str) -> LoraComponent {
    LoraComponent::ALL
        .into_iter()
        .find(|c| c.diffusers_name() == name)
        .unwrap_or_else(|| panic!("unknown component `{name}`"))
}

/// Every adapter of the manifest read from its file in `format`, by name.
fn load_adapters(format: &str) -> HashMap<String, LoraWeights> {
    lora_manifest()["adapters"]
        .as_array()
        .expect("adapters")
        .iter()
        .map(|a| {
            let name = a["name"].as_str().expect("adapter name").to_string();
            let file = a["files"][format].as_str().expect("adapter file");
            let lora = LoraWeights::load(&common::fixtures_root().join(file))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            (name, lora)
        })
        .collect()
}

/// The number of modules the manifest gives an adapter, over all components.
fn num_modules(adapter: &str) -> usize {
    let lm = lora_manifest();
    let a = lm["adapters"]
        .as_array()
        .expect("adapters")
        .iter()
        .find(|a| a["name"] == adapter)
        .unwrap_or_else(|| panic!("adapter `{adapter}` not in the manifest"));
    a["num_modules"]
        .as_object()
        .expect("num_modules")
        .values()
        .map(|n| n.as_u64().expect("count") as usize)
        .sum()
}

/// Every layer weight of the model (UNet linears and convolutions, text-encoder linears), as
/// (`component.module`, weight): those of the resident components, or of components just read
/// with the model's LoRAs merged when they are loaded on demand.
fn layer_weights(model: &SdxlModel) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    model
        .unet()
        .unwrap()
        .to_mut()
        .visit_layers_mut(&mut |name, layer: LayerMut<'_>| {
            out.push((format!("unet.{name}"), layer.weight().unwrap()));
            Ok(())
        })
        .unwrap();
    let mut text = model.text().unwrap();
    let text = text.to_mut();
    for (c, enc) in [
        ("text_encoder", text.encoder_1.as_mut().map(|(_, e)| e)),
        ("text_encoder_2", Some(&mut text.encoder_2.1)),
    ] {
        if let Some(enc) = enc {
            enc.visit_linears_mut(&mut |name, l| {
                out.push((format!("{c}.{name}"), l.weight().unwrap()));
                Ok(())
            })
            .unwrap();
        }
    }
    out
}

/// Every layer weight as f32 bit patterns, by `component.module`.
fn snapshot(model: &SdxlModel) -> HashMap<String, Vec<u32>> {
    layer_weights(model)
        .into_iter()
        .map(|(k, w)| {
            // f16/bf16 → f32 is exact, so equal bits here mean equal weights.
            let v = w
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (k, v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

/// The weight of one layer.
fn weight_of(model: &SdxlModel, component: LoraComponent, module: &str) -> Tensor {
    let key = format!("{component}.{module}");
    layer_weights(model)
        .into_iter()
        .find_map(|(k, t)| (k == key).then_some(t))
        .unwrap_or_else(|| panic!("no layer {key}"))
}

/// `manifest.json → lora.fuse`: one adapter merged at one scale, with goldens of some of its
/// modules' weights before and after.
struct FuseCase {
    adapter: String,
    scale: f64,
    modules: Vec<Value>,
}

impl FuseCase {
    /// The case as the manifest gives it.
    fn from_manifest() -> Self {
        let fuse = &lora_manifest()["fuse"];
        Self {
            adapter: fuse["adapter"].as_str().expect("fuse adapter").to_string(),
            scale: fuse["lora_scale"].as_f64().expect("lora_scale"),
            modules: fuse["modules"].as_array().expect("fuse modules").clone(),
        }
    }

    /// The case's adapter at the case's scale.
    fn spec<'a>(&self, loras: &'a HashMap<String, LoraWeights>) -> LoraSpec<'a> {
        LoraSpec {
            lora: &loras[&self.adapter],
            scale: self.scale,
        }
    }

    /// The current weight of every listed module, with the module's golden prefix.
    fn module_weights(&self, model: &SdxlModel) -> Vec<(String, Tensor)> {
        self.modules
            .iter()
            .map(|m| {
                let c = component(m["component"].as_str().unwrap());
                let w = weight_of(model, c, m["module"].as_str().unwrap());
                (m["golden"].as_str().unwrap().to_string(), w)
            })
            .collect()
    }
}

/// Asserts that every weight is bit-identical to the snapshot.
fn assert_unchanged(model: &SdxlModel, before: &HashMap<String, Vec<u32>>, what: &str) {
    let now = snapshot(model);
    assert_eq!(now.len(), before.len(), "{what}: layer count");
    let changed: Vec<&String> = now
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        changed.is_empty(),
        "{what}: {} layers differ from the original weights, e.g. {:?}",
        changed.len(),
        changed.first()
    );
    println!("ok   {what}: all {} layer weights bit-identical", now.len());
}

#[test]
fn kohya_names_match_the_manifest() {
    let base = base_model();
    let layout = SgmUnetLayout::of(&base.unet().unwrap());
    let mut checked = 0;
    for adapter in lora_manifest()["adapters"].as_array().expect("adapters") {
        for (c, modules) in adapter["modules"].as_object().expect("modules") {
            for (module, kohya) in modules.as_object().expect("module map") {
                let ours = kohya_module_name(component(c), module, &layout);
                assert_eq!(ours.as_deref(), kohya.as_str(), "{c} {module}");
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no module names in the manifest");
    println!("ok   {checked} kohya module names");
}

#[test]
fn both_formats_read_the_same_modules() {
    let lm = lora_manifest();
    for (fmt, format) in FORMATS {
        let loras = load_adapters(fmt);
        for adapter in lm["adapters"].as_array().expect("adapters") {
            let name = adapter["name"].as_str().expect("name");
            let lora = &loras[name];
            assert_eq!(lora.format(), format, "{name} {fmt}");
            assert_eq!(lora.modules().len(), num_modules(name), "{name} {fmt}");
            assert!(lora.unrecognized_keys().is_empty(), "{name} {fmt}");
            let rank = adapter["rank"].as_u64().expect("rank") as usize;
            let alpha = adapter["alpha"].as_f64().expect("alpha");
            let ratio = adapter["alpha_over_rank"].as_f64().expect("alpha/rank");
            for m in lora.modules() {
                assert_eq!(
                    (m.rank(), m.alpha(), m.scaling()),
                    (rank, alpha, ratio),
                    "{name} {fmt} {}",
                    m.name()
                );
            }
        }
    }
}

#[test]
fn fused_weights_match_diffusers_and_removal_is_exact() {
    let g = goldens(GOLDENS);
    let fuse = FuseCase::from_manifest();
    for (residency, options) in residencies() {
        let mut base = load_model(&common::base_dir(), &options);
        let original = snapshot(&base);
        let mut p = Parity::new();
        let mut merged_by_format = Vec::new();
        for (fmt, _) in FORMATS {
            let loras = load_adapters(fmt);
            for (prefix, w) in fuse.module_weights(&base) {
                let name = format!("{prefix}.weight_orig");
                p.check(
                    &format!("{residency}, {fmt}: {name}"),
                    &w,
                    golden(&g, &name),
                );
            }
            let applied = base.apply_loras(&[fuse.spec(&loras)]).unwrap();
            assert_eq!(
                applied.num_layers(),
                num_modules(&fuse.adapter),
                "{residency}, {fmt}: merged layers"
            );
            assert!(applied.skipped().is_empty());
            for (prefix, w) in fuse.module_weights(&base) {
                let name = format!("{prefix}.weight_fused");
                p.check(
                    &format!("{residency}, {fmt}: {name}"),
                    &w,
                    golden(&g, &name),
                );
            }
            merged_by_format.push(snapshot(&base));
            base.remove_loras(&applied).unwrap();
            assert_unchanged(
                &base,
                &original,
                &format!("{residency}, {fmt}: after remove_loras"),
            );
            assert!(
                base.remove_loras(&applied).is_err(),
                "{residency}, {fmt}: removing twice must fail"
            );
        }
        let [diffusers, kohya] = merged_by_format.as_slice() else {
            panic!("two formats");
        };
        let differing = diffusers
            .iter()
            .filter(|(k, v)| kohya.get(*k) != Some(v))
            .count();
        println!(
            "kohya vs diffusers merged weights: {differing} of {} layers differ",
            diffusers.len()
        );
        assert_eq!(
            differing, 0,
            "kohya and diffusers files merge to different weights"
        );
        p.finish();
    }
}

#[test]
fn merging_keeps_half_precision_models_in_their_dtype() {
    // Tolerances: the weights (< 1) are rounded at load and again after merging, so up to one
    // ulp of the format (f16 4.9e-4, bf16 3.9e-3 just below 1), with margin.
    let g = goldens(GOLDENS);
    let fuse = FuseCase::from_manifest();
    let loras = load_adapters("kohya");
    for (dtype, tol) in [(DType::F16, 1e-3), (DType::BF16, 8e-3)] {
        let options = LoadOptions {
            dtype,
            ..LoadOptions::default()
        };
        let mut base = load_model(&common::base_dir(), &options);
        let original = snapshot(&base);
        let applied = base.apply_loras(&[fuse.spec(&loras)]).unwrap();
        let mut p = Parity::with_tolerance(tol);
        for (prefix, w) in fuse.module_weights(&base) {
            assert_eq!(w.dtype(), dtype);
            let name = format!("{prefix}.weight_fused");
            p.check(&format!("{dtype:?}: {name}"), &w, golden(&g, &name));
        }
        p.finish();
        base.remove_loras(&applied).unwrap();
        assert_unchanged(&base, &original, &format!("{dtype:?}: after removal"));
    }
}

/// The effective scale of each LoRA of a case, as diffusers combines them: the adapter weight
/// (`set_adapters`, else 1) times `cross_attention_kwargs["scale"]` (else 1).
fn case_specs<'a>(case: &Value, loras: &'a HashMap<String, LoraWeights>) -> Vec<LoraSpec<'a>> {
    let global = case["kwargs"]["cross_attention_kwargs"]["scale"]
        .as_f64()
        .unwrap_or(1.0);
    let set_adapters = case["apply"].as_str() == Some("set_adapters");
    case["loras"]
        .as_array()
        .expect("loras")
        .iter()
        .map(|l| {
            let weight = if set_adapters {
                l["scale"].as_f64().expect("scale")
            } else {
                1.0
            };
            LoraSpec {
                lora: &loras[l["name"].as_str().expect("lora name")],
                scale: weight * global,
            }
        })
        .collect()
}

#[test]
fn text_to_image_with_loras_matches_diffusers() {
    let g = goldens(GOLDENS);
    let entries = index_entries(GOLDENS);
    for (residency, options) in residencies() {
        let mut base = load_model(&common::base_dir(), &options);
        let original = snapshot(&base);
        let mut p = Parity::new();
        let mut images = 0;
        for (fmt, _) in FORMATS {
            let loras = load_adapters(fmt);
            for case in lora_manifest()["t2i"].as_array().expect("t2i cases") {
                let name = case["case"].as_str().expect("case name");
                let specs = case_specs(case, &loras);
                let applied = base.apply_loras(&specs).unwrap();
                let params = params_from(&case["kwargs"], None);
                let latents_in = golden(&g, &format!("{name}.latents_in"));
                let mut rec = Recorder::default();
                let out = text_to_image(
                    &base,
                    &params,
                    Some(latents_in),
                    RunControl::observing(&mut rec),
                )
                .expect("t2i");
                let prefix = format!("{name}.");
                for e in &entries {
                    let gname = e["name"].as_str().expect("golden name");
                    let Some(key) = gname.strip_prefix(&prefix) else {
                        continue;
                    };
                    let label = format!("{residency}, {fmt}: {gname}");
                    match key.split_once('.') {
                        Some((group @ ("loop" | "unet"), k)) => {
                            p.check(&label, &rec.value(group, k), golden(&g, gname));
                        }
                        None if key == "latents_in" => {}
                        None if key == "latents_out" => p.check(&label, &out, golden(&g, gname)),
                        None if key == "vae_decode_out" => {
                            p.check(
                                &label,
                                &decode_latents(&base, &out).unwrap(),
                                golden(&g, gname),
                            );
                        }
                        None if key == "image_uint8" => {
                            let decoded = decode_latents(&base, &out).unwrap();
                            check_u8(
                                &label,
                                &RgbImage::from_decoded(&decoded).unwrap(),
                                golden(&g, gname),
                            );
                            images += 1;
                        }
                        _ => panic!("golden `{gname}` is not handled by this test"),
                    }
                }
                base.remove_loras(&applied).unwrap();
                assert_unchanged(
                    &base,
                    &original,
                    &format!("{residency}, {fmt}: {name}: after removal"),
                );
            }
        }
        assert!(images > 0, "no image golden compared");
        p.finish();
    }
}

#[test]
fn encode_prompt_with_lora_matches_diffusers() {
    let g = goldens(GOLDENS);
    let entries = index_entries(GOLDENS);
    for (residency, options) in residencies() {
        let mut base = load_model(&common::base_dir(), &options);
        let mut p = Parity::new();
        for (fmt, _) in FORMATS {
            let loras = load_adapters(fmt);
            for case in lora_manifest()["encode_prompt"].as_array().expect("cases") {
                let name = case["case"].as_str().expect("case name");
                // encode_prompt(lora_scale=s) scales every loaded adapter (weight 1) by s.
                let scale = case["lora_scale"].as_f64().unwrap_or(1.0);
                let specs: Vec<LoraSpec<'_>> = case["loras"]
                    .as_array()
                    .expect("loras")
                    .iter()
                    .map(|l| LoraSpec {
                        lora: &loras[l["name"].as_str().expect("lora name")],
                        scale,
                    })
                    .collect();
                let applied = base.apply_loras(&specs).unwrap();
                let e = encode_prompt(&base, &diffusers_prompts(&case["kwargs"]))
                    .expect("encode_prompt");
                let ours = HashMap::from(embeds_by_name(&e));
                let prefix = format!("{name}.");
                for entry in &entries {
                    let gname = entry["name"].as_str().expect("golden name");
                    if let Some(key) = gname.strip_prefix(&prefix) {
                        let t = ours
                            .get(key)
                            .unwrap_or_else(|| panic!("golden `{gname}` is not handled"));
                        p.check(
                            &format!("{residency}, {fmt}: {gname}"),
                            t,
                            golden(&g, gname),
                        );
                    }
                }
                base.remove_loras(&applied).unwrap();
            }
        }
        p.finish();
    }
}

/// The first adapter that has a text-encoder part, read in `format`.
fn adapter_with_text_encoders(format: &str) -> LoraWeights {
    let mut loras = load_adapters(format);
    let name = lora_manifest()["adapters"]
        .as_array()
        .expect("adapters")
        .iter()
        .find(|a| a["modules"].get("text_encoder").is_some())
        .and_then(|a| a["name"].as_str())
        .expect("an adapter with a text_encoder part")
        .to_string();
    loras.remove(&name).expect("adapter loaded")
}

/// Rebuilds a LoRA from its tensors with `edit` applied.
fn edited(lora: &LoraWeights, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> LoraWeights {
    let path = lora.source().to_path_buf();
    let file = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut tensors = file;
    edit(&mut tensors);
    let metadata = HashMap::new();
    LoraWeights::from_tensors(&path, tensors, &metadata).unwrap()
}

#[test]
fn unknown_modules_are_refused_or_skipped() {
    for (residency, options) in residencies() {
        let mut base = load_model(&common::base_dir(), &options);
        let original = snapshot(&base);
        let lora = adapter_with_text_encoders("kohya");
        let bad = edited(&lora, |t| {
            // A real module's matrix (a scalar `alpha` would be refused for its shape instead).
            let any = t
                .iter()
                .filter(|(k, _)| k.ends_with(".lora_down.weight"))
                .min_by_key(|(k, _)| k.as_str())
                .map(|(_, v)| v.clone())
                .expect("a lora_down weight");
            t.insert("lora_unet_not_a_layer.lora_down.weight".into(), any.clone());
            t.insert("lora_unet_not_a_layer.lora_up.weight".into(), any.clone());
            t.insert("lora_unet_input_blocks_4_1_proj_in.hada_w1_a".into(), any);
        });
        let spec = [LoraSpec {
            lora: &bad,
            scale: 1.0,
        }];
        let err = base.apply_loras(&spec).unwrap_err();
        println!("error: {err}");
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidCheckpoint { .. }), "{err:?}");
        assert!(msg.contains("lora_unet_not_a_layer"), "{msg}");
        assert!(msg.contains("hada_w1_a"), "{msg}");
        assert_unchanged(
            &base,
            &original,
            &format!("{residency}: after the refused LoRA"),
        );

        let applied = base
            .apply_loras_with(&spec, LoraOptions { skip_unknown: true })
            .unwrap();
        assert_eq!(applied.skipped().len(), 2, "{:?}", applied.skipped());
        assert_eq!(applied.num_layers(), lora.modules().len());
        base.remove_loras(&applied).unwrap();
        assert_unchanged(
            &base,
            &original,
            &format!("{residency}: after removing the lenient merge"),
        );
    }
}

#[test]
fn misshapen_lora_fails_without_partial_state() {
    for (residency, options) in residencies() {
        let mut base = load_model(&common::base_dir(), &options);
        let original = snapshot(&base);
        for (fmt, _) in FORMATS {
            let lora = adapter_with_text_encoders(fmt);
            // Break the module merged last, so that the others have been planned before it.
            let last = lora.modules().last().expect("modules");
            let up_key = format!(
                "{}{}",
                last.name(),
                match fmt {
                    "kohya" => ".lora_up.weight",
                    _ => ".lora_B.weight",
                }
            );
            let (out, rank) = last.up().dims2().unwrap();
            let bad = edited(&lora, |t| {
                t.insert(
                    up_key.clone(),
                    Tensor::zeros((out + 1, rank), DType::F32, &Device::Cpu).unwrap(),
                );
            });
            let good = &adapter_with_text_encoders(fmt);
            let err = base
                .apply_loras(&[
                    LoraSpec {
                        lora: good,
                        scale: 1.0,
                    },
                    LoraSpec {
                        lora: &bad,
                        scale: 1.0,
                    },
                ])
                .unwrap_err();
            println!("{residency}, {fmt}: {err}");
            match &err {
                Error::ShapeMismatch { key, found, .. } => {
                    assert_eq!(key, &up_key);
                    assert_eq!(found, &vec![out + 1, rank]);
                }
                other => panic!("expected a shape mismatch, got {other:?}"),
            }
            assert_unchanged(
                &base,
                &original,
                &format!("{residency}, {fmt}: after the misshapen LoRA"),
            );
        }
    }
}

#[test]
fn base_lora_on_the_refiner_is_refused() {
    for (residency, options) in residencies() {
        let mut refiner = load_model(&common::refiner_dir(), &options);
        let original = snapshot(&refiner);
        for (fmt, _) in FORMATS {
            let lora = adapter_with_text_encoders(fmt);
            let err = refiner
                .apply_loras(&[LoraSpec {
                    lora: &lora,
                    scale: 1.0,
                }])
                .unwrap_err();
            println!("{residency}, {fmt}: {err}");
            assert!(
                matches!(
                    err,
                    Error::InvalidCheckpoint { .. } | Error::ShapeMismatch { .. }
                ),
                "{err:?}"
            );
            assert_unchanged(&refiner, &original, &format!("{residency}, {fmt}: refiner"));
        }
    }
}

#[test]
fn loras_are_removed_last_in_first_out() {
    for (residency, options) in residencies() {
        let mut base = load_model(&common::base_dir(), &options);
        let original = snapshot(&base);
        let loras = load_adapters("diffusers");
        let mut names: Vec<&String> = loras.keys().collect();
        names.sort();
        assert!(names.len() >= 2, "the manifest has fewer than two adapters");
        let (first, second) = (&loras[names[0]], &loras[names[1]]);
        let a = base
            .apply_loras(&[LoraSpec {
                lora: first,
                scale: 0.5,
            }])
            .unwrap();
        let after_a = snapshot(&base);
        let b = base
            .apply_loras(&[LoraSpec {
                lora: second,
                scale: 0.5,
            }])
            .unwrap();
        let overlap = a.layers().any(|l| b.layers().any(|m| m == l));
        assert!(
            overlap,
            "the adapters share no layer; the order check needs one"
        );
        let err = base.remove_loras(&a).unwrap_err();
        println!("{residency}: out of order: {err}");
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        base.remove_loras(&b).unwrap();
        assert_unchanged(
            &base,
            &after_a,
            &format!("{residency}: after removing the second LoRA"),
        );
        base.remove_loras(&a).unwrap();
        assert_unchanged(
            &base,
            &original,
            &format!("{residency}: after removing both"),
        );
    }
}

#[test]
fn loras_merge_bit_identically_into_components_loaded_on_demand() {
    // Components loaded on demand get their LoRAs merged each time they are read: two stacked
    // LoRAs, then the second removed, must leave every layer weight and the prompt embeddings
    // exactly as on the resident model.
    let loras = load_adapters("kohya");
    let mut names: Vec<&String> = loras.keys().collect();
    names.sort();
    assert!(names.len() >= 2, "the manifest has fewer than two adapters");
    let spec = |i: usize, scale: f64| {
        [LoraSpec {
            lora: &loras[names[i]],
            scale,
        }]
    };
    let t2i = &lora_manifest()["t2i"][0]["kwargs"];
    let prompts = diffusers_prompts(t2i);
    let mut resident = base_model();
    let first = resident.apply_loras(&spec(0, 0.7)).unwrap();
    let second = resident.apply_loras(&spec(1, 0.4)).unwrap();
    let both = snapshot(&resident);
    let both_embeds = encode_prompt(&resident, &prompts).unwrap();
    resident.remove_loras(&second).unwrap();
    let only_first = snapshot(&resident);
    resident.remove_loras(&first).unwrap();
    for (residency, options) in residencies() {
        let mut model = load_model(&common::base_dir(), &options);
        let first = model.apply_loras(&spec(0, 0.7)).unwrap();
        let second = model.apply_loras(&spec(1, 0.4)).unwrap();
        assert_unchanged(&model, &both, &format!("{residency}: both LoRAs"));
        let embeds = encode_prompt(&model, &prompts).unwrap();
        for ((key, a), (_, b)) in embeds_by_name(&embeds)
            .into_iter()
            .zip(embeds_by_name(&both_embeds))
        {
            common::assert_identical(&format!("{residency}: {key}"), a, b);
        }
        model.remove_loras(&second).unwrap();
        assert_unchanged(&model, &only_first, &format!("{residency}: first LoRA"));
        model.remove_loras(&first).unwrap();
    }
}

/// Deterministic test values in [-1, 1).
fn pattern(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0) - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `Σ_r up[o, r] · down[r, i]` over the flattened trailing dims, in f64, by loops.
fn reference_delta(up: &Tensor, down: &Tensor) -> Vec<f64> {
    let (out, rank) = (up.dim(0).unwrap(), up.dim(1).unwrap());
    let up = common::flat_f64(up);
    let down = common::flat_f64(down);
    let cols = down.len() / rank;
    let mut delta = vec![0f64; out * cols];
    for o in 0..out {
        for c in 0..cols {
            delta[o * cols + c] = (0..rank)
                .map(|r| up[o * rank + r] * down[r * cols + c])
                .sum();
        }
    }
    delta
}

#[test]
fn conv_and_resnet_loras_merge_in_both_formats() {
    // A LoRA on every UNet layer that is not in a transformer (convolutions 3x3 and 1x1,
    // resnets' time_emb_proj, resamplers, time embeddings), in both layouts, with an alpha.
    let mut base = base_model();
    let original = snapshot(&base);
    let layout = SgmUnetLayout::of(&base.unet().unwrap());
    let (rank, alpha, scale) = (2usize, 3.0f64, 0.6f64);
    let mut targets = Vec::new();
    base.unet()
        .unwrap()
        .to_mut()
        .visit_layers_mut(&mut |name, layer| {
            if !name.contains(".attentions.") {
                let dims = layer.weight_dims();
                targets.push((name.to_string(), dims));
            }
            Ok(())
        })
        .unwrap();
    assert!(
        targets.iter().any(|(_, d)| d.len() == 4 && d[2] == 3),
        "no 3x3 conv"
    );
    assert!(
        targets.iter().any(|(_, d)| d.len() == 4 && d[2] == 1),
        "no 1x1 conv"
    );
    let mut kohya = HashMap::new();
    let mut diffusers = HashMap::new();
    // Ordered, so that the worst layer printed below is the same on every run.
    let mut expected = BTreeMap::new();
    for (i, (name, dims)) in targets.iter().enumerate() {
        let mut down_dims = vec![rank];
        down_dims.extend_from_slice(&dims[1..]);
        let up_dims = if dims.len() == 4 {
            vec![dims[0], rank, 1, 1]
        } else {
            vec![dims[0], rank]
        };
        let (down, up) = (pattern(&down_dims, 2 * i), pattern(&up_dims, 2 * i + 1));
        let k = kohya_module_name(LoraComponent::Unet, name, &layout).expect("kohya name");
        let a = Tensor::new(alpha as f32, &Device::Cpu).unwrap();
        kohya.insert(format!("{k}.lora_down.weight"), down.clone());
        kohya.insert(format!("{k}.lora_up.weight"), up.clone());
        kohya.insert(format!("{k}.alpha"), a.clone());
        diffusers.insert(format!("unet.{name}.lora_A.weight"), down.clone());
        diffusers.insert(format!("unet.{name}.lora_B.weight"), up.clone());
        diffusers.insert(format!("unet.{name}.alpha"), a);
        let w = common::flat_f64(&weight_of(&base, LoraComponent::Unet, name));
        let delta = reference_delta(&up, &down);
        let merged: Vec<f32> = w
            .iter()
            .zip(&delta)
            .map(|(w, d)| (w + scale * alpha / rank as f64 * d) as f32)
            .collect();
        expected.insert(
            name.clone(),
            Tensor::from_vec(merged, dims.as_slice(), &Device::Cpu).unwrap(),
        );
    }
    let no_metadata = HashMap::new();
    let mut p = Parity::new();
    let mut merged_by_format = Vec::new();
    for (fmt, tensors) in [("kohya", kohya), ("diffusers", diffusers)] {
        let lora = LoraWeights::from_tensors(format!("conv.{fmt}"), tensors, &no_metadata).unwrap();
        let applied = base
            .apply_loras(&[LoraSpec { lora: &lora, scale }])
            .unwrap();
        assert_eq!(applied.num_layers(), targets.len(), "{fmt}");
        let mut worst = (0f64, String::new());
        for (name, want) in &expected {
            let ours = weight_of(&base, LoraComponent::Unet, name);
            let d = common::flat_f64(&(ours - want).unwrap().abs().unwrap())
                .into_iter()
                .fold(0f64, f64::max);
            if d >= worst.0 {
                worst = (d, name.clone());
            }
        }
        let (worst_abs, name) = &worst;
        // The smallest tolerance any layer gets (1e-4 · max(1, max|expected|)).
        assert!(*worst_abs <= 1e-4, "{fmt}: {name} differs by {worst_abs:e}");
        p.check(
            &format!("{fmt}: worst merged layer {name}"),
            &weight_of(&base, LoraComponent::Unet, name),
            &expected[name],
        );
        merged_by_format.push(snapshot(&base));
        base.remove_loras(&applied).unwrap();
        assert_unchanged(&base, &original, &format!("{fmt}: conv LoRA removed"));
    }
    assert_eq!(
        merged_by_format[0], merged_by_format[1],
        "kohya and diffusers differ"
    );
    println!(
        "{} layers merged identically from both layouts",
        targets.len()
    );
    p.finish();
}
