//! Converting a stored 2-D tensor into the transpose of itself in another float dtype, in one
//! pass.
//!
//! Linear layers keep their weight as `[in, out]` (see [`crate::layers::Linear`]), the transpose
//! of what checkpoints store. Converting first and transposing after would fault in and zero a
//! second full-size buffer per weight; here the bytes go straight through
//! [`transpose_converted`], which converts while it transposes.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use super::mapped::with_aligned;
use crate::kernels::convert::Element;
use crate::kernels::transpose::transpose_converted;

/// The CPU tensor `[cols, rows]` holding the transpose of the `[rows, cols]` values stored as
/// `stored` in `bytes`, in `target`. Conversions go through f32, which is exact for widening and
/// for same-type copies.
///
/// # Errors
/// A dtype other than f32/f16/bf16, or a byte count that does not match the shape.
pub(super) fn convert_transposed(
    bytes: &[u8],
    stored: DType,
    target: DType,
    rows: usize,
    cols: usize,
) -> candle_core::Result<Tensor> {
    match stored {
        DType::F32 => with_aligned::<f32, _>(bytes, |src| to_target(src, target, rows, cols)),
        DType::F16 => with_aligned::<f16, _>(bytes, |src| to_target(src, target, rows, cols)),
        DType::BF16 => with_aligned::<bf16, _>(bytes, |src| to_target(src, target, rows, cols)),
        other => candle_core::bail!("cannot transpose stored {other:?} weights"),
    }
}

fn to_target<S: Element>(
    src: &[S],
    target: DType,
    rows: usize,
    cols: usize,
) -> candle_core::Result<Tensor> {
    if src.len() != rows * cols {
        candle_core::bail!("{} values stored for a {rows}x{cols} tensor", src.len())
    }
    match target {
        DType::F32 => Tensor::from_vec(
            transpose_converted::<S, f32>(src, rows, cols),
            (cols, rows),
            &Device::Cpu,
        ),
        DType::F16 => Tensor::from_vec(
            transpose_converted::<S, f16>(src, rows, cols),
            (cols, rows),
            &Device::Cpu,
        ),
        DType::BF16 => Tensor::from_vec(
            transpose_converted::<S, bf16>(src, rows, cols),
            (cols, rows),
            &Device::Cpu,
        ),
        other => candle_core::bail!("cannot produce transposed {other:?} weights"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Every dtype pair against candle's convert-then-transpose, on shapes with ragged bands.
    #[test]
    fn equals_convert_then_transpose() {
        for (rows, cols) in [(1, 1), (5, 70), (65, 33)] {
            let t = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
            for stored in [DType::F32, DType::F16, DType::BF16] {
                let s = t.to_dtype(stored).unwrap();
                let bytes: Vec<u8> = match stored {
                    DType::F32 => s
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                    DType::F16 => s
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f16>()
                        .unwrap()
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                    _ => s
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<bf16>()
                        .unwrap()
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                };
                for target in [DType::F32, DType::F16, DType::BF16] {
                    let ours = convert_transposed(&bytes, stored, target, rows, cols).unwrap();
                    let theirs = s.to_dtype(target).unwrap().t().unwrap();
                    assert_eq!(ours.dims(), &[cols, rows]);
                    let diff = (ours.to_dtype(DType::F32).unwrap()
                        - theirs.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                    assert_eq!(diff, 0.0, "{rows}x{cols} {stored:?} -> {target:?}");
                }
            }
        }
    }
}
