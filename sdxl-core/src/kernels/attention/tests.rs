//! Tests of the fused attention kernel against a naive f64 reference.
#![allow(clippy::unwrap_used)]

use super::*;

/// Deterministic values in [-2, 2) (a 64-bit LCG), rounded to `dtype`'s precision.
fn values(len: usize, seed: u64, dtype: DType) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let x = ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0;
            if dtype == DType::BF16 {
                bf16::from_f32(x).to_f32()
            } else {
                x
            }
        })
        .collect()
}

/// One attention problem.
#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    n: usize,
    m: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
}

impl Case {
    fn spec(&self) -> AttentionSpec {
        AttentionSpec {
            heads: self.heads,
            scale: (self.head_dim as f32).powf(-0.5),
            causal: self.causal,
        }
    }

    /// q, k, v as f32 vectors (values exact in `dtype`) and as tensors of `dtype`.
    fn operands(&self, dtype: DType) -> ([Vec<f32>; 3], [Tensor; 3]) {
        let c = self.heads * self.head_dim;
        let dims = [
            (self.batch, self.n, c),
            (self.batch, self.m, c),
            (self.batch, self.m, c),
        ];
        let data = [0, 1, 2].map(|i| {
            let (b, t, c) = dims[i];
            values(b * t * c, 17 * i as u64 + 3, dtype)
        });
        let tensors = [0, 1, 2].map(|i| {
            Tensor::from_vec(data[i].clone(), dims[i], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        });
        (data, tensors)
    }

    /// The attention in f64 with the naive loops.
    fn reference(&self, [q, k, v]: &[Vec<f32>; 3]) -> Vec<f64> {
        let (d, c) = (self.head_dim, self.heads * self.head_dim);
        let scale = f64::from(self.spec().scale);
        let mut out = vec![0.0; self.batch * self.n * c];
        for b in 0..self.batch {
            for h in 0..self.heads {
                for i in 0..self.n {
                    let keys = if self.causal {
                        (i + 1).min(self.m)
                    } else {
                        self.m
                    };
                    let q_at = |x: usize| f64::from(q[(b * self.n + i) * c + h * d + x]);
                    let kv_at = |t: &Vec<f32>, j: usize, x: usize| {
                        f64::from(t[(b * self.m + j) * c + h * d + x])
                    };
                    let s: Vec<f64> = (0..keys)
                        .map(|j| (0..d).map(|x| q_at(x) * kv_at(k, j, x)).sum::<f64>() * scale)
                        .collect();
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = p.iter().sum();
                    for x in 0..d {
                        out[(b * self.n + i) * c + h * d + x] =
                            (0..keys).map(|j| p[j] * kv_at(v, j, x)).sum::<f64>() / sum;
                    }
                }
            }
        }
        out
    }
}

fn cases() -> Vec<Case> {
    let case = |batch, n, m, heads, head_dim, causal| Case {
        batch,
        n,
        m,
        heads,
        head_dim,
        causal,
    };
    vec![
        case(1, 1, 1, 1, 1, false),
        case(2, 37, 53, 3, 5, false),
        case(2, 53, 53, 4, 16, true),
        // N > M and N < M with the causal mask (aligned at the top left).
        case(3, 40, 29, 2, 8, true),
        case(1, 29, 40, 2, 8, true),
        // Three row blocks (at most 144 rows), ragged last block.
        case(1, 300, 77, 2, 64, false),
        case(2, 300, 300, 1, 12, true),
        // One head: split into blocks of 64 rows for enough tasks; three key blocks of at
        // most 512 keys.
        case(1, 130, 1100, 1, 24, false),
        // Causal across key blocks: later blocks are partly or wholly masked for some rows.
        case(1, 700, 700, 2, 16, true),
        // A wide head over key blocks of 128 keys.
        case(1, 40, 300, 1, 512, false),
        // Many heads: blocks of the most rows.
        case(2, 600, 40, 4, 8, false),
        // One wide head, as in the VAE.
        case(1, 64, 64, 1, 512, false),
    ]
}

/// Max |ours - reference| and max |reference|.
fn compare(ours: &Tensor, reference: &[f64]) -> (f64, f64) {
    let ours = ours
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(ours.len(), reference.len());
    ours.iter()
        .zip(reference)
        .fold((0.0, 0.0), |(err, max), (&o, &r)| {
            (
                f64::max(err, (f64::from(o) - r).abs()),
                f64::max(max, r.abs()),
            )
        })
}

fn check_against_reference(dtype: DType, tolerance: f64) {
    let mut worst: f64 = 0.0;
    for case in cases() {
        let (data, [q, k, v]) = case.operands(dtype);
        let ours = attention_on(&q, &k, &v, case.spec(), 2).unwrap();
        assert_eq!(ours.dtype(), dtype);
        assert_eq!(
            ours.dims(),
            [case.batch, case.n, case.heads * case.head_dim]
        );
        let (err, max) = compare(&ours, &case.reference(&data));
        let rel = err / max.max(1.0);
        worst = worst.max(rel);
        assert!(
            rel <= tolerance,
            "{dtype:?} {case:?}: error {err:e} (rel {rel:e})"
        );
    }
    println!("{dtype:?}: worst error relative to max(1, max|ref|) {worst:e}");
}

#[test]
fn f32_matches_the_f64_reference() {
    check_against_reference(DType::F32, 2e-6);
}

#[test]
fn bf16_matches_the_f64_reference() {
    if !bf16_gemm::native_available() {
        return;
    }
    // Probabilities and outputs are rounded to bf16 (8 bits of mantissa).
    check_against_reference(DType::BF16, 1e-2);
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut dtypes = vec![DType::F32];
    if bf16_gemm::native_available() {
        dtypes.push(DType::BF16);
    }
    for dtype in dtypes {
        for case in cases() {
            let (_, [q, k, v]) = case.operands(dtype);
            let one = attention_on(&q, &k, &v, case.spec(), 1).unwrap();
            let three = attention_on(&q, &k, &v, case.spec(), 3).unwrap();
            let diff = crate::test_support::max_abs_diff(&one, &three);
            assert!(diff == 0.0, "{dtype:?} {case:?}: {diff:e}");
        }
    }
}

#[test]
fn a_key_block_with_larger_scores_rescales_the_earlier_ones() {
    // Keys 512..1024 (the second key block) are 4x the others, so the running maximum of most
    // rows grows there and what the first block summed is rescaled.
    let case = Case {
        batch: 1,
        n: 20,
        m: 1100,
        heads: 1,
        head_dim: 24,
        causal: false,
    };
    let mut dtypes = vec![(DType::F32, 2e-6)];
    if bf16_gemm::native_available() {
        dtypes.push((DType::BF16, 1e-2));
    }
    for (dtype, tolerance) in dtypes {
        let ([q, mut k, v], _) = case.operands(dtype);
        let d = case.head_dim;
        k[512 * d..1024 * d].iter_mut().for_each(|x| *x *= 4.0);
        let tensor = |data: &Vec<f32>, t: usize| {
            Tensor::from_vec(data.clone(), (1, t, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (qt, kt, vt) = (tensor(&q, case.n), tensor(&k, case.m), tensor(&v, case.m));
        let ours = attention_on(&qt, &kt, &vt, case.spec(), 2).unwrap();
        let (err, max) = compare(&ours, &case.reference(&[q, k, v]));
        let rel = err / max.max(1.0);
        println!("{dtype:?}: error {err:e} (relative {rel:e})");
        assert!(
            rel <= tolerance,
            "{dtype:?}: error {err:e} (relative {rel:e})"
        );
    }
}

#[test]
fn strided_operands_are_read_in_place() {
    let case = Case {
        batch: 2,
        n: 45,
        m: 31,
        heads: 3,
        head_dim: 8,
        causal: false,
    };
    let (data, [q, k, v]) = case.operands(DType::F32);
    // The same values behind transposed layouts: [B, C, T] storage viewed as [B, T, C].
    let strided = |t: &Tensor| {
        t.transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    };
    let (qs, ks, vs) = (strided(&q), strided(&k), strided(&v));
    assert!(!qs.is_contiguous());
    let ours = attention(&qs, &ks, &vs, case.spec()).unwrap();
    let (err, _) = compare(&ours, &case.reference(&data));
    assert!(err <= 2e-6, "{err:e}");
}

#[test]
fn empty_queries_give_an_empty_output() {
    let q = Tensor::zeros((2, 0, 8), DType::F32, &Device::Cpu).unwrap();
    let k = Tensor::zeros((2, 5, 8), DType::F32, &Device::Cpu).unwrap();
    let spec = AttentionSpec {
        heads: 2,
        scale: 0.5,
        causal: false,
    };
    let out = attention(&q, &k, &k, spec).unwrap();
    assert_eq!(out.dims(), [2, 0, 8]);
}

#[test]
fn bad_operands_are_errors() {
    let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let spec = |heads| AttentionSpec {
        heads,
        scale: 1.0,
        causal: false,
    };
    let (q, kv) = (t(&[2, 5, 8]), t(&[2, 7, 8]));
    let invalid = [
        (t(&[5, 8]), kv.clone(), kv.clone(), 2),
        (q.clone(), t(&[1, 7, 8]), t(&[1, 7, 8]), 2),
        (q.clone(), kv.clone(), t(&[2, 6, 8]), 2),
        (q.clone(), t(&[2, 7, 6]), t(&[2, 7, 6]), 2),
        (q.clone(), kv.clone(), kv.clone(), 3),
        (q.clone(), kv.clone(), kv.clone(), 0),
        (q.clone(), t(&[2, 0, 8]), t(&[2, 0, 8]), 2),
    ];
    for (q, k, v, heads) in invalid {
        let err = attention(&q, &k, &v, spec(heads)).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
    let k16 = kv.to_dtype(DType::F16).unwrap();
    let err = attention(&q, &k16, &kv, spec(2)).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    let q16 = q.to_dtype(DType::F16).unwrap();
    assert!(!supports(&q16, &k16, &k16));
    assert!(attention(&q16, &k16, &k16, spec(2)).is_err());
}
