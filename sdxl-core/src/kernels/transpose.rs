//! A cache-blocked 2-D transpose for CPU tensors.
//!
//! Linear layers keep their weight as `[in, out]` (see [`crate::layers::Linear`]), which means
//! transposing every stored `[out, in]` weight once at load. candle's strided copy computes an
//! index per element and walks the source column-wise; this reads bands of 32 source columns
//! row by row instead, so both sides stay in cache (and converts the dtype on the way when the
//! loader asks for it).

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::convert::Element;
use super::storage::contiguous_values;
use crate::loading::memory::advise_huge_pages;

/// A contiguous copy of the transpose of the 2-D tensor `t`: `[rows, cols]` → `[cols, rows]`.
/// Runs blocked on the CPU for f32/f16/bf16, through candle elsewhere.
///
/// # Errors
/// `t` not 2-D, or candle failures.
pub fn transpose_2d(t: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if !matches!(t.device(), Device::Cpu) {
        return t.t()?.contiguous();
    }
    match t.dtype() {
        DType::F32 => transpose_typed::<f32>(t, rows, cols),
        DType::F16 => transpose_typed::<f16>(t, rows, cols),
        DType::BF16 => transpose_typed::<bf16>(t, rows, cols),
        _ => t.t()?.contiguous(),
    }
}

fn transpose_typed<T: Element>(
    t: &Tensor,
    rows: usize,
    cols: usize,
) -> candle_core::Result<Tensor> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let src = contiguous_values::<T>(&storage, layout, "transpose")?;
    let dst = transpose_converted::<T, T>(src, rows, cols);
    drop(storage);
    Tensor::from_vec(dst, (cols, rows), &Device::Cpu)
}

/// Source columns handled per band (destination rows per task).
const BAND: usize = 32;

/// `src` `[rows, cols]` → `[cols, rows]`, converted from `S` to `D` (through f32: exact for
/// widening and same-type copies), one band of source columns per task: each source row segment
/// is widened in one vectorised call and scattered into the band's destination rows.
pub(crate) fn transpose_converted<S: Element, D: Element>(
    src: &[S],
    rows: usize,
    cols: usize,
) -> Vec<D> {
    let mut dst = D::zeroed(src.len());
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

    #[test]
    fn equals_candles_transpose() {
        for (rows, cols) in [(1, 1), (3, 70), (65, 33), (128, 96)] {
            let t = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let t = t.to_dtype(dtype).unwrap();
                let ours = transpose_2d(&t).unwrap().to_dtype(DType::F32).unwrap();
                let theirs = t.t().unwrap().to_dtype(DType::F32).unwrap();
                let diff = (ours - theirs).unwrap().abs().unwrap().sum_all().unwrap();
                assert_eq!(
                    diff.to_scalar::<f32>().unwrap(),
                    0.0,
                    "{rows}x{cols} {dtype:?}"
                );
            }
        }
    }
}
