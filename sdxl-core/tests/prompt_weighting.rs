//! Prompt weighting and long prompts on the tiny fixture models: the window layout of long
//! prompts (derived from the tokenizers themselves), the weighting semantics
//! (`z' = z·w; z' *= mean(z)/mean(z')` per window and encoder), concatenation and padding of
//! windows, parity with diffusers for plain prompts, and a text-to-image run end to end.
//!
//! Prompts, sizes and steps come from `manifest.json`; long prompts are built from its prompts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sdxl_core::pipeline::RunControl;

use candle_core::{DType, Device, Tensor, D};
use common::replay::{embeds_by_name, encode_prompt_cases, prompt_texts};
use common::{
    assert_identical, base_model, flat_f64, golden, goldens, load_model, manifest, max_abs_diff,
    refiner_model, Parity,
};
use sdxl_core::pipeline::prompt::LongPrompts;
use sdxl_core::pipeline::{
    decode_latents, encode_prompt, text_to_image, GenerateParams, LoadOptions, Prompts, SdxlModel,
    StepObserver, StepTensors,
};
use sdxl_core::text::clip::ClipTextModel;
use sdxl_core::text::tokenizer::ClipTokenizer;
use sdxl_core::text::weighting::{prompt_chunks, TokenChunk, COMMA_BACKTRACK};
use serde_json::Value;

/// The model's tokenizer/encoder pairs in concatenation order.
fn pairs(model: &SdxlModel) -> Vec<&(ClipTokenizer, ClipTextModel)> {
    let text = model
        .text()
        .unwrap()
        .resident()
        .expect("the test models keep their text encoders resident");
    text.encoder_1
        .iter()
        .chain(std::iter::once(&text.encoder_2))
        .collect()
}

/// Content tokens per window (`max_length - 2`).
fn window(tok: &ClipTokenizer) -> usize {
    tok.max_length() - 2
}

/// Every distinct non-empty prompt text of the manifest's `encode_prompt_cases`.
fn manifest_prompts() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for case in encode_prompt_cases() {
        for key in ["prompt", "prompt_2", "negative_prompt", "negative_prompt_2"] {
            if let Some(p) = case.kwargs[key].as_str() {
                if !p.is_empty() && !out.iter().any(|q| q == p) {
                    out.push(p.to_string());
                }
            }
        }
    }
    assert!(!out.is_empty(), "the manifest lists no prompts");
    out
}

/// The manifest's prompts joined with ", " and repeated until the text has more than `windows`
/// windows' worth of tokens for every tokenizer.
fn long_prompt(tokenizers: &[&ClipTokenizer], windows: usize) -> String {
    let base = manifest_prompts().join(", ");
    let mut text = base.clone();
    while tokenizers
        .iter()
        .any(|t| t.tokenize_content(&text).unwrap().len() <= windows * window(t))
    {
        text = format!("{text}, {base}");
    }
    text
}

/// The single token of `word`, checked.
fn single_token(tok: &ClipTokenizer, word: &str) -> u32 {
    let ids = tok.tokenize_content(word).unwrap();
    assert_eq!(ids.len(), 1, "`{word}` should be one token");
    ids[0]
}

/// The expected window holding `content`, built from the tokenizer's special ids.
fn expected_window(tok: &ClipTokenizer, content: &[u32]) -> Vec<u32> {
    let mut ids = vec![tok.bos_id()];
    ids.extend_from_slice(content);
    ids.push(tok.eos_id());
    ids.resize(tok.max_length(), tok.pad_id());
    ids
}

/// The content tokens of a window (between the start token and the first end token).
fn content_of(tok: &ClipTokenizer, chunk: &TokenChunk) -> Vec<u32> {
    assert_eq!(chunk.ids.len(), tok.max_length());
    assert_eq!(chunk.ids[0], tok.bos_id());
    let end = chunk.ids[1..]
        .iter()
        .position(|&id| id == tok.eos_id())
        .expect("window has an end token")
        + 1;
    assert!(
        chunk.ids[end + 1..].iter().all(|&id| id == tok.pad_id()),
        "padding after the end token"
    );
    chunk.ids[1..end].to_vec()
}

#[test]
fn long_prompt_windows_follow_the_layout_rules() {
    let base = base_model();
    for (tok, _) in pairs(&base) {
        let n = window(tok);
        let comma = single_token(tok, ",");
        let prompt = long_prompt(&[tok], 2);
        let tokens = tok.tokenize_content(&prompt).unwrap();
        let chunks = prompt_chunks(tok, &prompt, true, LongPrompts::Chunk).unwrap();
        println!(
            "{} tokens in {} windows: {:?}",
            tokens.len(),
            chunks.len(),
            chunks
                .iter()
                .map(|c| content_of(tok, c).len())
                .collect::<Vec<_>>()
        );
        assert!(chunks.len() >= 3);
        let contents: Vec<Vec<u32>> = chunks.iter().map(|c| content_of(tok, c)).collect();
        assert_eq!(contents.concat(), tokens, "no token lost, added or moved");
        for (i, content) in contents.iter().enumerate() {
            assert!(chunks[i].is_unweighted());
            assert!(!content.is_empty() && content.len() <= n);
            let Some(next) = contents.get(i + 1) else {
                continue;
            };
            let near_end = &content[content.len().saturating_sub(COMMA_BACKTRACK)..];
            if content.len() == n && (next[0] == comma || !near_end.contains(&comma)) {
                // A plain cut: no comma close enough to the end, or the next token is one.
                continue;
            }
            // Cut after its last comma, within the backtrack distance, because the window
            // overflowed: the moved tokens (none when the comma ends a full window) hold no
            // comma, and the overflowing token is not one.
            assert_eq!(*content.last().unwrap(), comma, "window {i}");
            assert!(n - (content.len() - 1) <= COMMA_BACKTRACK, "window {i}");
            let moved = n - content.len();
            assert!(next.len() > moved, "window {i}");
            assert!(!next[..=moved].contains(&comma), "window {i}");
        }
    }
}

#[test]
fn windows_split_exactly_at_size_comma_and_break() {
    let base = base_model();
    for (tok, _) in pairs(&base) {
        let n = window(tok);
        let a = single_token(tok, "a");
        let comma = single_token(tok, ",");
        let chunks = |text: &str| -> Vec<Vec<u32>> {
            prompt_chunks(tok, text, true, LongPrompts::Chunk)
                .unwrap()
                .into_iter()
                .map(|c| c.ids)
                .collect()
        };
        let words = |k: usize| vec!["a"; k].join(" ");

        // Exactly one window, then one token more.
        assert_eq!(chunks(&words(n)), [expected_window(tok, &vec![a; n])]);
        assert_eq!(
            chunks(&words(n + 5)),
            [
                expected_window(tok, &vec![a; n]),
                expected_window(tok, &[a; 5])
            ]
        );

        // A comma 5 tokens before the end: the 4 tokens after it move to the next window.
        let before = n - 5;
        let text = format!("{}, {}", words(before), words(10));
        let mut first = vec![a; before];
        first.push(comma);
        assert_eq!(
            chunks(&text),
            [expected_window(tok, &first), expected_window(tok, &[a; 10])]
        );
        // A comma further back than the backtrack distance: a plain cut.
        let before = n - COMMA_BACKTRACK - 2;
        let text = format!("{}, {}", words(before), words(COMMA_BACKTRACK + 5));
        let mut all = vec![a; before];
        all.push(comma);
        all.extend(vec![a; COMMA_BACKTRACK + 5]);
        assert_eq!(
            chunks(&text),
            [
                expected_window(tok, &all[..n]),
                expected_window(tok, &all[n..])
            ]
        );

        // BREAK ends a window; a leading BREAK gives an empty one, a trailing one nothing.
        assert_eq!(
            chunks("a a BREAK a"),
            [expected_window(tok, &[a, a]), expected_window(tok, &[a])]
        );
        assert_eq!(
            chunks("BREAK a BREAK"),
            [expected_window(tok, &[]), expected_window(tok, &[a])]
        );
        // Without weighting, BREAK and brackets are literal text.
        let literal = prompt_chunks(tok, "a BREAK (a:2)", false, LongPrompts::Chunk).unwrap();
        assert_eq!(literal.len(), 1);
        assert!(literal[0].is_unweighted());
        assert_eq!(
            content_of(tok, &literal[0]),
            tok.tokenize_content("a BREAK (a:2)").unwrap()
        );

        // Truncation keeps the first window's worth of tokens, ignoring BREAK.
        let truncated = prompt_chunks(
            tok,
            &format!("a BREAK {}", words(n + 5)),
            true,
            LongPrompts::Truncate,
        )
        .unwrap();
        assert_eq!(truncated.len(), 1);
        assert_eq!(truncated[0].ids, expected_window(tok, &vec![a; n]));

        // The empty prompt is one empty window, equal to the tokenizer's own encoding.
        assert_eq!(chunks(""), [tok.encode("").unwrap()]);
        assert_eq!(
            TokenChunk::empty(tok).ids,
            tok.encode("").unwrap(),
            "empty window"
        );
    }
}

#[test]
fn plain_prompts_give_the_diffusers_embeddings_by_default() {
    let g = goldens("goldens/encode_prompt.safetensors");
    let base = base_model();
    let refiner = refiner_model();
    let mut p = Parity::new();
    for case in encode_prompt_cases() {
        let name = &case.name;
        let model = case.model(&base, &refiner);
        // Our defaults (weighting on, long prompts chunked), not a replay of diffusers' call.
        let prompts = prompt_texts(&case.kwargs);
        let e = encode_prompt(model, &prompts).expect("encode_prompt");
        let window_len = pairs(model)[0].0.max_length();
        let k = e.prompt_embeds.dim(1).unwrap() / window_len;
        assert_eq!(e.prompt_embeds.dims(), e.negative_prompt_embeds.dims());
        let gname = |key: &str| format!("{name}.{key}");
        if k == 1 {
            for (key, t) in embeds_by_name(&e) {
                p.check(&gname(key), t, golden(&g, &gname(key)));
            }
            continue;
        }
        // A prompt diffusers truncates: the encoders are causal, so our first window agrees
        // with diffusers' up to the end of its content; the (short) negative's first window
        // is diffusers' negative.
        let prefix = pairs(model)
            .iter()
            .map(|(tok, _)| {
                let chunks = prompt_chunks(tok, &prompts.prompt, true, LongPrompts::Chunk).unwrap();
                content_of(tok, &chunks[0]).len() + 1
            })
            .min()
            .unwrap();
        println!("{name}: {k} windows; comparing the first {prefix} positions");
        let first = |t: &Tensor, len: usize| t.narrow(1, 0, len).unwrap();
        let golden_prompt = golden(&g, &gname("prompt_embeds"));
        p.check(
            &format!("{} (first {prefix} positions)", gname("prompt_embeds")),
            &first(&e.prompt_embeds, prefix),
            &first(golden_prompt, prefix),
        );
        p.check(
            &format!("{} (first window)", gname("negative_prompt_embeds")),
            &first(&e.negative_prompt_embeds, window_len),
            golden(&g, &gname("negative_prompt_embeds")),
        );
        p.check(
            &gname("negative_pooled_prompt_embeds"),
            &e.negative_pooled_prompt_embeds,
            golden(&g, &gname("negative_pooled_prompt_embeds")),
        );
    }
    p.finish();
}

/// `z·w` with the mean of `z` restored, per window, computed here in f64.
fn expected_weighting(z: &Tensor, weights: &[f32]) -> Tensor {
    let (_, s, h) = z.dims3().unwrap();
    let zs = flat_f64(z);
    let zw: Vec<f64> = zs
        .iter()
        .enumerate()
        .map(|(i, v)| v * f64::from(weights[i / h]))
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let scale = mean(&zs) / mean(&zw);
    let out: Vec<f32> = zw.iter().map(|v| (v * scale) as f32).collect();
    Tensor::from_vec(out, (1, s, h), &Device::Cpu).unwrap()
}

#[test]
fn weights_scale_tokens_and_restore_the_mean() {
    let base = base_model();
    let plain = manifest_prompts()
        .into_iter()
        .find(|p| p.split(' ').count() >= 4)
        .expect("a prompt of several words");
    let words: Vec<&str> = plain.split(' ').collect();
    let half = words.len() / 2;
    let weighted = format!(
        "[{}] ({}:1.5) {}",
        words[0],
        words[1..half].join(" "),
        words[half..].join(" ")
    );
    let encode = |text: &str, weighting: bool| {
        encode_prompt(
            &base,
            &Prompts {
                prompt: text.to_string(),
                weighting,
                ..Prompts::default()
            },
        )
        .unwrap()
    };
    let unweighted = encode(&plain, false);

    // Weight 1 everywhere gives the unweighted embeddings exactly.
    for text in [plain.clone(), format!("({plain}:1)")] {
        let e = encode(&text, true);
        assert_identical(
            &format!("{text:?} embeds"),
            &e.prompt_embeds,
            &unweighted.prompt_embeds,
        );
        assert_identical(
            &format!("{text:?} pooled"),
            &e.pooled_prompt_embeds,
            &unweighted.pooled_prompt_embeds,
        );
    }

    // A weighted prompt: same tokens, each encoder's window scaled as defined.
    let e = encode(&weighted, true);
    assert_identical(
        "pooled embedding (weights do not change it)",
        &e.pooled_prompt_embeds,
        &unweighted.pooled_prompt_embeds,
    );
    let mut p = Parity::new();
    let mut offset = 0;
    for (tok, enc) in pairs(&base) {
        let h = enc.config().hidden_size;
        let chunks = prompt_chunks(tok, &weighted, true, LongPrompts::Chunk).unwrap();
        let plain_chunks = prompt_chunks(tok, &plain, false, LongPrompts::Chunk).unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].ids, plain_chunks[0].ids, "same tokens");
        assert!(!chunks[0].is_unweighted());
        let z = unweighted
            .prompt_embeds
            .narrow(D::Minus1, offset, h)
            .unwrap();
        let ours = e.prompt_embeds.narrow(D::Minus1, offset, h).unwrap();
        let expected = expected_weighting(&z, &chunks[0].weights);
        p.check(
            &format!("encoder with hidden size {h}: z·w·mean(z)/mean(z·w)"),
            &ours,
            &expected,
        );
        // The window's mean is restored (up to f32 summation error, relative to mean |z'|).
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        let before = mean(flat_f64(&z));
        let after = mean(flat_f64(&ours));
        let scale = mean(flat_f64(&ours).iter().map(|v| v.abs()).collect());
        println!("mean before {before:.6e}, after {after:.6e}, mean |z'| {scale:.3e}");
        assert!((before - after).abs() <= 1e-5 * scale, "mean restored");
        offset += h;
    }
    p.finish();
}

/// Encodes one window alone with the raw encoder: (penultimate `[1, S, H]`, text embeds).
fn encode_alone(enc: &ClipTextModel, chunk: &TokenChunk) -> (Tensor, Option<Tensor>) {
    let ids = Tensor::new(chunk.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let out = enc.forward(&ids).unwrap();
    (out.penultimate, out.text_embeds)
}

#[test]
fn long_prompts_concatenate_windows_and_pad_the_other_side() {
    let base = base_model();
    let refiner = refiner_model();
    let short = manifest_prompts()
        .into_iter()
        .min_by_key(|p| p.len())
        .unwrap();
    let mut p = Parity::new();
    for (label, model) in [("base", &base), ("refiner", &refiner)] {
        let toks: Vec<&ClipTokenizer> = pairs(model).iter().map(|(t, _)| t).collect();
        let long = long_prompt(&toks, 1);
        for (positive, negative) in [(&long, Some(&short)), (&short, Some(&long)), (&long, None)] {
            let e = encode_prompt(
                model,
                &Prompts {
                    prompt: positive.clone(),
                    negative_prompt: negative.cloned(),
                    ..Prompts::default()
                },
            )
            .unwrap();
            let k = toks
                .iter()
                .map(|t| {
                    prompt_chunks(t, &long, true, LongPrompts::Chunk)
                        .unwrap()
                        .len()
                })
                .max()
                .unwrap();
            let len = toks[0].max_length();
            let ctx: usize = pairs(model)
                .iter()
                .map(|(_, m)| m.config().hidden_size)
                .sum();
            assert_eq!(e.prompt_embeds.dims(), [1, k * len, ctx], "{label}");
            assert_eq!(
                e.negative_prompt_embeds.dims(),
                [1, k * len, ctx],
                "{label}"
            );
            let sides = [
                (
                    "positive",
                    positive.as_str(),
                    &e.prompt_embeds,
                    &e.pooled_prompt_embeds,
                ),
                (
                    "negative",
                    negative.map_or("", |s| s.as_str()),
                    &e.negative_prompt_embeds,
                    &e.negative_pooled_prompt_embeds,
                ),
            ];
            for (side, text, embeds, pooled) in sides {
                let name = format!("{label} {side} ({} chars)", text.len());
                let zeroed = negative.is_none() && model.index.force_zeros_for_empty_prompt;
                if zeroed && side == "negative" {
                    assert!(flat_f64(embeds).iter().all(|&v| v == 0.0), "{name}: zeros");
                    continue;
                }
                // Every window equals that window encoded alone; missing ones are empty.
                let mut offset = 0;
                for (tok, enc) in pairs(model) {
                    let h = enc.config().hidden_size;
                    let mut chunks = prompt_chunks(tok, text, true, LongPrompts::Chunk).unwrap();
                    chunks.resize(k, TokenChunk::empty(tok));
                    for (i, chunk) in chunks.iter().enumerate() {
                        let (alone, text_embeds) = encode_alone(enc, chunk);
                        let ours = embeds
                            .narrow(1, i * len, len)
                            .unwrap()
                            .narrow(D::Minus1, offset, h)
                            .unwrap();
                        p.check(&format!("{name} encoder {h} window {i}"), &ours, &alone);
                        if let (0, Some(te)) = (i, text_embeds) {
                            p.check(&format!("{name} pooled = first window's"), pooled, &te);
                        }
                    }
                    offset += h;
                }
            }
        }
    }
    p.finish();
}

/// Records the shape of the UNet's text conditioning.
#[derive(Default)]
struct ContextShape(Option<Vec<usize>>);

impl StepObserver for ContextShape {
    fn wants_tensors(&self) -> bool {
        true
    }

    fn on_tensors(&mut self, t: &StepTensors<'_>) {
        self.0 = Some(t.conditioning.encoder_hidden_states.dims().to_vec());
    }
}

#[test]
fn long_weighted_prompt_generates_end_to_end() {
    let base = base_model();
    let m = manifest();
    let case: &Value = &m["t2i"].as_array().expect("t2i cases")[0];
    let kw = &case["kwargs"];
    let toks: Vec<&ClipTokenizer> = pairs(&base).iter().map(|(t, _)| t).collect();
    let long = long_prompt(&toks, 1);
    let prompt = format!(
        "({}:1.3), [{}] BREAK ((detailed)), {long}",
        kw["prompt"].as_str().unwrap(),
        kw["negative_prompt"].as_str().unwrap_or("blurry"),
    );
    let run = |weighting: bool| {
        let mut params = GenerateParams::new(prompt.clone());
        params.prompts.negative_prompt = kw["negative_prompt"].as_str().map(str::to_string);
        params.prompts.weighting = weighting;
        params.height = kw["height"].as_u64().unwrap() as usize;
        params.width = kw["width"].as_u64().unwrap() as usize;
        params.steps = kw["num_inference_steps"].as_u64().unwrap() as usize;
        params.guidance_scale = kw["guidance_scale"].as_f64().unwrap();
        params.seed = case["latents_seed"].as_u64().unwrap();
        let mut shape = ContextShape::default();
        let latents = text_to_image(&base, &params, None, RunControl::observing(&mut shape))
            .expect("text to image");
        (latents, shape.0.expect("a step ran"), params)
    };
    let (latents, context, params) = run(true);
    let k = toks
        .iter()
        .map(|t| {
            prompt_chunks(t, &prompt, true, LongPrompts::Chunk)
                .unwrap()
                .len()
        })
        .max()
        .unwrap();
    let ctx: usize = pairs(&base)
        .iter()
        .map(|(_, m)| m.config().hidden_size)
        .sum();
    println!("UNet context {context:?} for {k} windows");
    assert!(k >= 3, "BREAK plus a long prompt give several windows");
    assert_eq!(
        context,
        [2, k * toks[0].max_length(), ctx],
        "[negative; positive]"
    );
    let channels = base.unet_config().in_channels;
    let f = base.vae_config().downscale_factor();
    assert_eq!(
        latents.dims(),
        [1, channels, params.height / f, params.width / f]
    );
    assert!(flat_f64(&latents).iter().all(|v| v.is_finite()));
    let image = decode_latents(&base, &latents).unwrap();
    assert!(flat_f64(&image).iter().all(|v| v.is_finite()));

    // Literal text (weighting off) is a different conditioning, so a different result.
    let (literal, _, _) = run(false);
    let diff = max_abs_diff(&latents, &literal);
    println!("max |weighted - literal| latents: {diff:.3e}");
    assert!(diff > 0.0);
}

#[test]
fn weighted_long_prompts_keep_the_model_dtype() {
    let dir = common::base_dir();
    let f32_model = load_model(&dir, &LoadOptions::default());
    let f16_model = load_model(
        &dir,
        &LoadOptions {
            dtype: DType::F16,
            ..LoadOptions::default()
        },
    );
    let toks: Vec<&ClipTokenizer> = pairs(&f32_model).iter().map(|(t, _)| t).collect();
    let prompt = format!("((detailed:1.4)), [{}]", long_prompt(&toks, 1));
    let prompts = Prompts {
        prompt,
        negative_prompt: manifest_prompts().into_iter().next(),
        ..Prompts::default()
    };
    let full = encode_prompt(&f32_model, &prompts).unwrap();
    let half = encode_prompt(&f16_model, &prompts).unwrap();
    // f16 keeps ~3 significant digits through the encoders: a loose, stated tolerance.
    let mut p = Parity::with_tolerance(5e-3);
    for (name, ours, reference) in [
        ("prompt_embeds", &half.prompt_embeds, &full.prompt_embeds),
        (
            "negative_prompt_embeds",
            &half.negative_prompt_embeds,
            &full.negative_prompt_embeds,
        ),
    ] {
        assert_eq!(ours.dtype(), DType::F16, "{name}");
        p.check(&format!("f16 {name} vs f32"), ours, reference);
    }
    p.finish();
}
