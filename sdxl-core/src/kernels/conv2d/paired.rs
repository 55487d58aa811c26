//! The bf16 convolution with input channels in pairs: the GEMM reads its B straight from a
//! small rewritten copy of the tile's input, and no column matrix is built.
//!
//! The bf16 GEMM multiplies k-pairs, two bf16 in one `u32`. In the NCHW weight's order,
//! k runs over (channel, tap), so a pair would join two taps of one channel (or, a 3×3 kernel
//! having an odd number of taps, the last tap of one channel and the first of the next), and
//! each pair of each column would be gathered from two places. A [`PackedKernel`] of a kernel
//! with several taps and an even number of channels orders k as (channel pair, tap, channel in
//! the pair) instead ([`pair_order`]). Then:
//! - the tile's input rows (with the rows the taps reach above and below) are rewritten once
//!   as a [`Slab`]: planes of `u32` pairs of channels `2c` and `2c + 1`, with the zero padding
//!   and the nearest-neighbour upsampling of [`InputPrep`] applied;
//! - with stride 1, k-pair (pair, tap) over `NR` consecutive output columns of one row is `NR`
//!   consecutive pairs of that pair's plane, shifted by the tap. The GEMM reads them in place
//!   through an [`IndexedB`].
//!
//! The slab is about the size of the tile's input (the column matrix is nine times that), and
//! it stays in the core's L2 cache while the weight streams past it.
//!
//! [`PackedKernel`]: super::PackedKernel
//! [`InputPrep`]: super::InputPrep

use half::bf16;

use super::{Geometry, TileRows};
use crate::kernels::bf16_gemm::{IndexedB, PANEL_COLUMNS};

/// The order of k (the columns of the packed weight, the rows of the column matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KOrder {
    /// (channel, tap), as the NCHW weight stores it.
    Nchw,
    /// (channel pair, tap, channel in the pair); see the module docs.
    ChannelPairs,
}

impl KOrder {
    /// The order [`super::PackedKernel`] uses for a kernel: channel pairs where there are
    /// several taps and an even number of channels (a 1×1 kernel's two orders are the same).
    pub(super) fn for_kernel(c_in: usize, taps: usize) -> Self {
        if taps > 1 && c_in.is_multiple_of(2) {
            KOrder::ChannelPairs
        } else {
            KOrder::Nchw
        }
    }

    /// The NCHW index (channel · taps + tap) of k index `r` in this order.
    #[inline]
    pub(super) fn nchw_index(self, r: usize, taps: usize) -> usize {
        match self {
            KOrder::Nchw => r,
            KOrder::ChannelPairs => {
                let (pair, tap, half) = (r / (2 * taps), (r / 2) % taps, r % 2);
                (2 * pair + half) * taps + tap
            }
        }
    }
}

/// The NCHW index of each k index of a row in the channel-pair order, in order (as
/// [`KOrder::nchw_index`], without a division per value).
pub(super) fn pair_indices(c_in: usize, taps: usize) -> impl Iterator<Item = usize> {
    (0..c_in / 2).flat_map(move |pair| {
        (0..taps).flat_map(move |tap| (0..2).map(move |half| (2 * pair + half) * taps + tap))
    })
}

/// The `[c_out, c_in · taps]` NCHW weight rows in `order`.
pub(super) fn pair_order(weight: &[bf16], c_in: usize, taps: usize, order: KOrder) -> Vec<bf16> {
    let mut out = weight.to_vec();
    if order == KOrder::ChannelPairs {
        let k = c_in * taps;
        for (dst, src) in out.chunks_exact_mut(k).zip(weight.chunks_exact(k)) {
            for (d, nchw) in dst.iter_mut().zip(pair_indices(c_in, taps)) {
                *d = src[nchw];
            }
        }
    }
    out
}

/// The inverse of [`pair_order`]: NCHW weight rows from rows in `order`.
pub(super) fn nchw_order(rows: &[bf16], c_in: usize, taps: usize, order: KOrder) -> Vec<bf16> {
    let mut out = rows.to_vec();
    if order == KOrder::ChannelPairs {
        let k = c_in * taps;
        for (dst, src) in out.chunks_exact_mut(k).zip(rows.chunks_exact(k)) {
            for (&v, nchw) in src.iter().zip(pair_indices(c_in, taps)) {
                dst[nchw] = v;
            }
        }
    }
    out
}

/// Whether the convolution's tiles can run without a column matrix: a kernel packed in channel
/// pairs, stride 1, no dilation, and output rows a whole number of GEMM panels.
pub(super) fn direct_applies(g: &Geometry, order: KOrder) -> bool {
    order == KOrder::ChannelPairs
        && g.stride == 1
        && g.dilation == 1
        && g.out_w > 0
        && g.out_w.is_multiple_of(PANEL_COLUMNS)
}

/// Whether a tile of such a convolution lies within one image (a slab holds one image's rows).
pub(super) fn within_one_image(g: &Geometry, tile: TileRows) -> bool {
    tile.count > 0 && tile.first / g.out_h == (tile.first + tile.count - 1) / g.out_h
}

/// Bytes of slab per output row of a tile (for sizing tiles).
pub(super) fn slab_row_bytes(g: &Geometry) -> usize {
    g.c_in * (g.out_w + g.kernel_w - 1) * std::mem::size_of::<bf16>()
}

/// One tile's input in channel pairs: `[c_in / 2][count + kh − 1][out_w + kw − 1]` `u32`, row
/// `r` and column `c` holding the prepared input at `(oh0 + r − padding, c − padding)`, zero
/// outside it; plus the offset tables that make it the tile's B.
pub(super) struct Slab<'a> {
    values: &'a [u32],
    row_offsets: &'a [usize],
    panel_offsets: &'a [usize],
    k: usize,
    n: usize,
}

impl<'a> Slab<'a> {
    /// Writes the slab of `tile` (where [`direct_applies`] and [`within_one_image`]) into `values` and its offsets
    /// into `row_offsets` and `panel_offsets`, each grown as needed.
    pub(super) fn fill(
        g: &Geometry,
        x: &[bf16],
        tile: TileRows,
        values: &'a mut Vec<u32>,
        row_offsets: &'a mut Vec<usize>,
        panel_offsets: &'a mut Vec<usize>,
    ) -> Self {
        let (taps, pairs) = (g.kernel_h * g.kernel_w, g.c_in / 2);
        let (rows, cols) = (tile.count + g.kernel_h - 1, g.out_w + g.kernel_w - 1);
        let plane = rows * cols;
        values.resize(pairs * plane, 0);
        fill_planes(g, x, tile, (rows, cols), values);
        row_offsets.clear();
        row_offsets.extend((0..pairs * taps).map(|p| {
            let (pair, tap) = (p / taps, p % taps);
            pair * plane + (tap / g.kernel_w) * cols + tap % g.kernel_w
        }));
        let n = tile.count * g.out_w;
        panel_offsets.clear();
        panel_offsets.extend(
            (0..n.div_ceil(PANEL_COLUMNS))
                .map(|j| j * PANEL_COLUMNS)
                .map(|first| (first / g.out_w) * cols + first % g.out_w),
        );
        Self {
            values: &values[..pairs * plane],
            row_offsets,
            panel_offsets,
            k: g.k(),
            n,
        }
    }

    /// The slab as the GEMM's B (`c_in · taps` x `count · out_w`).
    pub(super) fn rhs(&self) -> crate::Result<IndexedB<'a>> {
        IndexedB::new(
            self.values,
            self.k,
            self.n,
            self.row_offsets,
            self.panel_offsets,
        )
    }
}

/// Writes every plane of the slab, compiled for AVX-512 where the CPU has it (the interleave
/// of two channels then runs 16 pixels wide).
fn fill_planes(g: &Geometry, x: &[bf16], tile: TileRows, size: (usize, usize), out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { fill_planes_avx512(g, x, tile, size, out) };
    }
    fill_planes_body(g, x, tile, size, out);
}

/// [`fill_planes_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn fill_planes_avx512(
    g: &Geometry,
    x: &[bf16],
    tile: TileRows,
    size: (usize, usize),
    out: &mut [u32],
) {
    fill_planes_body(g, x, tile, size, out);
}

/// The work of [`fill_planes`].
#[inline(always)]
fn fill_planes_body(
    g: &Geometry,
    x: &[bf16],
    tile: TileRows,
    (rows, cols): (usize, usize),
    out: &mut [u32],
) {
    let (image, oh0) = (tile.first / g.out_h, tile.first % g.out_h);
    let src_plane = g.src_height * g.src_width;
    // Columns of the slab that hold input values: `padding .. padding + width`.
    let (left, inside) = (
        g.padding.min(cols),
        g.width.min(cols.saturating_sub(g.padding)),
    );
    for (pair, plane) in out.chunks_exact_mut(rows * cols).enumerate() {
        let channel = image * g.c_in + 2 * pair;
        let lo = x.get(channel * src_plane..).unwrap_or_default();
        let hi = x.get((channel + 1) * src_plane..).unwrap_or_default();
        for (r, dst) in plane.chunks_exact_mut(cols).enumerate() {
            let iy = (oh0 + r).checked_sub(g.padding).filter(|&iy| iy < g.height);
            let Some(iy) = iy else {
                dst.fill(0);
                continue;
            };
            let row = (iy / g.upsample) * g.src_width..(iy / g.upsample + 1) * g.src_width;
            let (lo, hi) = (
                lo.get(row.clone()).unwrap_or_default(),
                hi.get(row).unwrap_or_default(),
            );
            let (head, rest) = dst.split_at_mut(left);
            head.fill(0);
            let (body, tail) = rest.split_at_mut(inside);
            tail.fill(0);
            interleave(lo, hi, g.upsample, body);
        }
    }
}

/// `dst[j] = lo[j / upsample] | hi[j / upsample] << 16`.
#[inline(always)]
fn interleave(lo: &[bf16], hi: &[bf16], upsample: usize, dst: &mut [u32]) {
    let pair = |l: &bf16, h: &bf16| u32::from(l.to_bits()) | (u32::from(h.to_bits()) << 16);
    match upsample {
        1 => {
            for ((d, l), h) in dst.iter_mut().zip(lo).zip(hi) {
                *d = pair(l, h);
            }
        }
        2 => {
            for ((d, l), h) in dst.chunks_exact_mut(2).zip(lo).zip(hi) {
                let v = pair(l, h);
                d[0] = v;
                d[1] = v;
            }
        }
        _ => {
            for (j, d) in dst.iter_mut().enumerate() {
                if let (Some(l), Some(h)) = (lo.get(j / upsample), hi.get(j / upsample)) {
                    *d = pair(l, h);
                }
            }
        }
    }
}
