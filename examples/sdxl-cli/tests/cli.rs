//! The `sdxl` binary end to end: the weight-free demo, a real (tiny) diffusers folder, and bad
//! input that must fail with one clear line and leave nothing on disk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures_root() -> PathBuf {
    match std::env::var_os("SDXL_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/fixtures"),
    }
}

/// The fixture folder whose `model_index.json` names `class`.
fn model_dir(class: &str) -> PathBuf {
    let root = fixtures_root();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("model_index.json").is_file())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .find(|d| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("model_index.json")).unwrap())
                    .unwrap();
            v["_class_name"] == class
        })
        .unwrap_or_else(|| panic!("no {class} under {}", root.display()))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdxl-cli-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sdxl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdxl"))
        .args(args)
        .output()
        .expect("the sdxl binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `parameters` text of a PNG, and its size.
fn png_info(path: &Path) -> (String, u32, u32) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|t| t.keyword == "parameters")
                .and_then(|t| t.get_text().ok())
        })
        .expect("a parameters chunk");
    (text, info.width, info.height)
}

#[test]
fn demo_writes_a_png_with_its_parameters() {
    let dir = scratch("demo");
    let out = dir.join("demo.png");
    let o = sdxl(&[
        "demo",
        "--prompt",
        "a lighthouse",
        "--negative-prompt",
        "blurry",
        "--steps",
        "3",
        "--seed",
        "7",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (text, w, h) = png_info(&out);
    assert_eq!((w, h), (64, 64));
    assert!(
        text.starts_with("a lighthouse\nNegative prompt: blurry\nSteps: 3,"),
        "{text}"
    );
    assert!(
        text.contains("Seed: 7") && text.contains("Size: 64x64"),
        "{text}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn generate_runs_a_diffusers_folder_and_numbers_several_images() {
    let dir = scratch("generate");
    let out = dir.join("img.png");
    let latents = dir.join("latents.safetensors");
    let model = model_dir("StableDiffusionXLPipeline");
    let o = sdxl(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a fox",
        "--width",
        "96",
        "--height",
        "64",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--scheduler",
        "dpmpp-2m",
        "--karras",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
        "--save-latents",
        latents.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for i in 0..2 {
        let (text, w, h) = png_info(&dir.join(format!("img-{i}.png")));
        assert_eq!((w, h), (96, 64));
        assert!(text.contains("Sampler: dpmpp-2m Karras"), "{text}");
    }
    let saved = candle_core::safetensors::load(&latents, &candle_core::Device::Cpu).unwrap();
    assert_eq!(saved["latents"].dims(), &[2, 4, 8, 12]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn low_memory_writes_the_same_image() {
    let dir = scratch("low-memory");
    let model = model_dir("StableDiffusionXLPipeline");
    let refiner = model_dir("StableDiffusionXLImg2ImgPipeline");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--refiner",
            refiner.to_str().unwrap(),
            "--prompt",
            "a fox",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "3",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = sdxl(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(out).unwrap()
    };
    assert_eq!(
        run("resident.png", &[]),
        run("low.png", &["--low-memory"]),
        "--low-memory changed the image"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn base_with_refiner_and_img2img_run() {
    let dir = scratch("refiner");
    let out = dir.join("refined.png");
    let base = model_dir("StableDiffusionXLPipeline");
    let refiner = model_dir("StableDiffusionXLImg2ImgPipeline");
    let o = sdxl(&[
        "generate",
        "--model",
        base.to_str().unwrap(),
        "--refiner",
        refiner.to_str().unwrap(),
        "--prompt",
        "a fox",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "5",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let again = dir.join("again.png");
    let o = sdxl(&[
        "generate",
        "--model",
        base.to_str().unwrap(),
        "--prompt",
        "a fox",
        "--steps",
        "4",
        "--init-image",
        out.to_str().unwrap(),
        "--strength",
        "0.5",
        "--quiet",
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_info(&again).1, 64);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_fails_with_one_line_and_writes_nothing() {
    let dir = scratch("bad");
    let out = dir.join("never.png");
    let o_str = out.to_str().unwrap();
    let base = model_dir("StableDiffusionXLPipeline");
    let refiner = model_dir("StableDiffusionXLImg2ImgPipeline");
    let (base, refiner) = (base.to_str().unwrap(), refiner.to_str().unwrap());
    let init = dir.join("init.png");
    let o = sdxl(&[
        "demo",
        "--prompt",
        "x",
        "--steps",
        "1",
        "--width",
        "96",
        "--quiet",
        "--out",
        init.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["demo", "--prompt", "x", "--width", "63"],
            "multiple of 8",
        ),
        (
            vec!["demo", "--prompt", "x", "--height", "0"],
            "multiple of 8",
        ),
        (vec!["demo", "--prompt", "x", "--steps", "0"], "steps"),
        (
            vec!["demo", "--prompt", "x", "--guidance", "NaN"],
            "guidance",
        ),
        (
            vec![
                "demo",
                "--prompt",
                "x",
                "--init-image",
                init.to_str().unwrap(),
                "--strength",
                "1.5",
            ],
            "strength",
        ),
        (
            vec![
                "demo",
                "--prompt",
                "x",
                "--init-image",
                init.to_str().unwrap(),
                "--width",
                "64",
            ],
            "init image",
        ),
        (
            vec!["generate", "--model", refiner, "--prompt", "x"],
            "refiner",
        ),
        (
            vec![
                "generate",
                "--model",
                base,
                "--refiner",
                base,
                "--prompt",
                "x",
            ],
            "not a refiner",
        ),
        (
            vec!["generate", "--model", "/nonexistent/sdxl", "--prompt", "x"],
            "not found",
        ),
        (
            vec!["demo", "--prompt", "x", "--scheduler", "nope"],
            "invalid value",
        ),
    ];
    for (args, expected) in cases {
        let mut args = args;
        args.extend(["--out", o_str]);
        let o = sdxl(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            err.to_lowercase().contains(expected),
            "{args:?}: `{err}` lacks `{expected}`"
        );
        assert!(!out.exists(), "{args:?} left a file behind");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
