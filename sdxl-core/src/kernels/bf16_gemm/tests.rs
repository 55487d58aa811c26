//! Unit tests of the slice-level GEMM against a naive f64 reference.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use half::bf16;

use super::{
    gemm_with, m_blocks, pack_a, pack_a_f32_into, pack_b, Bias, IndexedB, Kernel, Lhs, MatMut,
    MatRef, PackedA, PackedB, PackedF32A, Rhs, MC_PANELS, MC_PANELS_WHOLE, NR,
};

/// Deterministic pseudo-random bf16 values in about [-2, 2].
fn values(len: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32)
        })
        .collect()
}

/// Naive `A . B` in f64 from strided views.
fn reference(a: &MatRef<'_, bf16>, b: &MatRef<'_, bf16>) -> Vec<f64> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|p| {
                    let x = a.data[i * a.row_stride + p * a.col_stride].to_f64();
                    let y = b.data[p * b.row_stride + j * b.col_stride].to_f64();
                    x * y
                })
                .sum();
        }
    }
    c
}

/// Kernels this CPU runs.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
fn kernels() -> Vec<Kernel> {
    let mut ks = vec![Kernel::Portable];
    #[cfg(target_arch = "x86_64")]
    if super::native_available() {
        ks.push(Kernel::Native);
    }
    ks
}

/// Max |c - ref| / (sum_p |a||b|), the error relative to the magnitude of the products.
fn check(m: usize, k: usize, n: usize, a_t: bool, b_t: bool, threads: usize) {
    let av = values(m * k, (m * 31 + k) as u64);
    let bv = values(k * n, (n * 17 + k) as u64);
    let a = if a_t {
        MatRef::new(&av, m, k, 1, m).unwrap()
    } else {
        MatRef::row_major(&av, m, k).unwrap()
    };
    let b = if b_t {
        MatRef::new(&bv, k, n, 1, k).unwrap()
    } else {
        MatRef::row_major(&bv, k, n).unwrap()
    };
    let want = reference(&a, &b);
    let scale = (k as f64).sqrt() * 4.0 + 1.0;
    for kernel in kernels() {
        let mut c = vec![1.0f32; m * n];
        gemm_with(
            kernel,
            Lhs::Matrix(a),
            Rhs::Matrix(b),
            Bias::None,
            MatMut::row_major(&mut c, m, n).unwrap(),
            false,
            threads,
        )
        .unwrap();
        let worst = c
            .iter()
            .zip(&want)
            .map(|(x, y)| (*x as f64 - y).abs() / scale)
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-5,
            "{kernel:?} {m}x{k}x{n} a_t={a_t} b_t={b_t}: error {worst:e}"
        );
    }
}

#[test]
fn small_and_ragged_shapes_match_reference() {
    for &(m, k, n) in &[
        (1, 1, 1),
        (1, 7, 1),
        (3, 1, 5),
        (12, 2, 32),
        (13, 3, 33),
        (25, 257, 65),
        (7, 300, 100),
        (40, 513, 17),
    ] {
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            check(m, k, n, a_t, b_t, 1);
            check(m, k, n, a_t, b_t, 3);
        }
    }
}

#[test]
fn blocks_larger_than_one_cache_block_match_reference() {
    // More than one k-block (KC <= 640), M-block (144 rows, from 17 panels on) and N-block
    // (512 columns); 154 rows (13 panels) are one whole M-block.
    check(300, 1501, 530, false, true, 2);
    check(154, 700, 530, false, true, 2);
}

#[test]
fn m_blocks_cover_every_panel_once() {
    for len in [0, 1, 12, 13, MC_PANELS_WHOLE, MC_PANELS_WHOLE + 1, 25, 171] {
        let blocks: Vec<_> = m_blocks(3..3 + len).collect();
        let covered: Vec<usize> = blocks.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(covered, (3..3 + len).collect::<Vec<_>>(), "{len} panels");
        let most = blocks.iter().map(|r| r.len()).max().unwrap_or(0);
        let want = if len <= MC_PANELS_WHOLE {
            len
        } else {
            MC_PANELS
        };
        assert_eq!(most, want, "{len} panels: {blocks:?}");
    }
}

#[test]
fn zero_k_writes_zeros_or_keeps_c() {
    let (a, b): (Vec<bf16>, Vec<bf16>) = (vec![], vec![]);
    let mut c = vec![3.0f32; 6];
    let av = MatRef::new(&a, 2, 0, 0, 1).unwrap();
    let bv = MatRef::new(&b, 0, 3, 3, 1).unwrap();
    gemm_with(
        Kernel::Portable,
        Lhs::Matrix(av),
        Rhs::Matrix(bv),
        Bias::None,
        MatMut::row_major(&mut c, 2, 3).unwrap(),
        true,
        1,
    )
    .unwrap();
    assert_eq!(c, vec![3.0; 6]);
    gemm_with(
        Kernel::Portable,
        Lhs::Matrix(av),
        Rhs::Matrix(bv),
        Bias::None,
        MatMut::row_major(&mut c, 2, 3).unwrap(),
        false,
        1,
    )
    .unwrap();
    assert_eq!(c, vec![0.0; 6]);
}

#[test]
fn accumulate_adds_and_bf16_output_rounds_once() {
    let (m, k, n) = (5, 9, 40);
    let av = values(m * k, 1);
    let bv = values(k * n, 2);
    let a = MatRef::row_major(&av, m, k).unwrap();
    let b = MatRef::row_major(&bv, k, n).unwrap();
    for kernel in kernels() {
        let mut f = vec![0.5f32; m * n];
        gemm_with(
            kernel,
            Lhs::Matrix(a),
            Rhs::Matrix(b),
            Bias::None,
            MatMut::row_major(&mut f, m, n).unwrap(),
            true,
            1,
        )
        .unwrap();
        let mut plain = vec![0f32; m * n];
        gemm_with(
            kernel,
            Lhs::Matrix(a),
            Rhs::Matrix(b),
            Bias::None,
            MatMut::row_major(&mut plain, m, n).unwrap(),
            false,
            1,
        )
        .unwrap();
        for (x, y) in f.iter().zip(&plain) {
            assert_eq!(*x, 0.5 + *y);
        }
        let mut h = vec![bf16::ZERO; m * n];
        gemm_with(
            kernel,
            Lhs::Matrix(a),
            Rhs::Matrix(b),
            Bias::None,
            MatMut::row_major(&mut h, m, n).unwrap(),
            false,
            2,
        )
        .unwrap();
        for (x, y) in h.iter().zip(&plain) {
            assert_eq!(x.to_bits(), bf16::from_f32(*y).to_bits());
        }
    }
}

#[test]
fn strided_output_and_threads_are_bit_identical() {
    let (m, k, n) = (50, 301, 130);
    let av = values(m * k, 5);
    let bv = values(k * n, 6);
    let a = MatRef::row_major(&av, m, k).unwrap();
    let b = MatRef::new(&bv, k, n, 1, k).unwrap();
    for kernel in kernels() {
        let mut one = vec![0f32; m * n];
        gemm_with(
            kernel,
            Lhs::Matrix(a),
            Rhs::Matrix(b),
            Bias::None,
            MatMut::row_major(&mut one, m, n).unwrap(),
            false,
            1,
        )
        .unwrap();
        for threads in [2, 3, 8] {
            // Column-major output.
            let mut cm = vec![0f32; m * n];
            gemm_with(
                kernel,
                Lhs::Matrix(a),
                Rhs::Matrix(b),
                Bias::None,
                MatMut::new(&mut cm, m, n, 1, m).unwrap(),
                false,
                threads,
            )
            .unwrap();
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(one[i * n + j].to_bits(), cm[j * m + i].to_bits());
                }
            }
        }
    }
}

#[test]
fn bad_views_are_rejected() {
    let data = vec![bf16::ZERO; 10];
    assert!(MatRef::new(&data, 3, 4, 4, 1).is_err());
    assert!(MatRef::new(&data, 2, 5, 5, 1).is_ok());
    assert!(MatRef::new(&data, 2, 2, usize::MAX, 1).is_err());
    let mut out = vec![0f32; 10];
    assert!(MatMut::new(&mut out, 2, 2, 1, 1).is_err(), "overlapping");
    assert!(MatMut::new(&mut out, 2, 5, 0, 1).is_err(), "broadcast rows");
    let a = MatRef::new(&data, 2, 5, 5, 1).unwrap();
    let mut c = vec![0f32; 4];
    let r = gemm_with(
        Kernel::Portable,
        Lhs::Matrix(a),
        Rhs::Matrix(a),
        Bias::None,
        MatMut::row_major(&mut c, 2, 2).unwrap(),
        false,
        1,
    );
    assert!(r.is_err(), "k mismatch");
}

#[test]
fn row_and_column_bias_are_added_before_rounding() {
    let (m, k, n) = (14, 21, 35);
    let av = values(m * k, 7);
    let bv = values(k * n, 8);
    let a = MatRef::row_major(&av, m, k).unwrap();
    let b = MatRef::new(&bv, k, n, 1, k).unwrap();
    let rows: Vec<f32> = (0..m).map(|i| i as f32 * 0.25 - 1.0).collect();
    let cols: Vec<f32> = (0..n).map(|j| 2.0 - j as f32 * 0.125).collect();
    for kernel in kernels() {
        let mut plain = vec![0f32; m * n];
        let c = MatMut::row_major(&mut plain, m, n).unwrap();
        gemm_with(
            kernel,
            Lhs::Matrix(a),
            Rhs::Matrix(b),
            Bias::None,
            c,
            false,
            1,
        )
        .unwrap();
        for (bias, by_row) in [(Bias::Rows(&rows), true), (Bias::Cols(&cols), false)] {
            let mut h = vec![bf16::ONE; m * n];
            let c = MatMut::new(&mut h, m, n, 1, m).unwrap();
            gemm_with(kernel, Lhs::Matrix(a), Rhs::Matrix(b), bias, c, true, 2).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let add = if by_row { rows[i] } else { cols[j] };
                    let want = bf16::from_f32(1.0 + (plain[i * n + j] + add));
                    assert_eq!(h[j * m + i].to_bits(), want.to_bits(), "({i}, {j})");
                }
            }
        }
        let mut c = vec![0f32; m * n];
        let bad = gemm_with(
            kernel,
            Lhs::Matrix(a),
            Rhs::Matrix(b),
            Bias::Cols(&rows),
            MatMut::row_major(&mut c, m, n).unwrap(),
            false,
            1,
        );
        assert!(bad.is_err(), "bias length");
    }
}

#[test]
fn packed_operands_give_bit_identical_products_and_unpack() {
    // Odd k, a ragged last panel, several k-, M- and N-blocks, both B layouts, bias, threads.
    for &(m, k, n, b_t) in &[
        (5, 7, 33, false),
        (130, 1281, 600, true),
        (13, 64, 32, true),
    ] {
        let av = values(m * k, 3);
        let bv = values(k * n, 4);
        let a = MatRef::row_major(&av, m, k).unwrap();
        let b = if b_t {
            MatRef::new(&bv, k, n, 1, k).unwrap()
        } else {
            MatRef::row_major(&bv, k, n).unwrap()
        };
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.5 - 3.0).collect();
        let panels = pack_b(b).unwrap();
        let packed = PackedB::new(&panels, k, n).unwrap();
        assert!(PackedB::new(&panels[1..], k, n).is_err(), "short panels");
        let a_panels = pack_a(a).unwrap();
        let packed_a = PackedA::new(&a_panels, m, k).unwrap();
        assert!(
            PackedA::new(&a_panels[1..], m, k).is_err(),
            "short A panels"
        );
        let a_back = packed_a.unpack();
        assert!(a_back
            .iter()
            .zip(&av)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        let unpacked = packed.unpack_transposed();
        for j in 0..n {
            for p in 0..k {
                let want = bv[if b_t { j * k + p } else { p * n + j }];
                assert_eq!(unpacked[j * k + p].to_bits(), want.to_bits(), "({p}, {j})");
            }
        }
        for kernel in kernels() {
            for threads in [1, 3] {
                let mut want = vec![bf16::ZERO; m * n];
                let mut got = vec![bf16::ZERO; m * n];
                let c = MatMut::row_major(&mut want, m, n).unwrap();
                gemm_with(
                    kernel,
                    Lhs::Matrix(a),
                    Rhs::Matrix(b),
                    Bias::Cols(&bias),
                    c,
                    false,
                    threads,
                )
                .unwrap();
                for (lhs, rhs) in [
                    (Lhs::Matrix(a), Rhs::Packed(packed)),
                    (Lhs::Packed(packed_a), Rhs::Matrix(b)),
                    (Lhs::Packed(packed_a), Rhs::Packed(packed)),
                ] {
                    let c = MatMut::row_major(&mut got, m, n).unwrap();
                    gemm_with(kernel, lhs, rhs, Bias::Cols(&bias), c, false, threads).unwrap();
                    let same = want
                        .iter()
                        .zip(&got)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{kernel:?} {m}x{k}x{n} b_t={b_t} threads={threads}");
                }
            }
        }
    }
}

#[test]
fn indexed_b_gives_the_products_of_the_matrix_it_addresses() {
    // Overlapping runs at scattered offsets (as a convolution's taps read them), a ragged last
    // panel whose extra columns read other values, several k-blocks, threads.
    for &(m, k, n) in &[(7usize, 6usize, 40usize), (30, 1300, 96), (13, 64, 33)] {
        let (k2, panels) = (k / 2, n.div_ceil(NR));
        let pool: Vec<u32> = values(2 * (k2 * 3 + panels * NR + NR), 9)
            .chunks_exact(2)
            .map(|p| u32::from(p[0].to_bits()) | (u32::from(p[1].to_bits()) << 16))
            .collect();
        let row_offsets: Vec<usize> = (0..k2).map(|p| (p * 7) % (k2 * 3)).collect();
        let panel_offsets: Vec<usize> = (0..panels).map(|j| j * NR - j.min(3)).collect();
        let b = IndexedB::new(&pool, k, n, &row_offsets, &panel_offsets).unwrap();
        let mut dense = vec![bf16::ZERO; k * n];
        for p in 0..k2 {
            for j in 0..n {
                let pair = pool[row_offsets[p] + panel_offsets[j / NR] + j % NR];
                dense[2 * p * n + j] = bf16::from_bits(pair as u16);
                dense[(2 * p + 1) * n + j] = bf16::from_bits((pair >> 16) as u16);
            }
        }
        let dense_b = MatRef::row_major(&dense, k, n).unwrap();
        let av = values(m * k, 5);
        let a = MatRef::row_major(&av, m, k).unwrap();
        let bias: Vec<f32> = (0..m).map(|i| i as f32 - 2.0).collect();
        for kernel in kernels() {
            for threads in [1, 2, 3] {
                let mut want = vec![0f32; m * n];
                let mut got = vec![0f32; m * n];
                let c = MatMut::row_major(&mut want, m, n).unwrap();
                gemm_with(
                    kernel,
                    Lhs::Matrix(a),
                    Rhs::Matrix(dense_b),
                    Bias::Rows(&bias),
                    c,
                    false,
                    threads,
                )
                .unwrap();
                let c = MatMut::row_major(&mut got, m, n).unwrap();
                gemm_with(
                    kernel,
                    Lhs::Matrix(a),
                    Rhs::Indexed(b),
                    Bias::Rows(&bias),
                    c,
                    false,
                    threads,
                )
                .unwrap();
                let same = want
                    .iter()
                    .zip(&got)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{kernel:?} {m}x{k}x{n} threads={threads}");
            }
        }
        // Runs past the buffer, an odd k and wrong table lengths are refused.
        let last = pool.len() - panel_offsets[panels - 1] - NR + 1;
        let mut far = row_offsets.clone();
        far[0] = last;
        assert!(
            IndexedB::new(&pool, k, n, &far, &panel_offsets).is_err(),
            "past the end"
        );
        assert!(
            IndexedB::new(&pool, k + 1, n, &row_offsets, &panel_offsets).is_err(),
            "odd k"
        );
        assert!(IndexedB::new(&pool, k, n, &row_offsets[1..], &panel_offsets).is_err());
        assert!(IndexedB::new(&pool, k, n + NR, &row_offsets, &panel_offsets).is_err());
    }
}

#[test]
fn f32_panels_times_indexed_b_match_a_reference_on_every_kernel() {
    // Ragged rows (m not a multiple of MR), a ragged last panel, several k-blocks, threads,
    // accumulation onto C and a row bias.
    for &(m, k, n) in &[(5usize, 3usize, 40usize), (30, 700, 96), (13, 64, 33)] {
        let panels = n.div_ceil(NR);
        let pool: Vec<f32> = values(k * 2 + panels * NR + NR, 11)
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let row_offsets: Vec<usize> = (0..k).map(|r| (r * 5) % (k * 2)).collect();
        let panel_offsets: Vec<usize> = (0..panels).map(|j| j * NR - j.min(2)).collect();
        let b = IndexedB::new_f32(&pool, k, n, &row_offsets, &panel_offsets).unwrap();
        let av: Vec<f32> = values(m * k, 12).iter().map(|v| v.to_f32()).collect();
        let mut a_panels = vec![f32::NAN; super::packed_f32_a_len(m, k).unwrap()];
        let a_view = MatRef::row_major(&av, m, k).unwrap();
        pack_a_f32_into(a_view, &mut a_panels).unwrap();
        assert!(
            pack_a_f32_into(a_view, &mut a_panels[1..]).is_err(),
            "short buffer"
        );
        let a = PackedF32A::new(&a_panels, m, k).unwrap();
        assert!(
            PackedF32A::new(&a_panels[1..], m, k).is_err(),
            "short panels"
        );
        assert_eq!(a.unpack(), av);
        let bias: Vec<f32> = (0..m).map(|i| i as f32 * 0.25 - 1.0).collect();
        let start: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32).collect();
        let mut results = Vec::new();
        for kernel in kernels() {
            for threads in [1, 2, 3] {
                let mut c = start.clone();
                let view = MatMut::row_major(&mut c, m, n).unwrap();
                let (lhs, rhs) = (Lhs::PackedF32(a), Rhs::IndexedF32(b));
                gemm_with(kernel, lhs, rhs, Bias::Rows(&bias), view, true, threads).unwrap();
                results.push(c);
            }
        }
        let mut worst = 0f64;
        for i in 0..m {
            for j in 0..n {
                let (mut want, mut scale) = (f64::from(start[i * n + j] + bias[i]), 1f64);
                for r in 0..k {
                    let x = f64::from(av[i * k + r]);
                    let y = f64::from(pool[row_offsets[r] + panel_offsets[j / NR] + j % NR]);
                    want += x * y;
                    scale += (x * y).abs();
                }
                worst = worst.max((f64::from(results[0][i * n + j]) - want).abs() / scale);
            }
        }
        println!("{m}x{k}x{n}: worst relative error {worst:e}");
        assert!(worst < 1e-6, "{m}x{k}x{n}: worst {worst}");
        for other in &results[1..] {
            let same = other
                .iter()
                .zip(&results[0])
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{m}x{k}x{n}: kernels or thread counts disagree");
        }
        // f32 panels go only with an f32 B.
        let mut c = start.clone();
        let view = MatMut::row_major(&mut c, m, n).unwrap();
        let dense = vec![bf16::ZERO; k * n];
        let bad = Rhs::Matrix(MatRef::row_major(&dense, k, n).unwrap());
        assert!(gemm_with(
            Kernel::Portable,
            Lhs::PackedF32(a),
            bad,
            Bias::None,
            view,
            false,
            1
        )
        .is_err());
    }
}
