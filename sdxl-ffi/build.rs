//! Composes the version string returned by `sdxl_version()`: this crate's version, the candle
//! version it was built against (from the workspace `Cargo.lock`) and the enabled features.

use std::path::Path;

/// The `version = "…"` of package `name` in a `Cargo.lock`.
fn locked_version(lock: &str, name: &str) -> Option<String> {
    let needle = format!("name = \"{name}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == needle {
            let next = lines.next()?;
            let v = next
                .trim()
                .strip_prefix("version = \"")?
                .strip_suffix('"')?;
            return Some(v.to_string());
        }
    }
    None
}

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let lock_path = Path::new(&manifest_dir).join("..").join("Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock_path.display());
    println!("cargo:rerun-if-changed=build.rs");
    let candle = std::fs::read_to_string(&lock_path)
        .ok()
        .and_then(|lock| locked_version(&lock, "candle-core"))
        .unwrap_or_else(|| "unknown".to_string());
    let features: Vec<&str> = ["cuda", "cudnn", "metal", "mkl", "accelerate", "flash-attn"]
        .into_iter()
        .filter(|f| {
            let var = format!("CARGO_FEATURE_{}", f.to_uppercase().replace('-', "_"));
            std::env::var_os(var).is_some()
        })
        .collect();
    let features = if features.is_empty() {
        "cpu".to_string()
    } else {
        format!("cpu, {}", features.join(", "))
    };
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!(
        "cargo:rustc-env=SDXL_VERSION_STRING=sdxl {version} (candle {candle}; features: {features})"
    );
}
