//! Convolution tiles without a column matrix: the GEMM reads its B straight from a small
//! rewritten copy of the tile's input.
//!
//! A tile's input rows (with the rows the taps reach above and below) are rewritten once as a
//! [`Slab`]: one plane per k-step group (a pair of channels as `u32` for bf16 kernels packed in
//! channel pairs, one channel for f32), with the zero padding and the nearest-neighbour
//! upsampling of [`InputPrep`](super::InputPrep) applied. With stride 1, the k-step (plane,
//! tap) over `NR` consecutive output columns of one row is `NR` consecutive values of that
//! plane, shifted by the tap, and the GEMM reads them in place through an [`IndexedB`].
//!
//! The slab is about the size of the tile's input (the column matrix is nine times that), and
//! it stays in the core's L2 cache while the weight streams past it.

use half::bf16;

use super::{Geometry, TileRows};
use crate::kernels::bf16_gemm::{IndexedB, PANEL_COLUMNS};

/// Whether a convolution's tiles can run without a column matrix: a kernel packed for it
/// (`kernel_reads_slabs`), stride 1, no dilation, and output rows a whole number of GEMM
/// panels.
pub(super) fn direct_applies(g: &Geometry, kernel_reads_slabs: bool) -> bool {
    kernel_reads_slabs
        && g.stride == 1
        && g.dilation == 1
        && g.out_w > 0
        && g.out_w.is_multiple_of(PANEL_COLUMNS)
}

/// Whether a tile of such a convolution lies within one image (a slab holds one image's rows).
pub(super) fn within_one_image(g: &Geometry, tile: TileRows) -> bool {
    tile.count > 0 && tile.first / g.out_h == (tile.first + tile.count - 1) / g.out_h
}

/// Bytes of slab per output row of a tile of `element`-byte input values (for sizing tiles).
pub(super) fn slab_row_bytes(g: &Geometry, element: usize) -> usize {
    g.c_in * (g.out_w + g.kernel_w - 1) * element
}

/// An input element type and the slab values it is rewritten into.
pub(super) trait SlabInput: Copy {
    /// One slab value: a `u32` pair of bf16 channels, or an f32.
    type Value: Copy + Default;
    /// Input channels per plane.
    const CHANNELS: usize;

    /// `dst[j]` from column `j / upsample` of the plane's channel rows (`rows[1]` is empty
    /// for one channel per plane).
    fn write_row(rows: [&[Self]; 2], upsample: usize, dst: &mut [Self::Value]);
}

impl SlabInput for bf16 {
    type Value = u32;
    const CHANNELS: usize = 2;

    #[inline(always)]
    fn write_row([lo, hi]: [&[bf16]; 2], upsample: usize, dst: &mut [u32]) {
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
}

impl SlabInput for f32 {
    type Value = f32;
    const CHANNELS: usize = 1;

    #[inline(always)]
    fn write_row([row, _]: [&[f32]; 2], upsample: usize, dst: &mut [f32]) {
        match upsample {
            1 => {
                let n = dst.len().min(row.len());
                dst[..n].copy_from_slice(&row[..n]);
            }
            2 => {
                for (d, &v) in dst.chunks_exact_mut(2).zip(row) {
                    d[0] = v;
                    d[1] = v;
                }
            }
            _ => {
                for (j, d) in dst.iter_mut().enumerate() {
                    if let Some(&v) = row.get(j / upsample) {
                        *d = v;
                    }
                }
            }
        }
    }
}

/// One tile's input: `[c_in / CHANNELS][count + kh − 1][out_w + kw − 1]` values, row `r` and
/// column `c` holding the prepared input at `(oh0 + r − padding, c − padding)`, zero outside
/// it; plus the offset tables that make it the tile's B.
pub(super) struct Slab<'a, V> {
    values: &'a [V],
    row_offsets: &'a [usize],
    panel_offsets: &'a [usize],
    k: usize,
    n: usize,
}

impl<'a, V: Copy + Default> Slab<'a, V> {
    /// Writes the slab of `tile` (where [`direct_applies`] and [`within_one_image`]) into
    /// `values` and its offsets into `row_offsets` and `panel_offsets`, each grown as needed.
    pub(super) fn fill<I: SlabInput<Value = V>>(
        g: &Geometry,
        x: &[I],
        tile: TileRows,
        values: &'a mut Vec<V>,
        row_offsets: &'a mut Vec<usize>,
        panel_offsets: &'a mut Vec<usize>,
    ) -> Self {
        let (taps, planes) = (g.kernel_h * g.kernel_w, g.c_in / I::CHANNELS);
        let (rows, cols) = (tile.count + g.kernel_h - 1, g.out_w + g.kernel_w - 1);
        let plane = rows * cols;
        values.resize(planes * plane, V::default());
        fill_planes(g, x, tile, (rows, cols), &mut values[..planes * plane]);
        row_offsets.clear();
        row_offsets.extend((0..planes * taps).map(|p| {
            let (index, tap) = (p / taps, p % taps);
            index * plane + (tap / g.kernel_w) * cols + tap % g.kernel_w
        }));
        let n = tile.count * g.out_w;
        panel_offsets.clear();
        panel_offsets.extend(
            (0..n.div_ceil(PANEL_COLUMNS))
                .map(|j| j * PANEL_COLUMNS)
                .map(|first| (first / g.out_w) * cols + first % g.out_w),
        );
        Self {
            values: &values[..planes * plane],
            row_offsets,
            panel_offsets,
            k: g.k(),
            n,
        }
    }
}

impl<'a> Slab<'a, u32> {
    /// The slab as the bf16 GEMM's B (`c_in · taps` x `count · out_w`).
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

impl<'a> Slab<'a, f32> {
    /// The slab as the f32 GEMM's B (`c_in · taps` x `count · out_w`).
    pub(super) fn rhs(&self) -> crate::Result<IndexedB<'a, f32>> {
        IndexedB::new_f32(
            self.values,
            self.k,
            self.n,
            self.row_offsets,
            self.panel_offsets,
        )
    }
}

/// Writes every plane of the slab, compiled for AVX-512 where the CPU has it (the rows then
/// run 16 values wide).
fn fill_planes<I: SlabInput>(
    g: &Geometry,
    x: &[I],
    tile: TileRows,
    size: (usize, usize),
    out: &mut [I::Value],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        return unsafe { fill_planes_avx512(g, x, tile, size, out) };
    }
    fill_planes_body(g, x, tile, size, out);
}

/// [`fill_planes_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn fill_planes_avx512<I: SlabInput>(
    g: &Geometry,
    x: &[I],
    tile: TileRows,
    size: (usize, usize),
    out: &mut [I::Value],
) {
    fill_planes_body(g, x, tile, size, out);
}

/// The work of [`fill_planes`].
#[inline(always)]
fn fill_planes_body<I: SlabInput>(
    g: &Geometry,
    x: &[I],
    tile: TileRows,
    (rows, cols): (usize, usize),
    out: &mut [I::Value],
) {
    let (image, oh0) = (tile.first / g.out_h, tile.first % g.out_h);
    let src_plane = g.src_height * g.src_width;
    // Columns of the slab that hold input values: `padding .. padding + width`.
    let (left, inside) = (
        g.padding.min(cols),
        g.width.min(cols.saturating_sub(g.padding)),
    );
    for (index, plane) in out.chunks_exact_mut((rows * cols).max(1)).enumerate() {
        let channel = image * g.c_in + I::CHANNELS * index;
        let first = x.get(channel * src_plane..).unwrap_or_default();
        let second = match I::CHANNELS {
            2 => x.get((channel + 1) * src_plane..).unwrap_or_default(),
            _ => &[],
        };
        for (r, dst) in plane.chunks_exact_mut(cols).enumerate() {
            let iy = (oh0 + r).checked_sub(g.padding).filter(|&iy| iy < g.height);
            let Some(iy) = iy else {
                dst.fill(I::Value::default());
                continue;
            };
            let row = (iy / g.upsample) * g.src_width..(iy / g.upsample + 1) * g.src_width;
            let source = [
                first.get(row.clone()).unwrap_or_default(),
                second.get(row).unwrap_or_default(),
            ];
            let (head, rest) = dst.split_at_mut(left);
            head.fill(I::Value::default());
            let (body, tail) = rest.split_at_mut(inside);
            tail.fill(I::Value::default());
            I::write_row(source, g.upsample, body);
        }
    }
}
