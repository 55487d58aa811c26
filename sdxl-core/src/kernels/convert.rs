//! Converting whole buffers between the float types weights are stored and computed in, on
//! all threads: the loader's f16 → bf16 and f16/bf16 → f32 passes over a checkpoint.
//!
//! Each thread converts a run of values by widening a block to f32 (F16C where the CPU has it,
//! through `half`) and narrowing it to the target with a branch-free rounding the compiler
//! vectorises; `half`'s per-value `bf16::from_f32` branches, so a scalar pass over 2.6 billion
//! weights took seconds.

use candle_core::WithDType;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::math::round_bf16;

/// A float type weights are stored or computed in.
pub(crate) trait Element: WithDType + Default {
    /// Widens a run of values to f32.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Narrows one f32 value (round to nearest, ties to even).
    fn narrow(value: f32) -> Self;
    /// `len` zeros, from zeroed memory: the pages are faulted in by whichever thread writes
    /// them first, not all by the caller.
    fn zeroed(len: usize) -> Vec<Self>;
}

impl Element for f32 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        value
    }
    fn zeroed(len: usize) -> Vec<Self> {
        vec![0.0; len]
    }
}

impl Element for f16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        f16::from_f32(value)
    }
    fn zeroed(len: usize) -> Vec<Self> {
        vec![0u16; len].reinterpret_into()
    }
}

impl Element for bf16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        round_bf16(value)
    }
    fn zeroed(len: usize) -> Vec<Self> {
        vec![0u16; len].reinterpret_into()
    }
}

/// Values one task converts: 256 KiB of f32, about a millisecond of work.
const TASK: usize = 1 << 16;

/// Values widened at a time, in a stack buffer that stays in L1.
const BLOCK: usize = 1024;

/// `dst[i] = src[i]` converted from `S` to `D` (through f32: exact for widening and for
/// same-type copies), on rayon's global pool. Converts the common length of the two.
pub(crate) fn convert_slice<S: Element, D: Element>(src: &[S], dst: &mut [D]) {
    let len = src.len().min(dst.len());
    dst[..len]
        .par_chunks_mut(TASK)
        .zip(src[..len].par_chunks(TASK))
        .for_each(|(dst, src)| {
            let mut widened = [0f32; BLOCK];
            for (dst, src) in dst.chunks_mut(BLOCK).zip(src.chunks(BLOCK)) {
                let widened = &mut widened[..src.len()];
                S::widen(src, widened);
                for (d, &v) in dst.iter_mut().zip(widened.iter()) {
                    *d = D::narrow(v);
                }
            }
        });
}

/// `src` converted from `S` to `D` into a new buffer (see [`convert_slice`]).
pub(crate) fn converted<S: Element, D: Element>(src: &[S]) -> Vec<D> {
    let mut dst = D::zeroed(src.len());
    crate::loading::memory::advise_huge_pages(&mut dst);
    convert_slice(src, &mut dst);
    dst
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Every f16 bit pattern (normals, subnormals, zeros, infinities, NaNs) converts to the
    /// bf16 and f32 that `half` gives one value at a time, across task and block boundaries.
    #[test]
    fn matches_half_value_by_value() {
        let all: Vec<f16> = (0..=u16::MAX)
            .cycle()
            .take(3 * TASK + 17)
            .map(f16::from_bits)
            .collect();
        let to_bf16: Vec<bf16> = converted(&all);
        let to_f32: Vec<f32> = converted(&all);
        for ((x, b), f) in all.iter().zip(&to_bf16).zip(&to_f32) {
            let wide = x.to_f32();
            assert_eq!(
                b.to_bits(),
                bf16::from_f32(wide).to_bits(),
                "f16 {:#06x}",
                x.to_bits()
            );
            assert_eq!(f.to_bits(), wide.to_bits(), "f16 {:#06x}", x.to_bits());
        }
        let from_f32: Vec<bf16> = converted(&to_f32);
        assert!(from_f32
            .iter()
            .zip(&to_bf16)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let back: Vec<f16> = converted(&to_f32);
        assert!(back
            .iter()
            .zip(&all)
            .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
    }

    /// A shorter destination converts only the common length.
    #[test]
    fn converts_the_common_length() {
        let src = [f16::ONE; 5];
        let mut dst = [bf16::ZERO; 3];
        convert_slice(&src, &mut dst);
        assert_eq!(dst, [bf16::ONE; 3]);
    }
}
