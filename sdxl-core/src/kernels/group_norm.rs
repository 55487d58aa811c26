//! Group normalisation, optionally followed by SiLU, in one pass over f32 or bf16 CPU tensors.
//!
//! candle-nn's `GroupNorm` is six whole-tensor operations (mean, subtract, square, mean,
//! divide, scale and shift), each writing a fresh tensor, and the SiLU after it is a seventh. At
//! VAE-decoder sizes (128 channels at 512×512 pixels, 134 MB a tensor) those passes cost as much
//! as a convolution. Here each (image, group) slice is read twice (mean, then variance, each
//! summed in f32 lanes within blocks of 4096 values and across blocks in f64) and written
//! once, with the affine transform and SiLU applied on the way (bf16 values are widened to f32
//! as they are read and rounded once as they are written, so no widened copy of the tensor is
//! made). All three passes are vectorised (AVX-512 or AVX2 where the CPU has them, with a
//! vectorisable `exp` for the SiLU; on AVX-512 the SiLU pass is written in intrinsics,
//! `vector.rs`).

use std::mem::MaybeUninit;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::math::{lane_sum, silu, Element, Values};
use super::storage::{assume_written, contiguous_values, unwritten};

/// Whether [`group_norm`] handles `x`: an f32 or bf16 tensor on the CPU with at least 3
/// dimensions.
pub fn supports(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu)
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && x.rank() >= 3
}

/// The normalisation: `groups` groups over dimension 1, per-channel `weight` and `bias`.
#[derive(Debug, Clone, Copy)]
pub struct GroupNormParams<'a> {
    /// Number of groups; divides the channels.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Per-channel scale `[C]`.
    pub weight: &'a Tensor,
    /// Per-channel shift `[C]`.
    pub bias: &'a Tensor,
    /// Apply SiLU to the result.
    pub silu: bool,
}

/// `GroupNorm(x)` (and SiLU when asked) for an f32 or bf16 CPU tensor `[B, C, ...]` (see
/// [`supports`]), in `x`'s dtype.
///
/// # Errors
/// Shapes that do not fit (groups not dividing the channels, weight or bias of another length),
/// or a tensor [`supports`] refuses.
pub fn group_norm(x: &Tensor, params: &GroupNormParams) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F32 => group_norm_typed::<f32>(x, params),
        DType::BF16 => group_norm_typed::<bf16>(x, params),
        other => candle_core::bail!("group norm kernel: unsupported dtype {other:?}"),
    }
}

fn group_norm_typed<T: Values>(
    x: &Tensor,
    params: &GroupNormParams,
) -> candle_core::Result<Tensor> {
    let (batch, channels) = (x.dim(0)?, x.dim(1)?);
    let groups = params.groups;
    if groups == 0 || channels % groups != 0 {
        candle_core::bail!("group norm: {groups} groups do not divide {channels} channels")
    }
    let weight = params.weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let bias = params.bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if weight.len() != channels || bias.len() != channels {
        candle_core::bail!("group norm: weight/bias do not have {channels} values")
    }
    let spatial = x.elem_count() / (batch * channels).max(1);
    let x = x.contiguous()?;
    let values = x.flatten_all()?;
    let (storage, layout) = values.storage_and_layout();
    let input = contiguous_values::<T>(&storage, layout, "group norm")?;
    let group_len = spatial * (channels / groups);
    let mut out = unwritten::<T>(input.len());
    out.par_chunks_mut(group_len.max(1))
        .zip(input.par_chunks(group_len.max(1)))
        .enumerate()
        .for_each(|(index, (dst, src))| {
            let first_channel = (index % groups) * (channels / groups);
            normalise_group(src, dst, spatial, first_channel, &weight, &bias, params);
        });
    drop(storage);
    // SAFETY: the chunks of `out` and `input` pair up one to one (same lengths), and
    // `normalise_group` writes every value of its chunk.
    let out = unsafe { assume_written(out) };
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

/// Normalises one group (`src` holds its channels one after the other, `spatial` values each),
/// on the widest vector unit this CPU has.
fn normalise_group<T: Values>(
    src: &[T],
    dst: &mut [MaybeUninit<T>],
    spatial: usize,
    first_channel: usize,
    weight: &[f32],
    bias: &[f32],
    params: &GroupNormParams,
) {
    let group = Group {
        spatial,
        first_channel,
        weight,
        bias,
        eps: params.eps,
        silu: params.silu,
    };
    #[cfg(target_arch = "x86_64")]
    {
        if super::vector::available() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { normalise_group_avx512(src, dst, &group) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { normalise_group_avx2(src, dst, &group) };
        }
    }
    normalise_group_portable(src, dst, &group);
}

/// What [`normalise_group`] needs besides the values.
struct Group<'a> {
    spatial: usize,
    first_channel: usize,
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f64,
    silu: bool,
}

/// [`normalise_group_portable`] compiled for AVX-512, with SiLU's affine step written in
/// AVX-512 (`vector.rs`: no division, fused multiply-adds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn normalise_group_avx512<T: Values>(src: &[T], dst: &mut [MaybeUninit<T>], group: &Group) {
    normalise_group_with(src, dst, group, |src, dst, scale, shift| {
        if group.silu {
            // SAFETY: this function runs only where `vector::available()` said yes.
            unsafe { super::vector::affine_silu(src, dst, scale, shift) };
        } else {
            affine(src, dst, scale, shift, false);
        }
    });
}

/// [`normalise_group_portable`] compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn normalise_group_avx2<T: Element>(src: &[T], dst: &mut [MaybeUninit<T>], group: &Group) {
    normalise_group_portable(src, dst, group);
}

/// [`normalise_group_with`] with the portable affine step.
#[inline(always)]
fn normalise_group_portable<T: Element>(src: &[T], dst: &mut [MaybeUninit<T>], group: &Group) {
    normalise_group_with(src, dst, group, |src, dst, scale, shift| {
        affine(src, dst, scale, shift, group.silu);
    });
}

/// The mean, then the variance around it (two reads), then one write per channel by
/// `affine(src, dst, scale, shift)` (the affine transform, and SiLU when the group asks): every
/// value of `dst` (as long as `src`) is written.
#[inline(always)]
fn normalise_group_with<T: Element>(
    src: &[T],
    dst: &mut [MaybeUninit<T>],
    group: &Group,
    affine: impl Fn(&[T], &mut [MaybeUninit<T>], f32, f32),
) {
    let n = src.len().max(1) as f64;
    let mean = block_sum(src, |v| v) / n;
    let centre = mean as f32;
    let variance = block_sum(src, |v| (v - centre) * (v - centre)) / n;
    let inv_std = 1.0 / (variance + group.eps).sqrt();
    let channels = src
        .chunks(group.spatial.max(1))
        .zip(dst.chunks_mut(group.spatial.max(1)));
    for (c, (src, dst)) in channels.enumerate() {
        let channel = group.first_channel + c;
        // `group_norm_typed` checked that every channel has a weight and a bias.
        let w = group.weight.get(channel).copied().unwrap_or(0.0);
        let b = group.bias.get(channel).copied().unwrap_or(0.0);
        let scale = (f64::from(w) * inv_std) as f32;
        let shift = (f64::from(b) - mean * f64::from(w) * inv_std) as f32;
        affine(src, dst, scale, shift);
    }
}

#[inline(always)]
fn affine<T: Element>(
    src: &[T],
    dst: &mut [MaybeUninit<T>],
    scale: f32,
    shift: f32,
    silu_on: bool,
) {
    if silu_on {
        for (d, &s) in dst.iter_mut().zip(src) {
            d.write(T::store(silu(s.load() * scale + shift)));
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            d.write(T::store(s.load() * scale + shift));
        }
    }
}

/// Values summed in f32 lanes ([`lane_sum`]) before the partial sums go into the f64 total: a
/// VAE group holds up to a million values, too many for f32 sums, and f64 lanes do not
/// vectorise as well.
const BLOCK: usize = 4096;

/// `Σ f(v)`: f32 lane sums within blocks of [`BLOCK`] values, blocks summed in f64.
#[inline(always)]
fn block_sum<T: Element>(values: &[T], f: impl Fn(f32) -> f32) -> f64 {
    values
        .chunks(BLOCK)
        .map(|block| f64::from(lane_sum(block, &f)))
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::Module;

    use super::*;
    use crate::test_support::max_abs_diff;

    /// Ours against candle-nn's `GroupNorm` (and SiLU), on 3-d and 4-d inputs.
    #[test]
    fn matches_candle_group_norm() {
        for (shape, groups) in [
            (vec![2, 8, 5, 7], 4),
            (vec![1, 6, 33], 3),
            (vec![3, 4, 2, 2], 1),
        ] {
            let channels = shape[1];
            let x =
                (Tensor::randn(0f32, 2.0, shape.as_slice(), &Device::Cpu).unwrap() + 3.0).unwrap();
            let weight = Tensor::randn(0f32, 1.0, channels, &Device::Cpu).unwrap();
            let bias = Tensor::randn(0f32, 1.0, channels, &Device::Cpu).unwrap();
            let theirs =
                candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, 1e-5)
                    .unwrap()
                    .forward(&x)
                    .unwrap();
            for silu in [false, true] {
                let params = GroupNormParams {
                    groups,
                    eps: 1e-5,
                    weight: &weight,
                    bias: &bias,
                    silu,
                };
                let ours = group_norm(&x, &params).unwrap();
                let ours_bf16 = group_norm(&x.to_dtype(DType::BF16).unwrap(), &params).unwrap();
                assert_eq!(ours_bf16.dtype(), DType::BF16);
                let of_rounded = group_norm(
                    &x.to_dtype(DType::BF16)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap(),
                    &params,
                )
                .unwrap();
                // The bf16 result is the f32 result of the same (rounded) input, rounded once
                // to bf16: within half a bf16 ulp (2⁻⁸ relative) of it, element by element.
                // (An absolute 0.02 failed whenever a random weight pushed a value past 8.)
                let ours_wide = ours_bf16.to_dtype(DType::F32).unwrap();
                let got = ours_wide.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want = of_rounded.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (g, w) in got.iter().zip(&want) {
                    let bound = w.abs() * 2f32.powi(-8) + 1e-6;
                    assert!(
                        (g - w).abs() <= bound,
                        "bf16 {g} against {w} (bound {bound})"
                    );
                }
                let expected = if silu {
                    theirs.silu().unwrap()
                } else {
                    theirs.clone()
                };
                let worst = max_abs_diff(&ours, &expected);
                assert!(
                    worst < 1e-5,
                    "{shape:?} groups {groups} silu {silu}: worst {worst}"
                );
            }
        }
    }

    #[test]
    fn rejects_groups_not_dividing_channels() {
        let x = Tensor::zeros((1, 6, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(6, DType::F32, &Device::Cpu).unwrap();
        let params = GroupNormParams {
            groups: 4,
            eps: 1e-5,
            weight: &w,
            bias: &w,
            silu: false,
        };
        assert!(group_norm(&x, &params).is_err());
    }
}
