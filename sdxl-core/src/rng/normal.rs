//! torch's two CPU algorithms for standard normal float32 samples (`normal_kernel` in ATen's
//! `native/cpu/DistributionTemplates.h`).
//!
//! - 16 or more values (contiguous float32): all uniforms are drawn first, then Box–Muller runs
//!   over blocks of 16, pairing value `i` with `i + 8` (cosine into the first half, sine into the
//!   second). When the count is not a multiple of 16, 16 fresh uniforms replace the last 16
//!   values and that block is transformed again. x86-64 builds run the block transform with the
//!   AVX kernel in float32, reproduced in [`super::mathfun`].
//! - Fewer than 16: one `at::normal_distribution<double>` sample per value, cast to float32.
//!   Each Box–Muller pair yields two doubles; the sine half is cached in the generator and
//!   returned by the next scalar draw, even one in a later call.

use super::mathfun;
use super::mt19937::Mt19937;

/// The block size of the vectorised path.
const BLOCK: usize = 16;
/// 2π rounded to float32, as the AVX kernel holds it.
const TWO_PI_F32: f32 = std::f64::consts::TAU as f32;

/// Box–Muller over one block of exactly 16 uniforms, in place.
fn transform_block(block: &mut [f32]) {
    let (firsts, seconds) = block.split_at_mut(BLOCK / 2);
    for (a, b) in firsts.iter_mut().zip(seconds.iter_mut()) {
        // [0, 1) -> (0, 1] for the logarithm.
        let radius = (-2.0 * mathfun::log(1.0 - *a)).sqrt();
        let (sin, cos) = mathfun::sin_cos(TWO_PI_F32 * *b);
        // torch finishes with fma(n, std, mean), exact for std 1 and mean 0.
        *a = radius * cos;
        *b = radius * sin;
    }
}

/// Fills `out` with standard normal samples exactly as `torch.randn` on the CPU in float32,
/// continuing the generator state (`engine` and the cached scalar sample).
pub(crate) fn fill(engine: &mut Mt19937, cached: &mut Option<f64>, out: &mut [f32]) {
    if out.len() < BLOCK {
        for v in out.iter_mut() {
            *v = scalar_sample(engine, cached) as f32;
        }
        return;
    }
    for v in out.iter_mut() {
        *v = engine.uniform_f32();
    }
    out.chunks_exact_mut(BLOCK).for_each(transform_block);
    if !out.len().is_multiple_of(BLOCK) {
        // Recompute the last 16 values from fresh uniforms (they overlap the last full block).
        if let Some(last) = out.get_mut(out.len() - BLOCK..) {
            for v in last.iter_mut() {
                *v = engine.uniform_f32();
            }
            transform_block(last);
        }
    }
}

/// One `at::normal_distribution<double>(0, 1)` sample, using and refilling the cached second
/// value of the previous pair.
fn scalar_sample(engine: &mut Mt19937, cached: &mut Option<f64>) -> f64 {
    if let Some(v) = cached.take() {
        return v;
    }
    let u1 = engine.uniform_f64();
    let u2 = engine.uniform_f64();
    let radius = (-2.0 * (-u2).ln_1p()).sqrt();
    let (sin, cos) = (std::f64::consts::TAU * u1).sin_cos();
    *cached = Some(radius * sin);
    radius * cos
}
