//! Converting a stored 2-D tensor into the transpose of itself in another float dtype, in one
//! pass.
//!
//! Linear layers keep their weight as `[in, out]` (see [`crate::layers::Linear`]), the transpose
//! of what checkpoints store. Converting first and transposing after would fault in and zero a
//! second full-size buffer per weight; here each band of 32 source columns is converted row by
//! row (vectorised) and scattered straight into its destination rows.

use candle_core::{DType, Device, Tensor, WithDType};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::mapped::with_aligned;
use super::memory::advise_huge_pages;

/// Source columns handled per band (destination rows per task).
const BAND: usize = 32;

/// A float type weights are stored or computed in.
trait Element: WithDType + Default {
    /// Widens a run of values to f32.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Narrows one f32 value.
    fn narrow(value: f32) -> Self;
}

impl Element for f32 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow(value: f32) -> Self {
        value
    }
}

impl Element for f16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn narrow(value: f32) -> Self {
        f16::from_f32(value)
    }
}

impl Element for bf16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn narrow(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

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
            transpose_as::<S, f32>(src, rows, cols),
            (cols, rows),
            &Device::Cpu,
        ),
        DType::F16 => Tensor::from_vec(
            transpose_as::<S, f16>(src, rows, cols),
            (cols, rows),
            &Device::Cpu,
        ),
        DType::BF16 => Tensor::from_vec(
            transpose_as::<S, bf16>(src, rows, cols),
            (cols, rows),
            &Device::Cpu,
        ),
        other => candle_core::bail!("cannot produce transposed {other:?} weights"),
    }
}

/// `src` `[rows, cols]` → `[cols, rows]`, converted from `S` to `D`, one band per task.
fn transpose_as<S: Element, D: Element>(src: &[S], rows: usize, cols: usize) -> Vec<D> {
    let mut dst = vec![D::default(); src.len()];
    advise_huge_pages(&mut dst);
    if rows == 0 || cols == 0 {
        return dst;
    }
    dst.par_chunks_mut(BAND * rows)
        .enumerate()
        .for_each(|(band, dst_band)| {
            let c0 = band * BAND;
            let width = dst_band.len() / rows;
            let mut widened = [0f32; BAND];
            for r in 0..rows {
                let Some(segment) = src.get(r * cols + c0..r * cols + c0 + width) else {
                    return;
                };
                let widened = &mut widened[..width];
                S::widen(segment, widened);
                for (j, &v) in widened.iter().enumerate() {
                    // SAFETY: j < width and r < rows, so j·rows + r < width·rows, the band's
                    // length.
                    unsafe { *dst_band.get_unchecked_mut(j * rows + r) = D::narrow(v) };
                }
            }
        });
    dst
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
