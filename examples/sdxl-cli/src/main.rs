//! `sdxl`: generate images with Stable Diffusion XL.
//!
//! `sdxl generate --model DIR --prompt TEXT --out image.png` runs a diffusers SDXL folder;
//! `sdxl demo` builds a tiny random-weight SDXL on the fly and runs the same path with no
//! downloaded weights; `sdxl bench --model DIR` times the full-size components.

mod args;
mod bench;
mod demo;
mod png_io;
mod run;

use clap::Parser;

/// Spin iterations of candle's element-wise worker threads before they sleep, unless the user
/// sets `CANDLE_BARRIER_POOL_SPIN_LIMIT`. candle's default (25,000, about half a millisecond)
/// keeps a core busy after every element-wise op while our GEMMs run on rayon's threads; on a
/// 2-core machine a bf16 UNet step is about 3% faster with this limit.
const CANDLE_SPIN_LIMIT: &str = "2000";

fn main() -> std::process::ExitCode {
    // Before any thread exists (candle reads it when it first starts its pool).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
    let cli = args::Cli::parse();
    match run::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
