//! Tests of the CPU convolution against candle's and between its own paths.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::test_support::{max_abs, max_abs_diff};

fn config(padding: usize, stride: usize, dilation: usize) -> Conv2dConfig {
    Conv2dConfig {
        padding,
        stride,
        dilation,
        groups: 1,
        cudnn_fwd_algo: None,
    }
}

/// The preparations every test runs: none, ×2 and ×3 upsampling, bottom-right padding.
const PREPS: [InputPrep; 4] = [
    InputPrep::NONE,
    InputPrep {
        upsample: 2,
        pad_bottom_right: 0,
    },
    InputPrep {
        upsample: 3,
        pad_bottom_right: 0,
    },
    InputPrep {
        upsample: 1,
        pad_bottom_right: 1,
    },
];

/// Ours against candle's own convolution of the prepared input on shapes that exercise
/// every path: padding, strides, dilation, 1×1, tiles spanning images, odd sizes, and each
/// input preparation.
#[test]
fn matches_candle_convolution() {
    let cases = [
        // (batch, c_in, h, w, c_out, kernel, padding, stride, dilation)
        (2, 5, 9, 7, 6, 3, 1, 1, 1),
        (1, 4, 8, 8, 3, 3, 0, 2, 1),
        (2, 3, 9, 11, 4, 3, 1, 2, 1),
        (3, 8, 5, 6, 7, 1, 0, 1, 1),
        (1, 2, 10, 10, 2, 3, 2, 1, 2),
        (2, 16, 40, 40, 8, 3, 1, 1, 1),
        (1, 3, 4, 4, 2, 4, 0, 1, 1),
    ];
    for (b, ci, h, w, co, k, p, s, d) in cases {
        let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &Device::Cpu).unwrap();
        let weight = Tensor::randn(0f32, 1.0, (co, ci, k, k), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1.0, co, &Device::Cpu).unwrap();
        let cfg = config(p, s, d);
        for bias in [None, Some(&bias)] {
            for prep in PREPS {
                let ours = conv2d(&x, &weight, bias, &cfg, prep, None).unwrap();
                let mut theirs = prep.apply(&x).unwrap().conv2d(&weight, p, s, d, 1).unwrap();
                if let Some(bias) = bias {
                    theirs = theirs
                        .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                        .unwrap();
                }
                assert_eq!(ours.dims(), theirs.dims());
                let case = (b, ci, h, w, co, k, p, s, d);
                let worst = max_abs_diff(&ours, &theirs);
                assert!(worst < 1e-4, "case {case:?} {prep:?}: worst {worst}");
                // A residual accumulated onto the products.
                let residual = Tensor::randn(0f32, 1.0, theirs.dims(), &Device::Cpu).unwrap();
                let summed = conv2d(&x, &weight, bias, &cfg, prep, Some(&residual)).unwrap();
                let worst = max_abs_diff(&summed, &(&theirs + &residual).unwrap());
                assert!(
                    worst < 1e-4,
                    "case {case:?} {prep:?} + residual: worst {worst}"
                );
            }
        }
    }
}

/// bf16 against the f32 convolution of the same (bf16-rounded) values: f32 accumulation,
/// so only the final rounding to bf16 differs (half an ulp, 2⁻⁸ relative).
#[test]
fn bf16_matches_f32_of_rounded_values() {
    let d = &Device::Cpu;
    if !bf16_gemm::native_available() {
        // Without AVX512-BF16 the layer widens to f32 instead of calling this kernel.
        let x = Tensor::zeros((1, 1, 3, 3), DType::BF16, d).unwrap();
        let w = Tensor::zeros((1, 1, 3, 3), DType::BF16, d).unwrap();
        assert!(!supports(&x, &w, &config(1, 1, 1)));
        return;
    }
    for ((b, ci, h, w, co, k, p, s), prep) in [
        (2, 5, 9, 7, 6, 3, 1, 1),
        (1, 16, 20, 20, 8, 3, 1, 2),
        (2, 8, 6, 6, 4, 1, 0, 1),
        // Several tiles when more than one thread runs.
        (2, 7, 40, 40, 8, 3, 1, 1),
    ]
    .into_iter()
    .zip(PREPS.iter().cycle())
    {
        let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), d)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let weight = Tensor::randn(0f32, 1.0, (co, ci, k, k), d)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let bias = Tensor::randn(0f32, 1.0, co, d).unwrap();
        let cfg = config(p, s, 1);
        let prep = *prep;
        let ours = conv2d(&x, &weight, Some(&bias), &cfg, prep, None)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let reference = conv2d(&wide(&x), &wide(&weight), Some(&bias), &cfg, prep, None).unwrap();
        let scale = max_abs(&reference);
        let worst = max_abs_diff(&ours, &reference);
        assert!(worst <= scale / 256.0, "worst {worst} (scale {scale})");
        // The packed kernel: the same weight back, the same output up to the order of the
        // sums (channels in pairs) and the one rounding.
        let packed = PackedKernel::pack(&weight).unwrap().unwrap();
        assert_eq!(packed.dims().to_vec(), weight.dims().to_vec());
        assert_eq!(max_abs_diff(&packed.weight().unwrap(), &weight), 0.0);
        let with_packed = conv2d_packed(&x, &packed, Some(&bias), &cfg, prep, None)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let worst = max_abs_diff(&with_packed, &reference);
        assert!(
            worst <= scale / 256.0,
            "packed: worst {worst} (scale {scale})"
        );
        assert!(conv2d_packed(&wide(&x), &packed, Some(&bias), &cfg, prep, None).is_err());
        // A bf16 residual is added to the f32 sums before the one rounding.
        let residual = Tensor::randn(0f32, 1.0, reference.dims(), d)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let summed = conv2d_packed(&x, &packed, Some(&bias), &cfg, prep, Some(&residual))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let expected = (&reference + wide(&residual)).unwrap();
        let worst = max_abs_diff(&summed, &expected);
        assert!(worst <= (scale + 4.0) / 256.0, "residual: worst {worst}");
        let wrong = Tensor::zeros((1, 1, 1, 1), DType::BF16, d).unwrap();
        assert!(conv2d_packed(&x, &packed, Some(&bias), &cfg, prep, Some(&wrong)).is_err());
    }
}

#[test]
fn rejects_mismatched_channels() {
    let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let weight = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&x, &weight, None, &config(1, 1, 1), InputPrep::NONE, None).is_err());
    let weight = Tensor::zeros((2, 3, 7, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&x, &weight, None, &config(0, 1, 1), InputPrep::NONE, None).is_err());
}

/// Tiles read through slabs (bf16: a kernel packed in channel pairs; f32: the weight packed
/// for the call). In bf16 that gives the same bits as gathering the columns (the same sums in
/// the same order); both match the f32 convolution of the same values (bf16: within its
/// rounding). Covers padding, upsampling, bottom-right padding, strides 2 and 3 (the
/// downsampling convolutions), a residual, several tiles per image and tiles spanning images.
#[test]
fn slab_tiles_match_gathered_columns_bit_for_bit() {
    let d = &Device::Cpu;
    let threads = candle_core::utils::get_num_threads().max(1);
    for dtype in [DType::BF16, DType::F32] {
        let native = match dtype {
            DType::F32 => bf16_gemm::f32_native_available(),
            _ => bf16_gemm::native_available(),
        };
        if !native {
            // Without AVX-512 (f32) or AVX512-BF16 (bf16), no tile reads a slab.
            continue;
        }
        let mut slab_tiles = 0;
        for ((b, ci, h, w, co, k, p, s), prep) in [
            ((2, 8, 16, 32, 6, 3, 1, 1), InputPrep::NONE),
            ((2, 8, 12, 32, 6, 3, 1, 1), InputPrep::NONE),
            ((1, 6, 40, 64, 20, 3, 1, 1), InputPrep::NONE),
            ((2, 4, 8, 16, 3, 3, 1, 1), InputPrep::upsample(2)),
            ((1, 10, 31, 31, 5, 3, 1, 1), InputPrep::pad_bottom_right(1)),
            ((3, 2, 14, 34, 4, 3, 0, 1), InputPrep::NONE),
            ((2, 32, 64, 64, 8, 3, 1, 1), InputPrep::NONE),
            // The VAE encoder's downsampling: stride 2, no padding but one row and column
            // below and to the right.
            ((1, 8, 64, 64, 6, 3, 0, 2), InputPrep::pad_bottom_right(1)),
            ((2, 6, 40, 64, 5, 3, 1, 2), InputPrep::NONE),
            ((1, 4, 20, 96, 3, 3, 1, 3), InputPrep::NONE),
            ((1, 4, 9, 32, 3, 3, 1, 2), InputPrep::upsample(2)),
        ] {
            let cast = |t: Tensor| t.to_dtype(dtype).unwrap();
            let x = cast(Tensor::randn(0f32, 1.0, (b, ci, h, w), d).unwrap());
            let weight = cast(Tensor::randn(0f32, 1.0, (co, ci, k, k), d).unwrap());
            let bias = Tensor::randn(0f32, 1.0, co, d).unwrap();
            let cfg = config(p, s, 1);
            let g = Geometry::new(x.dims(), weight.dims(), &cfg, prep).unwrap();
            let residual = cast(Tensor::randn(0f32, 1.0, g.out_dims(), d).unwrap());
            let bias_values = bias.to_vec1::<f32>().unwrap();
            let (xs, xl) = x.storage_and_layout();
            let (rs, rl) = residual.storage_and_layout();
            let (ws, wl) = weight.storage_and_layout();
            let (slabs, columns) = if dtype == DType::F32 {
                let w_data = cpu_slice::<f32>(&ws, wl).unwrap();
                let panels = <f32 as ConvElement>::panels(&g, w_data).unwrap().unwrap();
                let a = PackedF32A::new(&panels, co, g.k()).unwrap();
                let w = KernelRef::WithPanels(w_data, a);
                assert!(slab::direct_applies(&g, w.reads_slabs()), "{g:?}");
                let post = Epilogue {
                    bias: Some(&bias_values),
                    residual: Some(cpu_slice::<f32>(&rs, rl).unwrap()),
                };
                let x_data = cpu_slice::<f32>(&xs, xl).unwrap();
                let run = |direct| convolve(&g, x_data, w, post, direct).unwrap();
                let values = |v: Vec<f32>| Tensor::from_vec(v, g.out_dims(), d).unwrap();
                (values(run(true)), values(run(false)))
            } else {
                let packed = PackedKernel::pack(&weight).unwrap().unwrap();
                let (ps, pl) = packed.panels.storage_and_layout();
                let a = PackedA::new(cpu_slice(&ps, pl).unwrap(), co, g.k()).unwrap();
                let w = KernelRef::Packed(a, packed.order);
                assert!(slab::direct_applies(&g, w.reads_slabs()), "{g:?}");
                let post = Epilogue {
                    bias: Some(&bias_values),
                    residual: Some(cpu_slice::<bf16>(&rs, rl).unwrap()),
                };
                let x_data = cpu_slice::<bf16>(&xs, xl).unwrap();
                let run = |direct| convolve(&g, x_data, w, post, direct).unwrap();
                let values = |v: Vec<bf16>| Tensor::from_vec(v, g.out_dims(), d).unwrap();
                (values(run(true)), values(run(false)))
            };
            let sizing = TileSizing::new::<f32>(&g, true);
            let tiles = plan_tiles(&g, sizing, threads, true);
            slab_tiles += tiles.iter().filter(|t| t.direct).count();
            let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            // bf16: the same packed kernel either way, so the same bits; f32: our micro-kernel
            // against the `gemm` crate's.
            let apart = max_abs_diff(&wide(&slabs), &wide(&columns));
            match dtype {
                DType::F32 => assert!(apart < 1e-4, "{g:?}: {apart}"),
                _ => assert_eq!(apart, 0.0, "{g:?}"),
            }
            let reference = conv2d(&wide(&x), &wide(&weight), Some(&bias), &cfg, prep, None)
                .unwrap()
                .add(&wide(&residual))
                .unwrap();
            let scale = max_abs(&reference);
            let worst = max_abs_diff(&wide(&slabs), &reference);
            let tolerance = match dtype {
                DType::F32 => 1e-4,
                _ => scale / 256.0,
            };
            println!("{dtype:?} {g:?}: worst {worst} (scale {scale})");
            assert!(worst <= tolerance, "worst {worst} (scale {scale})");
        }
        assert!(slab_tiles > 0, "no tile read a slab");
    }
}

/// Kernels with one tap or an odd number of channels keep the NCHW order; the two orders map
/// k one to one.
#[test]
fn channel_pair_order_is_a_permutation_of_k() {
    assert_eq!(paired::KOrder::for_kernel(3, 9), paired::KOrder::Nchw);
    assert_eq!(paired::KOrder::for_kernel(4, 1), paired::KOrder::Nchw);
    let order = paired::KOrder::for_kernel(6, 9);
    assert_eq!(order, paired::KOrder::ChannelPairs);
    let mut seen: Vec<usize> = (0..54).map(|r| order.nchw_index(r, 9)).collect();
    // Pair 0, tap 1, second channel: channel 1, tap 1.
    assert_eq!(seen[3], 10);
    let indices: Vec<usize> = paired::pair_indices(6, 9).collect();
    assert_eq!(indices, seen);
    seen.sort_unstable();
    assert_eq!(seen, (0..54).collect::<Vec<_>>());
}

/// A direct convolution in f64 (padding 1, stride 1, the input upsampled by `upsample`) plus
/// the bias, for checking the Winograd path.
fn reference_f64(x: &Tensor, weight: &Tensor, bias: &[f32], upsample: usize) -> Vec<f64> {
    let (b, ci, h, w) = x.dims4().unwrap();
    let co = weight.dim(0).unwrap();
    let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let ws: Vec<f32> = weight.flatten_all().unwrap().to_vec1().unwrap();
    let (oh, ow) = (h * upsample, w * upsample);
    let mut out = vec![0f64; b * co * oh * ow];
    for n in 0..b {
        for o in 0..co {
            for y in 0..oh {
                for x_ in 0..ow {
                    let mut sum = f64::from(bias[o]);
                    for c in 0..ci {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) =
                                    ((y + ky).wrapping_sub(1), (x_ + kx).wrapping_sub(1));
                                if iy >= oh || ix >= ow {
                                    continue;
                                }
                                let v = xs[((n * ci + c) * h + iy / upsample) * w + ix / upsample];
                                let k = ws[((o * ci + c) * 3 + ky) * 3 + kx];
                                sum += f64::from(v) * f64::from(k);
                            }
                        }
                    }
                    out[((n * co + o) * oh + y) * ow + x_] = sum;
                }
            }
        }
    }
    out
}

/// Winograd's F(2×2, 3×3) matches a direct convolution in f64 about as closely as the direct
/// f32 path does, on odd output sizes (partial tiles), ×2 upsampling, a bias and a residual,
/// batches, one block and several. It runs where our f32 micro-kernel does, for 3×3
/// convolutions with stride 1 and padding 1 that have enough channels and tiles.
#[test]
fn winograd_matches_a_direct_convolution_in_f64() {
    let d = &Device::Cpu;
    let threads = candle_core::utils::get_num_threads().max(1);
    if !bf16_gemm::f32_native_available() {
        return;
    }
    let geometry = |x: &[usize], w: &[usize], stride| {
        Geometry::new(x, w, &config(1, stride, 1), InputPrep::NONE).unwrap()
    };
    // The UNet's first level at 512 px runs it; its lowest level and stride 2 do not.
    assert!(winograd::applies(&geometry(
        &[2, 320, 64, 64],
        &[320, 320, 3, 3],
        1
    )));
    assert!(!winograd::applies(&geometry(
        &[2, 1280, 16, 16],
        &[1280, 1280, 3, 3],
        1
    )));
    assert!(!winograd::applies(&geometry(
        &[2, 320, 64, 64],
        &[320, 320, 3, 3],
        2
    )));
    assert!(!winograd::applies(&geometry(
        &[2, 4, 64, 64],
        &[320, 4, 3, 3],
        1
    )));
    for (b, ci, h, w, co, upsample) in [
        (2, 16, 9, 7, 16, 1),
        (1, 24, 10, 15, 32, 2),
        (2, 32, 64, 64, 48, 1),
        (1, 64, 5, 5, 20, 1),
        (3, 16, 33, 17, 17, 1),
    ] {
        let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), d).unwrap();
        let weight = Tensor::randn(0f32, 1.0, (co, ci, 3, 3), d).unwrap();
        let bias = Tensor::randn(0f32, 1.0, co, d).unwrap();
        let bias_values = bias.to_vec1::<f32>().unwrap();
        let (cfg, prep) = (config(1, 1, 1), InputPrep::upsample(upsample));
        let g = Geometry::new(x.dims(), weight.dims(), &cfg, prep).unwrap();
        let reference = reference_f64(&x, &weight, &bias_values, upsample);
        let residual = Tensor::randn(0f32, 1.0, g.out_dims(), d).unwrap();
        let residual_values: Vec<f32> = residual.flatten_all().unwrap().to_vec1().unwrap();
        let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = |t: &Tensor, with_residual: bool| {
            let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            values
                .iter()
                .zip(&reference)
                .zip(&residual_values)
                .map(|((&v, &r), &res)| {
                    let expected = r + if with_residual { f64::from(res) } else { 0.0 };
                    (f64::from(v) - expected).abs()
                })
                .fold(0f64, f64::max)
        };
        let (ws, wl) = weight.storage_and_layout();
        let w_data = cpu_slice::<f32>(&ws, wl).unwrap();
        let winograd = |residual| {
            convolve_tensors(&g, &x, Some(&bias), residual, |x, post| {
                winograd::convolve(&g, x, w_data, post, threads)
            })
            .unwrap()
        };
        let direct = conv2d_typed::<f32>(&x, &weight, Some(&bias), &cfg, prep, None).unwrap();
        let (ours, summed) = (winograd(None), winograd(Some(&residual)));
        let (ours, direct, summed) = (
            worst(&ours, false),
            worst(&direct, false),
            worst(&summed, true),
        );
        println!(
            "{g:?}: Winograd worst {ours:.2e}, + residual {summed:.2e}, direct {direct:.2e} \
             (scale {scale:.1})"
        );
        let tolerance = 1e-6 * scale;
        assert!(
            ours <= tolerance && summed <= tolerance,
            "{g:?}: worst {ours} / {summed}, tolerance {tolerance}"
        );
    }
}

/// The tiles cover every output row exactly once, in runs within one image whose lengths
/// differ by at most one, and in a multiple of the thread count where the rows allow.
#[test]
fn tiles_cover_every_row_once_in_balanced_runs() {
    for (x_dims, c_out, stride) in [
        ([1, 128, 256, 256], 128, 1),
        ([2, 256, 128, 128], 256, 1),
        ([1, 128, 256, 256], 128, 2),
        ([2, 8, 37, 64], 6, 1),
        ([3, 4, 9, 32], 4, 1),
    ] {
        let w_dims = [c_out, x_dims[1], 3, 3];
        let g = Geometry::new(&x_dims, &w_dims, &config(1, stride, 1), InputPrep::NONE).unwrap();
        for threads in [1, 2, 3, 4] {
            for direct in [false, true] {
                let tiles = plan_tiles(&g, TileSizing::new::<bf16>(&g, direct), threads, direct);
                let mut next = 0;
                for tile in &tiles {
                    assert_eq!(tile.first, next, "{g:?}: a gap or overlap at row {next}");
                    assert!(tile.count > 0, "{g:?}: an empty tile");
                    next += tile.count;
                }
                assert_eq!(next, g.batch * g.out_h, "{g:?}: rows left out");
                if tiles.len() == 1 {
                    // Too few rows for one tile per thread: one tile, on the GEMM's threads.
                    continue;
                }
                let (shortest, longest) = tiles.iter().fold((usize::MAX, 0), |(s, l), t| {
                    (s.min(t.count), l.max(t.count))
                });
                assert!(longest - shortest <= 1, "{g:?}: {shortest}..{longest} rows");
                assert!(tiles.iter().all(|&t| slab::within_one_image(&g, t)));
                // A multiple of the threads, unless the tiles are down to single rows.
                assert!(
                    tiles.len().is_multiple_of(threads) || longest == 1,
                    "{g:?}: {} tiles on {threads} threads",
                    tiles.len()
                );
            }
        }
    }
}
