//! The AVX-512 path of packing lines along k (rows of A, columns of a transposed B) into
//! `[k2][W]` pairs: 16 lines at a time, one 64-byte load of 16 pairs from each, a 16×16
//! transpose of `u32` in registers, and one masked store per pair row. The scalar loop it
//! replaces wrote every pair on its own (a few percent of a bf16 UNet step).

use std::arch::x86_64::{
    __m512i, _mm512_loadu_si512, _mm512_mask_storeu_epi32, _mm512_setzero_si512,
    _mm512_shuffle_i32x4, _mm512_unpackhi_epi32, _mm512_unpackhi_epi64, _mm512_unpacklo_epi32,
    _mm512_unpacklo_epi64,
};

use half::bf16;

/// Pairs per block: one 64-byte load from each line.
const BLOCK: usize = 16;

/// Whether this CPU has what [`pack_full_blocks`] is compiled for.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Packs the leading whole blocks of `BLOCK` pairs (`2·BLOCK` values) of every line into
/// `dst` (`[k2][W]` pairs), and returns how many values of each line it packed: a multiple of
/// `2·BLOCK` that every non-empty line holds. Empty lines (past the matrix) give zeros; the
/// caller packs the rest.
///
/// # Safety
/// The CPU must have avx512f ([`available`]).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pack_full_blocks<const W: usize>(
    lines: &[&[bf16]; W],
    dst: &mut [u32],
) -> usize {
    let shortest = lines
        .iter()
        .map(|l| l.len())
        .filter(|&len| len > 0)
        .min()
        .unwrap_or(0);
    let blocks = (shortest / (2 * BLOCK)).min(dst.len() / (BLOCK * W));
    for (blk, block) in dst.chunks_exact_mut(BLOCK * W).take(blocks).enumerate() {
        let k0 = 2 * BLOCK * blk;
        for (group, first) in (0..W).step_by(BLOCK).enumerate() {
            let width = (W - first).min(BLOCK);
            let mut rows = [_mm512_setzero_si512(); BLOCK];
            for (row, line) in rows.iter_mut().zip(&lines[first..first + width]) {
                if let Some(values) = line.get(k0..k0 + 2 * BLOCK) {
                    // SAFETY: `values` is 32 bf16, 64 readable bytes.
                    *row = unsafe { _mm512_loadu_si512(values.as_ptr().cast()) };
                }
            }
            let columns = transpose(rows);
            let mask = ((1u32 << width) - 1) as u16;
            for (pair, column) in columns.iter().enumerate() {
                let at = pair * W + group * BLOCK;
                // SAFETY: `at + width <= (pair + 1)·W <= BLOCK·W`, inside `block`; the mask
                // stores only those `width` lanes.
                unsafe {
                    _mm512_mask_storeu_epi32(block.as_mut_ptr().add(at).cast(), mask, *column)
                };
            }
        }
    }
    blocks * 2 * BLOCK
}

/// The transpose of a 16×16 matrix of `u32` held as 16 rows: lane `j` of output `c` is lane
/// `c` of input `j`.
#[target_feature(enable = "avx512f")]
fn transpose(r: [__m512i; BLOCK]) -> [__m512i; BLOCK] {
    // Within each 128-bit lane, interleave pairs of rows, then pairs of pairs: u[4g + x] lane
    // L holds column 4L + x of rows 4g .. 4g + 4.
    let mut t = [_mm512_setzero_si512(); BLOCK];
    for i in 0..BLOCK / 2 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); BLOCK];
    for g in 0..BLOCK / 4 {
        let b = 4 * g;
        u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    // Gather lane L of u[x], u[4 + x], u[8 + x], u[12 + x] into output 4L + x.
    let mut out = [_mm512_setzero_si512(); BLOCK];
    for x in 0..4 {
        let even_low = _mm512_shuffle_i32x4::<0x88>(u[x], u[4 + x]);
        let odd_low = _mm512_shuffle_i32x4::<0xdd>(u[x], u[4 + x]);
        let even_high = _mm512_shuffle_i32x4::<0x88>(u[8 + x], u[12 + x]);
        let odd_high = _mm512_shuffle_i32x4::<0xdd>(u[8 + x], u[12 + x]);
        out[x] = _mm512_shuffle_i32x4::<0x88>(even_low, even_high);
        out[8 + x] = _mm512_shuffle_i32x4::<0xdd>(even_low, even_high);
        out[4 + x] = _mm512_shuffle_i32x4::<0x88>(odd_low, odd_high);
        out[12 + x] = _mm512_shuffle_i32x4::<0xdd>(odd_low, odd_high);
    }
    out
}
