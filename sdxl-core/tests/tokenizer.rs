//! Token-id parity with transformers' `CLIPTokenizer` on every case of `tokens.json`, for each
//! tokenizer it records, loaded both from the model folders (`vocab.json` + `merges.txt`) and
//! from the standalone `tokenizer_json/<name>/tokenizer.json`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use sdxl_core::text::tokenizer::ClipTokenizer;
use sdxl_core::Error;
use serde_json::Value;

fn ids(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .expect("token ids are an array")
        .iter()
        .map(|v| v.as_i64().expect("token id is an integer"))
        .collect()
}

fn widen(ids: &[u32]) -> Vec<i64> {
    ids.iter().map(|&id| i64::from(id)).collect()
}

/// The prompt exactly as its recorded UTF-8 bytes spell it.
fn prompt(case: &Value) -> String {
    let hex = case["prompt_utf8_hex"].as_str().expect("prompt_utf8_hex");
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex byte"))
        .collect();
    let text = String::from_utf8(bytes).expect("prompt is UTF-8");
    assert_eq!(
        case["prompt"].as_str(),
        Some(text.as_str()),
        "prompt vs its hex"
    );
    text
}

/// Every way of loading each tokenizer recorded in `tokens.json`: `(label, name, tokenizer)`.
fn sources(tokens: &Value) -> Vec<(String, String, ClipTokenizer)> {
    let names: Vec<String> = tokens["pad_id"]
        .as_object()
        .expect("tokens.json has per-tokenizer `pad_id`")
        .keys()
        .cloned()
        .collect();
    let model_dirs = [common::base_dir(), common::refiner_dir()];
    let mut out = Vec::new();
    for name in names {
        let folders: Vec<PathBuf> = model_dirs
            .iter()
            .map(|d| d.join(&name))
            .filter(|d| d.is_dir())
            .collect();
        let base_folder = common::base_dir().join(&name);
        assert!(base_folder.is_dir(), "{} missing", base_folder.display());
        for folder in &folders {
            let tok = ClipTokenizer::from_dir(folder)
                .unwrap_or_else(|e| panic!("{}: {e}", folder.display()));
            out.push((folder.display().to_string(), name.clone(), tok));
        }
        let json = common::fixtures_root()
            .join("tokenizer_json")
            .join(&name)
            .join("tokenizer.json");
        let tok = ClipTokenizer::from_files(&json, Some(&base_folder))
            .unwrap_or_else(|e| panic!("{}: {e}", json.display()));
        out.push((json.display().to_string(), name, tok));
    }
    out
}

#[test]
fn token_ids_match_transformers() {
    let tokens = common::tokens();
    let cases = tokens["cases"].as_array().expect("tokens.json has `cases`");
    assert!(!cases.is_empty(), "tokens.json has no cases");
    let mut parity = common::Parity::new();
    for (label, name, tok) in sources(&tokens) {
        println!("{label}");
        parity.check_exact(
            &format!("{label} special ids [bos, eos, pad, max_length]"),
            &[
                i64::from(tok.bos_id()),
                i64::from(tok.eos_id()),
                i64::from(tok.pad_id()),
                i64::try_from(tok.max_length()).unwrap(),
            ],
            &[
                tokens["bos_id"].as_i64().unwrap(),
                tokens["eos_id"].as_i64().unwrap(),
                tokens["pad_id"][&name].as_i64().unwrap(),
                tokens["max_length"].as_i64().unwrap(),
            ],
        );
        for case in cases {
            let case_name = case["name"].as_str().expect("case name");
            let text = prompt(case);
            let golden = &case[&name];
            parity.check_exact(
                &format!("{name}/{case_name} input_ids"),
                &widen(&tok.encode(&text).unwrap()),
                &ids(&golden["input_ids"]),
            );
            let untruncated = ids(&golden["untruncated_ids"]);
            parity.check_exact(
                &format!("{name}/{case_name} untruncated_ids"),
                &widen(&tok.encode_untruncated(&text).unwrap()),
                &untruncated,
            );
            parity.check_exact(
                &format!("{name}/{case_name} content tokens"),
                &widen(&tok.tokenize_content(&text).unwrap()),
                &untruncated[1..untruncated.len() - 1],
            );
        }
    }
    parity.finish();
}

#[test]
fn missing_tokenizer_folder_is_not_found() {
    let missing = common::fixtures_root()
        .join("no-such-model")
        .join("tokenizer");
    match ClipTokenizer::from_dir(&missing) {
        Err(Error::NotFound { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected NotFound, got {other:?}"),
    }
    let json = common::fixtures_root().join("no-such-tokenizer.json");
    match ClipTokenizer::from_files(&json, None) {
        Err(Error::NotFound { path, .. }) => assert_eq!(path, json),
        other => panic!("expected NotFound, got {other:?}"),
    }
}
