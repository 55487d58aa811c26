//! Builds the C programs of `tests/c` and `examples/c` against `include/sdxl.h` and the static
//! library, and runs them: header-only compiles (C11 and C++17 with `-Werror`), the struct
//! layout, every bad input, and the whole lifecycle under AddressSanitizer/UBSan (with
//! LeakSanitizer: no leaks allowed).
//!
//! The static library is the `libsdxl.a` that cargo builds into `target/<profile>/deps` along
//! with the rlib these tests link (a dependency library is compiled with all its crate types);
//! if it is missing, the test runs `cargo build -p sdxl-ffi --lib` with the same profile and
//! target directory. So `cargo test` and `cargo test --release` both work with no extra step.
//! The compilers are `$CC`/`$CXX` or `cc`/`c++`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../sdxl-core/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `target/<profile>`, from the path of this test binary (`target/<profile>/deps/…`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// The static library: the `libsdxl.a` cargo wrote to `target/<profile>/deps` while building
/// the library for these tests (cargo emits every crate type of a dependency library there),
/// or, when it is absent, one built now with `cargo build -p sdxl-ffi --lib` in the same
/// profile and target directory.
fn staticlib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let profile_dir = profile_dir();
        let built_for_tests = profile_dir.join("deps").join("libsdxl.a");
        if built_for_tests.is_file() {
            return built_for_tests;
        }
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile directory name")
            .to_string();
        let target_dir = profile_dir.parent().expect("target directory");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "sdxl-ffi", "--lib", "--target-dir"])
            .arg(target_dir)
            .current_dir(repo_root());
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p sdxl-ffi failed");
        let lib = profile_dir.join("libsdxl.a");
        assert!(lib.is_file(), "{} was not built", lib.display());
        lib
    })
}

/// Where the compiled programs go.
fn out_dir() -> PathBuf {
    let dir = profile_dir().join("sdxl-c-tests");
    std::fs::create_dir_all(&dir).expect("create the C test output folder");
    dir
}

fn compiler(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

const WARNINGS: [&str; 4] = ["-Wall", "-Wextra", "-Wpedantic", "-Werror"];
const SANITIZE: &str = "-fsanitize=address,undefined";
/// What a Rust static library needs from the system on Linux.
const SYSTEM_LIBS: [&str; 6] = ["-lpthread", "-ldl", "-lm", "-lrt", "-lutil", "-lgcc_s"];

fn check(output: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(output.status.success(), "{what} failed: {}", output.status);
    stdout
}

/// Compiles and links a C program against the static library.
fn build_c(source: &Path, name: &str, sanitize: bool) -> PathBuf {
    let exe = out_dir().join(name);
    let mut cmd = Command::new(compiler("CC", "cc"));
    cmd.args(["-std=c11", "-g", "-O1"]).args(WARNINGS);
    if sanitize {
        cmd.args([
            SANITIZE,
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=all",
        ]);
    }
    cmd.arg("-I")
        .arg(repo_root().join("include"))
        .arg(source)
        .arg(staticlib())
        .args(SYSTEM_LIBS)
        .arg("-o")
        .arg(&exe);
    check(
        cmd.output().expect("run the C compiler"),
        "compiling the C program",
    );
    exe
}

/// Runs a program built with sanitizers; any ASan/UBSan/LSan report fails it.
fn run_sanitized(exe: &Path, args: &[&Path]) -> String {
    let output = Command::new(exe)
        .args(args)
        .env(
            "ASAN_OPTIONS",
            "detect_leaks=1:abort_on_error=0:exitcode=86:halt_on_error=1",
        )
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        .output()
        .expect("run the C program");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("Sanitizer"),
        "sanitizer report from {}:\n{stderr}",
        exe.display()
    );
    check(output, &exe.display().to_string())
}

#[test]
fn header_compiles_alone_as_c11_and_cpp17() {
    let include = repo_root().join("include");
    let dir = out_dir();
    for (compiler, std, file) in [
        (compiler("CC", "cc"), "-std=c11", "header_only.c"),
        (compiler("CXX", "c++"), "-std=c++17", "header_only.cpp"),
    ] {
        let output = Command::new(&compiler)
            .arg(std)
            .args(WARNINGS)
            .arg("-I")
            .arg(&include)
            .arg("-c")
            .arg(repo_root().join("tests/c").join(file))
            .arg("-o")
            .arg(dir.join(format!("{file}.o")))
            .output()
            .expect("run the compiler");
        check(output, &format!("{compiler} {std} {file}"));
    }
}

#[test]
fn c_layout_matches_rust() {
    use sdxl::{sdxl_generate_params as P, sdxl_job_progress as J, sdxl_load_options as L};
    use std::mem::{align_of, offset_of, size_of};

    let exe = build_c(&repo_root().join("tests/c/layout.c"), "layout", false);
    let out = check(Command::new(&exe).output().expect("run layout"), "layout");
    let layout: serde_json::Value = serde_json::from_str(&out).expect("layout prints JSON");
    assert_eq!(layout["abi_version"], sdxl::SDXL_ABI_VERSION);
    let structs = layout["structs"].as_object().expect("structs");
    macro_rules! rust_layout {
        ($t:ty, $($f:ident),+) => {
            (size_of::<$t>(), align_of::<$t>(), vec![$((stringify!($f), offset_of!($t, $f))),+])
        };
    }
    let rust = [
        (
            "sdxl_load_options",
            rust_layout!(
                L,
                struct_size,
                device,
                device_index,
                dtype,
                vae_dtype,
                variant
            ),
        ),
        (
            "sdxl_job_progress",
            rust_layout!(
                J,
                struct_size,
                stage,
                step,
                total,
                status,
                done,
                elapsed_seconds
            ),
        ),
        (
            "sdxl_generate_params",
            rust_layout!(
                P,
                struct_size,
                width,
                height,
                steps,
                num_images,
                scheduler,
                karras,
                timestep_spacing,
                prediction_type,
                original_width,
                original_height,
                crop_top,
                crop_left,
                target_width,
                target_height,
                negative_original_width,
                negative_original_height,
                negative_crop_top,
                negative_crop_left,
                negative_target_width,
                negative_target_height,
                init_image_format,
                init_image_stride,
                seed,
                guidance_scale,
                guidance_rescale,
                strength,
                refiner_start,
                aesthetic_score,
                negative_aesthetic_score,
                prompt,
                prompt_2,
                negative_prompt,
                negative_prompt_2,
                init_image,
                init_image_len,
                refiner,
                cancel,
                progress,
                progress_user_data,
                preview,
                preview_user_data
            ),
        ),
    ];
    assert_eq!(structs.len(), rust.len(), "layout.c lists other structs");
    for (name, (size, align, fields)) in rust {
        let c = &structs[name];
        assert_eq!(c["size"], size, "{name} size");
        assert_eq!(c["align"], align, "{name} align");
        let c_fields = c["fields"].as_object().expect("fields");
        assert_eq!(c_fields.len(), fields.len(), "{name}: field count");
        for (field, offset) in &fields {
            assert_eq!(c_fields[*field], *offset, "{name}.{field} offset");
        }
        println!(
            "{name}: size {size}, align {align}, {} fields agree",
            fields.len()
        );
    }
}

#[test]
fn bad_input_gives_the_documented_statuses() {
    let exe = build_c(&repo_root().join("tests/c/bad_input.c"), "bad_input", true);
    let out = run_sanitized(&exe, &[&common::base_dir()]);
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

#[test]
fn generate_example_runs_clean_under_sanitizers() {
    let exe = build_c(&repo_root().join("examples/c/generate.c"), "generate", true);
    let image = out_dir().join("generate.ppm");
    let _ = std::fs::remove_file(&image);
    let out = run_sanitized(&exe, &[&common::base_dir(), &image]);
    assert!(out.contains("0 failure(s)"), "{out}");
    let ppm = std::fs::read(&image).expect("the example wrote its image");
    assert!(ppm.starts_with(b"P6\n64 64\n255\n"));
    assert_eq!(ppm.len(), b"P6\n64 64\n255\n".len() + 64 * 64 * 3);
}
