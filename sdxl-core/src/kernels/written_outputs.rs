//! The kernels leave their outputs unwritten until they store their results
//! ([`super::storage::unwritten`]), so every value must be stored. Here each kernel runs twice:
//! once plainly, and once right after buffers of NaN bits as long as its output were freed,
//! which the allocator usually hands back for the output. Both runs must give the same finite
//! values. (Memory that comes back fresh from the kernel is zeros, which this cannot tell
//! from a stored zero; the inputs make zero outputs unlikely.)
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use candle_nn::Conv2dConfig;

use super::conv2d::{conv2d, conv2d_packed, InputPrep, PackedKernel};
use super::group_norm::{group_norm, GroupNormParams};
use super::{activation, layer_norm};

/// Frees buffers of NaN bits (f32 and bf16 alike) of `bytes` bytes. Twice: when the first is
/// large enough to be mapped on its own, freeing it raises glibc's threshold for that, so
/// the second comes from (and goes back to) the heap, from which the output is then taken.
fn leave_nans_behind(bytes: usize) {
    for _ in 0..2 {
        drop(std::hint::black_box(vec![0xffu8; bytes]));
    }
}

/// Runs `kernel` plainly and after [`leave_nans_behind`], and compares the results.
fn assert_fully_written(what: &str, kernel: impl Fn() -> Tensor) {
    let plain = kernel();
    let bytes = plain.elem_count() * plain.dtype().size_in_bytes();
    leave_nans_behind(bytes);
    let after_nans = kernel();
    let values = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (plain, after_nans) = (values(&plain), values(&after_nans));
    let unwritten = after_nans.iter().filter(|v| !v.is_finite()).count();
    assert_eq!(unwritten, 0, "{what}: {unwritten} values not written");
    assert_eq!(plain, after_nans, "{what}: the runs differ");
}

fn config(padding: usize, stride: usize) -> Conv2dConfig {
    Conv2dConfig {
        padding,
        stride,
        dilation: 1,
        groups: 1,
        cudnn_fwd_algo: None,
    }
}

#[test]
fn every_output_value_is_stored() {
    let d = &Device::Cpu;
    let randn = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, d).unwrap();
    // (batch, c_in, side, c_out, padding, stride, prep): slab tiles, Winograd (f32, from 512
    // output tiles), a tile spanning images, strides, upsampling and bottom-right padding.
    let convolutions = [
        (1, 16, 48, 16, 1, 1, InputPrep::NONE),
        (2, 8, 12, 6, 1, 1, InputPrep::NONE),
        (1, 3, 33, 8, 1, 1, InputPrep::NONE),
        (1, 8, 32, 6, 0, 2, InputPrep::pad_bottom_right(1)),
        (2, 16, 20, 16, 1, 1, InputPrep::upsample(2)),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for &(b, ci, side, co, padding, stride, prep) in &convolutions {
            let x = randn(&[b, ci, side, side]).to_dtype(dtype).unwrap();
            let weight = randn(&[co, ci, 3, 3]).to_dtype(dtype).unwrap();
            let bias = randn(&[co]).to_dtype(dtype).unwrap();
            let cfg = config(padding, stride);
            let what = format!("{dtype:?} convolution {b}x{ci}x{side}² -> {co}, {prep:?}");
            assert_fully_written(&what, || {
                conv2d(&x, &weight, Some(&bias), &cfg, prep, None).unwrap()
            });
            if let Some(packed) = PackedKernel::pack(&weight).unwrap() {
                assert_fully_written(&format!("packed {what}"), || {
                    conv2d_packed(&x, &packed, Some(&bias), &cfg, prep, None).unwrap()
                });
            }
        }
        let x = randn(&[2, 32, 24, 24]).to_dtype(dtype).unwrap();
        let (weight, bias) = (randn(&[32]), randn(&[32]));
        for silu in [false, true] {
            let params = GroupNormParams {
                groups: 8,
                eps: 1e-6,
                weight: &weight,
                bias: &bias,
                silu,
            };
            assert_fully_written(&format!("{dtype:?} group norm, SiLU {silu}"), || {
                group_norm(&x, &params).unwrap()
            });
        }
        let rows = randn(&[3, 77, 160]).to_dtype(dtype).unwrap();
        let (weight, bias) = (randn(&[160]), randn(&[160]));
        assert_fully_written(&format!("{dtype:?} layer norm"), || {
            layer_norm::layer_norm(&rows, &weight, &bias, 1e-5).unwrap()
        });
        assert_fully_written(&format!("{dtype:?} GELU"), || {
            activation::gelu_erf(&rows).unwrap()
        });
        assert_fully_written(&format!("{dtype:?} GEGLU"), || {
            activation::geglu(&rows).unwrap()
        });
    }
}
