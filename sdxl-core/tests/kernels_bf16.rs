//! The native bf16 GEMM against candle's f32 matmul of the same (bf16-rounded) inputs.
//!
//! Tolerances:
//! - f32 output (`gemm_bf16::<f32>`): `max |ours - ref| / max |ref| <= 1e-5`; both sides sum
//!   exact bf16 products in f32, so they differ only by f32 summation order.
//! - bf16 output (`matmul`, `linear`): each element within half a bf16 ulp of the f32 reference
//!   (`|ours - ref| <= 2^-8 |ref|`), plus the same 1e-5 of `max |ref|` for summation order;
//!   `linear` adds its bias in f32 before rounding, so it gets the same allowance.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Device, IndexOp, Tensor};
use half::bf16;
use sdxl_core::kernels::bf16_gemm::{gemm_bf16, native_available, MatMut, MatRef};
use sdxl_core::kernels::matmul::{linear, matmul};

/// Tolerance for f32 summation-order differences, relative to `max |ref|`.
const SUM_TOL: f32 = 1e-5;
/// Half a bf16 ulp, relative (8 significant bits).
const HALF_ULP: f32 = 1.0 / 256.0;

fn randn_bf16(shape: &[usize], seed: u64) -> Tensor {
    // candle's CPU randn is not seedable per call; derive values from a tiny LCG instead.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

fn f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Checks bf16 `got` against the f32 reference; returns (worst normalised error, exact share).
fn check_bf16(got: &Tensor, want: &Tensor, rounding_steps: f32, what: &str) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), DType::BF16, "{what}: dtype");
    let (g, w) = (f32_vec(got), f32_vec(want));
    let max_ref = w.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut worst = 0f32;
    let mut exact = 0usize;
    for (x, y) in g.iter().zip(&w) {
        let allowed = rounding_steps * HALF_ULP * y.abs() + SUM_TOL * max_ref + f32::MIN_POSITIVE;
        let err = (x - y).abs();
        worst = worst.max(err / allowed);
        exact += usize::from(bf16::from_f32(*y).to_f32() == *x);
    }
    let share = exact as f32 / g.len().max(1) as f32;
    assert!(worst <= 1.0, "{what}: error {worst} of the allowance");
    (worst, share)
}

fn reference(a: &Tensor, b: &Tensor) -> Tensor {
    a.to_dtype(DType::F32)
        .unwrap()
        .matmul(&b.to_dtype(DType::F32).unwrap())
        .unwrap()
}

#[test]
fn native_kernel_is_detected_on_this_cpu() {
    // Informational: the remaining tests pass either way (fallback to candle).
    println!("native AVX512-BF16: {}", native_available());
}

#[test]
fn matmul_matches_f32_reference_on_ragged_shapes() {
    let shapes = [
        (1, 1, 1),
        (5, 1, 7),
        (1, 9, 40),
        (13, 3, 33),
        (12, 64, 32),
        (37, 255, 70),
        (100, 513, 129),
        (193, 258, 531),
    ];
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        let seed = i as u64 * 4;
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if a_t {
                randn_bf16(&[k, m], seed).t().unwrap()
            } else {
                randn_bf16(&[m, k], seed)
            };
            let b = if b_t {
                randn_bf16(&[n, k], seed + 1).t().unwrap()
            } else {
                randn_bf16(&[k, n], seed + 1)
            };
            let got = matmul(&a, &b).unwrap();
            let (worst, exact) = check_bf16(
                &got,
                &reference(&a, &b),
                1.0,
                &format!("{m}x{k}x{n} a_t={a_t} b_t={b_t}"),
            );
            println!(
                "{m}x{k}x{n} a_t={a_t} b_t={b_t}: worst {worst:.3} of allowance, {exact:.4} exact"
            );
        }
    }
}

#[test]
fn batched_matmul_with_strided_views_matches_reference() {
    // [2, 3, m, k] x [2, 3, k, n] with B a transposed view and A a permuted (non-contiguous)
    // view, as attention's q . k^T produces.
    let (m, k, n) = (77, 40, 50);
    let a = randn_bf16(&[3, 2, m, k], 10).transpose(0, 1).unwrap();
    let b = randn_bf16(&[2, 3, n, k], 11).transpose(2, 3).unwrap();
    assert!(!a.is_contiguous() && !b.is_contiguous());
    let got = matmul(&a, &b).unwrap();
    let (worst, exact) = check_bf16(&got, &reference(&a, &b), 1.0, "batched");
    println!("batched: worst {worst:.3}, {exact:.4} exact");
    // 3-D with a broadcast (stride 0) batch of B.
    let b2 = randn_bf16(&[1, k, n], 12).broadcast_as((4, k, n)).unwrap();
    let a2 = randn_bf16(&[4, m, k], 13);
    let got = matmul(&a2, &b2).unwrap();
    check_bf16(&got, &reference(&a2, &b2), 1.0, "broadcast batch");
    // A narrowed view (start offset != 0).
    let a3 = randn_bf16(&[m + 5, k + 3], 14)
        .i((2..m + 2, 1..k + 1))
        .unwrap();
    let b3 = randn_bf16(&[k, n], 15);
    let got = matmul(&a3, &b3).unwrap();
    check_bf16(&got, &reference(&a3, &b3), 1.0, "narrowed");
}

#[test]
fn large_sdxl_shapes_match_reference_in_f32_and_bf16() {
    // (m, k, n, B is a transposed weight)
    for (i, &(m, k, n, b_t)) in [
        (2048, 640, 640, true),
        (154, 1280, 5120, true),
        (640, 5760, 1024, false),
    ]
    .iter()
    .enumerate()
    {
        let a = randn_bf16(&[m, k], 20 + i as u64);
        let b = if b_t {
            randn_bf16(&[n, k], 30 + i as u64).t().unwrap()
        } else {
            randn_bf16(&[k, n], 30 + i as u64)
        };
        let want = reference(&a, &b);
        // f32 output through the slice API.
        let av: Vec<bf16> = a.flatten_all().unwrap().to_vec1().unwrap();
        let bv: Vec<bf16> = if b_t {
            b.t().unwrap().flatten_all().unwrap().to_vec1().unwrap()
        } else {
            b.flatten_all().unwrap().to_vec1().unwrap()
        };
        let bm = if b_t {
            MatRef::row_major(&bv, n, k).unwrap().t()
        } else {
            MatRef::row_major(&bv, k, n).unwrap()
        };
        let mut c = vec![0f32; m * n];
        gemm_bf16(
            MatRef::row_major(&av, m, k).unwrap(),
            bm,
            MatMut::row_major(&mut c, m, n).unwrap(),
            false,
            2,
        )
        .unwrap();
        let w = f32_vec(&want);
        let max_ref = w.iter().fold(0f32, |acc, x| acc.max(x.abs()));
        let max_err = c
            .iter()
            .zip(&w)
            .fold(0f32, |acc, (x, y)| acc.max((x - y).abs()));
        let rel = max_err / max_ref;
        println!("{m}x{k}x{n} f32 out: max|err| {max_err:e}, / max|ref| = {rel:e}");
        assert!(rel <= SUM_TOL, "{m}x{k}x{n}: {rel:e}");
        // bf16 output through the tensor API.
        let got = matmul(&a, &b).unwrap();
        let (worst, exact) = check_bf16(&got, &want, 1.0, &format!("{m}x{k}x{n} bf16"));
        println!("{m}x{k}x{n} bf16 out: worst {worst:.3} of allowance, {exact:.4} exact");
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let (m, k, n) = (300, 1001, 700);
    let a = randn_bf16(&[m, k], 40);
    let b = randn_bf16(&[k, n], 41);
    let av: Vec<bf16> = a.flatten_all().unwrap().to_vec1().unwrap();
    let bv: Vec<bf16> = b.flatten_all().unwrap().to_vec1().unwrap();
    let run = |threads: usize| {
        let mut c = vec![0f32; m * n];
        gemm_bf16(
            MatRef::row_major(&av, m, k).unwrap(),
            MatRef::row_major(&bv, k, n).unwrap(),
            MatMut::row_major(&mut c, m, n).unwrap(),
            false,
            threads,
        )
        .unwrap();
        c
    };
    let one = run(1);
    for threads in [2, 3, 4, 16] {
        let other = run(threads);
        assert!(
            one.iter()
                .zip(&other)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "threads={threads} differs from threads=1"
        );
    }
}

#[test]
fn linear_matches_reference_with_and_without_bias() {
    let x = randn_bf16(&[2, 77, 320], 50);
    let w = randn_bf16(&[640, 320], 51);
    let bias = randn_bf16(&[640], 52);
    let xw = reference(&x.reshape((154, 320)).unwrap(), &w.t().unwrap())
        .reshape((2, 77, 640))
        .unwrap();
    let got = linear(&x, &w, None).unwrap();
    check_bf16(&got, &xw, 1.0, "linear");
    let want = xw
        .broadcast_add(&bias.to_dtype(DType::F32).unwrap())
        .unwrap();
    let got = linear(&x, &w, Some(&bias)).unwrap();
    let (worst, exact) = check_bf16(&got, &want, 1.0, "linear + bias");
    println!("linear + bias: worst {worst:.3}, {exact:.4} exact");
    assert!(
        linear(&x, &w.t().unwrap(), None).is_err(),
        "in/out mismatch"
    );
}

#[test]
fn other_dtypes_and_bad_shapes_follow_candle() {
    let a = randn_bf16(&[6, 9], 60).to_dtype(DType::F32).unwrap();
    let b = randn_bf16(&[9, 4], 61).to_dtype(DType::F32).unwrap();
    let ours = f32_vec(&matmul(&a, &b).unwrap());
    let theirs = f32_vec(&a.matmul(&b).unwrap());
    assert_eq!(ours, theirs, "f32 goes to candle unchanged");
    let bad = randn_bf16(&[8, 4], 62);
    assert!(matmul(&randn_bf16(&[6, 9], 63), &bad).is_err());
}
