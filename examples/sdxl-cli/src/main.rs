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

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    match run::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
