//! A cache-blocked 2-D transpose for CPU tensors.
//!
//! Linear layers keep their weight as `[in, out]` (see [`crate::layers::Linear`]), which means
//! transposing every stored `[out, in]` weight once at load. candle's strided copy computes an
//! index per element and walks the source column-wise; this copies 32×32 blocks instead, so
//! both sides stay in cache.

use candle_core::{DType, Device, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

/// Side of the square blocks copied at once.
const BLOCK: usize = 32;

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

fn transpose_typed<T: WithDType>(
    t: &Tensor,
    rows: usize,
    cols: usize,
) -> candle_core::Result<Tensor> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("transpose: expected a CPU tensor")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("transpose: expected a contiguous tensor")
    };
    let src = cpu
        .as_slice::<T>()?
        .get(start..end)
        .ok_or_else(|| candle_core::Error::Msg("transpose: storage too short".into()))?;
    let mut dst = vec![T::zero(); src.len()];
    crate::loading::memory::advise_huge_pages(&mut dst);
    if rows > 0 && cols > 0 {
        // Bands of BLOCK destination rows (source columns), one task each.
        dst.par_chunks_mut(BLOCK * rows)
            .enumerate()
            .for_each(|(band, dst_band)| transpose_band(src, dst_band, rows, cols, band * BLOCK));
    }
    drop(storage);
    Tensor::from_vec(dst, (cols, rows), &Device::Cpu)
}

/// Writes the source columns `c0 ..` (as many as `dst_band` holds rows) into `dst_band`,
/// BLOCK source rows at a time so that both sides stay in cache.
fn transpose_band<T: Copy>(src: &[T], dst_band: &mut [T], rows: usize, cols: usize, c0: usize) {
    let width = dst_band.len() / rows;
    for r0 in (0..rows).step_by(BLOCK) {
        let r1 = (r0 + BLOCK).min(rows);
        for r in r0..r1 {
            let Some(src_row) = src.get(r * cols + c0..r * cols + c0 + width) else {
                return;
            };
            for (j, &v) in src_row.iter().enumerate() {
                // SAFETY: j < width and r < rows, so j·rows + r < width·rows = dst_band.len().
                unsafe { *dst_band.get_unchecked_mut(j * rows + r) = v };
            }
        }
    }
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
