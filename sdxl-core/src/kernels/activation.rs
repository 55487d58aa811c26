//! Activations in one vectorised, multi-threaded pass over f32 or bf16 CPU tensors: GEGLU
//! (`value · gelu(gate)`, the UNet feed-forward's), the exact GELU (OpenCLIP's) and quick GELU
//! (OpenAI CLIP's).
//!
//! As candle ops, GEGLU is three passes (two `narrow` views, `gelu_erf`, a multiply) and quick
//! GELU three more, and candle's `gelu_erf` evaluates `erf` from libm one element at a time
//! (about 5% of a bf16 UNet step). Here each input is read once and each output written once,
//! rows split across rayon's threads, with an `erf` built from vectorisable arithmetic
//! (Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7, with a polynomial `exp`): written
//! in AVX-512 intrinsics where the CPU has AVX-512 (`vector.rs`), else compiled for AVX2 or
//! plain code. bf16 values are computed in f32 and rounded once.

use std::mem::MaybeUninit;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::math::{self, Element, Values};
use super::storage::{assume_written, contiguous_values, unwritten};

/// The element-wise activations of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `a · gelu_erf(b)`.
    Geglu,
    /// `gelu_erf(a)`.
    GeluErf,
    /// `a · sigmoid(1.702 a)`.
    QuickGelu,
}

impl Activation {
    /// The activation of `a` (with the gate `b` for GEGLU), in f32: the portable definition,
    /// which `vector.rs` computes the same way on AVX-512.
    #[inline(always)]
    pub(crate) fn scalar(self, a: f32, b: f32) -> f32 {
        match self {
            Self::Geglu => a * math::gelu_erf(b),
            Self::GeluErf => math::gelu_erf(a),
            Self::QuickGelu => a / (1.0 + math::exp(-1.702 * a)),
        }
    }
}

/// Whether the kernels handle `x`: a CPU tensor in f32 or bf16 ([`geglu`] also needs an even
/// last dimension).
pub fn supports(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && matches!(x.dtype(), DType::F32 | DType::BF16)
}

/// `value · gelu_erf(gate)` where `value` and `gate` are the first and second halves of `h`'s
/// last dimension (diffusers' `GEGLU` after its projection). The result has `h`'s shape with
/// the last dimension halved, in `h`'s dtype.
///
/// # Errors
/// A tensor [`supports`] refuses, an odd last dimension, or a tensor operation fails.
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    let width = h.dims().last().copied().unwrap_or(0);
    if width % 2 != 0 {
        candle_core::bail!("geglu kernel: the last dim of {:?} is odd", h.dims())
    }
    let mut out_dims = h.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = width / 2;
    }
    map_rows(h, "geglu", width, out_dims, Activation::Geglu)
}

/// PyTorch's exact GELU, `x · Φ(x)`, element-wise, in `x`'s dtype.
///
/// # Errors
/// A tensor [`supports`] refuses, or a tensor operation fails.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    map_rows(x, "gelu", 0, x.dims().to_vec(), Activation::GeluErf)
}

/// Quick GELU, `x · sigmoid(1.702 x)`, element-wise, in `x`'s dtype.
///
/// # Errors
/// A tensor [`supports`] refuses, or a tensor operation fails.
pub fn quick_gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    map_rows(x, "quick gelu", 0, x.dims().to_vec(), Activation::QuickGelu)
}

/// Values per rayon task: enough that a task outweighs its scheduling.
const VALUES_PER_TASK: usize = 1 << 15;

/// `out = kind(a, b)` element-wise. With `width > 0`, every row of `width` values of `x` holds
/// `a` in its first half and `b` in its second, and the output rows are half as wide; with
/// `width == 0`, `a` is `x` itself (and `b` is unused).
fn map_rows(
    x: &Tensor,
    what: &str,
    width: usize,
    out_dims: Vec<usize>,
    kind: Activation,
) -> candle_core::Result<Tensor> {
    if !supports(x) {
        candle_core::bail!(
            "{what} kernel: needs an f32 or bf16 CPU tensor, got {:?} on {:?}",
            x.dtype(),
            x.device()
        )
    }
    match x.dtype() {
        DType::F32 => map_rows_typed::<f32>(x, width, out_dims, kind),
        _ => map_rows_typed::<bf16>(x, width, out_dims, kind),
    }
}

fn map_rows_typed<T: Values>(
    x: &Tensor,
    width: usize,
    out_dims: Vec<usize>,
    kind: Activation,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let input = contiguous_values::<T>(&storage, layout, "activation kernel")?;
    let out = if width == 0 {
        let mut out = unwritten::<T>(input.len());
        out.par_chunks_mut(VALUES_PER_TASK)
            .zip(input.par_chunks(VALUES_PER_TASK))
            .for_each(|(dst, src)| map_block(src, src, dst, kind));
        out
    } else {
        let inner = width / 2;
        let mut out = unwritten::<T>(input.len() / 2);
        if let Some(rows_per_task) = VALUES_PER_TASK.checked_div(inner) {
            let rows_per_task = rows_per_task.max(1);
            out.par_chunks_mut(rows_per_task * inner)
                .zip(input.par_chunks(rows_per_task * width))
                .for_each(|(dst, src)| {
                    for (d, s) in dst.chunks_exact_mut(inner).zip(src.chunks_exact(width)) {
                        let (a, b) = s.split_at(inner);
                        map_block(a, b, d, kind);
                    }
                });
        }
        out
    };
    drop(storage);
    // SAFETY: element-wise, `out`'s chunks pair one to one with the input's (same lengths);
    // row-wise, the input is whole rows of the even `width` (the last dimension), `out` half
    // as long, and chunks of whole rows pair up, each output row of `inner` values written
    // from one input row. `map_block` writes all of `out` from equally long `a` and `b`.
    let out = unsafe { assume_written(out) };
    Tensor::from_vec(out, out_dims, &Device::Cpu)
}

/// `out[j] = kind(a[j], b[j])` on the widest vector unit this CPU has: with AVX-512 in
/// intrinsics (`vector.rs`: no division, fused multiply-adds), else a loop the compiler
/// vectorises.
fn map_block<T: Values>(a: &[T], b: &[T], out: &mut [MaybeUninit<T>], kind: Activation) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::vector::available() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { super::vector::activation(kind, a, b, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { map_block_avx2(a, b, out, kind) };
        }
    }
    map_block_portable(a, b, out, kind);
}

/// [`map_block_portable`] compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn map_block_avx2<T: Element>(a: &[T], b: &[T], out: &mut [MaybeUninit<T>], kind: Activation) {
    map_block_portable(a, b, out, kind);
}

/// [`map_each`] with `kind` fixed outside the loop.
#[inline(always)]
fn map_block_portable<T: Element>(a: &[T], b: &[T], out: &mut [MaybeUninit<T>], kind: Activation) {
    use Activation::{Geglu, GeluErf, QuickGelu};
    match kind {
        Geglu => map_each(a, b, out, |x, y| Geglu.scalar(x, y)),
        GeluErf => map_each(a, b, out, |x, y| GeluErf.scalar(x, y)),
        QuickGelu => map_each(a, b, out, |x, y| QuickGelu.scalar(x, y)),
    }
}

/// `out[j] = f(a[j], b[j])` in one flat loop, which the compiler vectorises (with its own
/// remainder handling). Staging values through a block-sized array instead kept the array on
/// the stack, and each 64-byte store and reload of it stalled: about 7 cycles per value.
#[inline(always)]
fn map_each<T: Element>(a: &[T], b: &[T], out: &mut [MaybeUninit<T>], f: impl Fn(f32, f32) -> f32) {
    for ((d, &x), &y) in out.iter_mut().zip(a).zip(b) {
        d.write(T::store(f(x.load(), y.load())));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::test_support::max_abs_diff;

    #[test]
    fn gelu_matches_candle_gelu_erf() {
        let xs: Vec<f32> = (-20_000..=20_000).map(|i| i as f32 * 1e-3).collect();
        let want = Tensor::new(xs.as_slice(), &Device::Cpu)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let worst = xs
            .iter()
            .zip(&want)
            .map(|(&x, &w)| (math::gelu_erf(x) - w).abs() / (1.0 + x.abs()))
            .fold(0f32, f32::max);
        assert!(worst < 3e-7, "worst {worst:e}");
        assert_eq!(math::gelu_erf(-200.0), 0.0);
        assert_eq!(math::gelu_erf(200.0), 200.0);
        assert!(math::gelu_erf(f32::NAN).is_nan());
    }

    #[test]
    fn geglu_matches_candle_ops_in_f32_and_bf16() {
        let d = &Device::Cpu;
        // Rows and widths that are not multiples of the block or the task size.
        for shape in [(2, 3, 2 * 37), (1, 700, 2 * 1280)] {
            let h = (Tensor::randn(0f32, 1.0, shape, d).unwrap() * 3.0).unwrap();
            let inner = shape.2 / 2;
            let want = (h.narrow(2, 0, inner).unwrap()
                * h.narrow(2, inner, inner).unwrap().gelu_erf().unwrap())
            .unwrap();
            let got = geglu(&h).unwrap();
            assert_eq!(got.dims(), want.dims());
            let worst = max_abs_diff(&got, &want);
            assert!(worst < 1e-5, "f32 worst {worst:e}");
            let hb = h.to_dtype(DType::BF16).unwrap();
            let got = geglu(&hb).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let want = geglu(&hb.to_dtype(DType::F32).unwrap()).unwrap();
            let worst = max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want);
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(worst <= scale / 128.0, "bf16 worst {worst:e}");
        }
        let odd = Tensor::zeros((2, 5), DType::F32, d).unwrap();
        assert!(geglu(&odd).is_err());
    }

    #[test]
    fn gelu_and_quick_gelu_match_candle_ops() {
        let d = &Device::Cpu;
        let x = (Tensor::randn(0f32, 1.0, (3, 1000, 77), d).unwrap() * 4.0).unwrap();
        let quick = (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap();
        for (ours, theirs) in [
            (gelu_erf(&x).unwrap(), x.gelu_erf().unwrap()),
            (quick_gelu(&x).unwrap(), quick),
        ] {
            let worst = max_abs_diff(&ours, &theirs);
            assert!(worst < 3e-6, "worst {worst:e}");
        }
        let xb = x.to_dtype(DType::BF16).unwrap();
        let got = gelu_erf(&xb).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = gelu_erf(&xb.to_dtype(DType::F32).unwrap()).unwrap();
        assert!(max_abs_diff(&got, &want) <= 16.0 / 128.0);
        assert!(gelu_erf(&x.to_dtype(DType::F16).unwrap()).is_err());
    }
}
