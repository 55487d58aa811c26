//! Micro-benchmark of the native bf16 GEMM against candle's bf16 and f32 matmuls.
//!
//! `cargo run --release -p sdxl-core --example bench_bf16_gemm [-- ours] [-- MxKxN[t] ...]`
//!
//! Prints GFLOP/s (min time of several runs) at 1 and 2 threads for the SDXL-shaped GEMMs.
//! A shape suffixed `t` multiplies by a transposed weight (`B = W^T`, `W [n, k]` row-major),
//! as a Linear layer does; otherwise B is row-major `[k, n]`. With `ours` only our kernel runs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use half::bf16;
use sdxl_core::kernels::bf16_gemm::{gemm_bf16, native_available, MatMut, MatRef};

/// Seconds of the fastest of several runs of `f` (at least 3 runs, at most ~2 s in all).
fn time_min(mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut runs = 0;
    while runs < 3 || (start.elapsed() < Duration::from_millis(1500) && runs < 50) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    best
}

fn parse(s: &str) -> (usize, usize, usize, bool) {
    let transposed = s.ends_with('t');
    let dims: Vec<usize> = s
        .trim_end_matches('t')
        .split('x')
        .map(|d| d.parse().unwrap())
        .collect();
    (dims[0], dims[1], dims[2], transposed)
}

fn main() -> anyhow_free::Result {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ours_only = args.iter().any(|a| a == "ours");
    let mut shapes: Vec<String> = args.iter().filter(|a| a.contains('x')).cloned().collect();
    if shapes.is_empty() {
        shapes = [
            "1024x1024x1024",
            "2048x2048x2048",
            "2048x640x640t",
            "2048x640x2560t",
            "154x1280x1280t",
            "154x1280x5120t",
            "640x5760x1024",
        ]
        .map(String::from)
        .to_vec();
    }
    println!("native AVX512-BF16 kernel: {}", native_available());
    println!(
        "{:<16} {:>3} {:>9} {:>11} {:>10}",
        "m x k x n", "thr", "ours bf16", "candle bf16", "candle f32"
    );
    for s in &shapes {
        let (m, k, n, transposed) = parse(s);
        let flops = 2.0 * (m * k * n) as f64 / 1e9;
        let a32 = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let b32 = if transposed {
            Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?.t()?
        } else {
            Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?
        };
        let a16 = a32.to_dtype(DType::BF16)?;
        let b16 = b32.to_dtype(DType::BF16)?;
        let av: Vec<bf16> = a16.flatten_all()?.to_vec1()?;
        let bv: Vec<bf16> = if transposed {
            b16.t()?.flatten_all()?.to_vec1()?
        } else {
            b16.flatten_all()?.to_vec1()?
        };
        let mut c = vec![bf16::ZERO; m * n];
        for threads in [1usize, 2] {
            let ours = time_min(|| {
                let a = MatRef::row_major(&av, m, k).unwrap();
                let b = if transposed {
                    MatRef::row_major(&bv, n, k).unwrap().t()
                } else {
                    MatRef::row_major(&bv, k, n).unwrap()
                };
                let cm = MatMut::row_major(&mut c, m, n).unwrap();
                gemm_bf16(a, b, cm, false, threads).unwrap();
            });
            let (cb, cf) = if ours_only {
                (f64::NAN, f64::NAN)
            } else {
                // candle reads its thread count from RAYON_NUM_THREADS at every matmul.
                std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
                let cb = time_min(|| {
                    a16.matmul(&b16).unwrap();
                });
                let cf = time_min(|| {
                    a32.matmul(&b32).unwrap();
                });
                (cb, cf)
            };
            println!(
                "{:<16} {:>3} {:>9.1} {:>11.1} {:>10.1}",
                s,
                threads,
                flops / ours,
                flops / cb,
                flops / cf
            );
        }
    }
    Ok(())
}

/// A tiny stand-in for `anyhow` (no extra dev-dependency).
mod anyhow_free {
    /// Any error, printed by `main`.
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}
