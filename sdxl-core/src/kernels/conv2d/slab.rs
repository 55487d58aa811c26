//! Convolution tiles without a column matrix: the GEMM reads its B straight from a small
//! rewritten copy of the tile's input.
//!
//! A tile's input rows (with the rows the taps reach above and below) are rewritten once as a
//! [`Slab`]: one plane per k-step group (a pair of channels as `u32` for bf16 kernels packed in
//! channel pairs, one channel for f32), with the zero padding and the nearest-neighbour
//! upsampling of [`InputPrep`](super::InputPrep) applied. Each slab row is stored as `stride`
//! phases: the columns `c` with `c % stride == q` in phase `q`, in order (one phase, the row
//! itself, for stride 1). Then the k-step (plane, tap) over `NR` consecutive output columns of
//! one row is `NR` consecutive values of one phase, shifted by the tap, and the GEMM reads them
//! in place through an [`IndexedB`]: output column `o` under horizontal tap `t` reads slab
//! column `o · stride + t`, which is column `o + t / stride` of phase `t % stride`.
//!
//! The slab is about the size of the tile's input (the column matrix is nine times that for
//! stride 1), and it stays in the core's L2 cache while the weight streams past it.

use half::bf16;

use super::{Geometry, TileRows};
use crate::kernels::bf16_gemm::{IndexedB, PANEL_COLUMNS};

/// Whether a convolution's tiles can run without a column matrix: a kernel packed for it
/// (`kernel_reads_slabs`), no dilation, and output rows a whole number of GEMM panels.
pub(super) fn direct_applies(g: &Geometry, kernel_reads_slabs: bool) -> bool {
    kernel_reads_slabs && g.dilation == 1 && g.out_w > 0 && g.out_w.is_multiple_of(PANEL_COLUMNS)
}

/// Whether a tile of such a convolution lies within one image (a slab holds one image's rows).
pub(super) fn within_one_image(g: &Geometry, tile: TileRows) -> bool {
    tile.count > 0 && tile.first / g.out_h == (tile.first + tile.count - 1) / g.out_h
}

/// Bytes of slab per output row of a tile of `element`-byte input values (for sizing tiles):
/// `stride` slab rows.
pub(super) fn slab_row_bytes(g: &Geometry, element: usize) -> usize {
    g.c_in * g.stride * SlabShape::new(g, 1).row_len() * element
}

/// The sizes of one plane of a tile's slab.
#[derive(Debug, Clone, Copy)]
struct SlabShape {
    /// Slab rows: the input rows the tile's taps reach.
    rows: usize,
    /// Columns per phase: the furthest any output column reaches into one phase, `out_w +
    /// (kw − 1) / stride`.
    phase_cols: usize,
    stride: usize,
}

impl SlabShape {
    /// The plane of a tile of `count` output rows.
    fn new(g: &Geometry, count: usize) -> Self {
        Self {
            rows: count.saturating_sub(1) * g.stride + g.kernel_h,
            phase_cols: g.out_w + (g.kernel_w - 1) / g.stride,
            stride: g.stride,
        }
    }

    /// Values per slab row (all of its phases).
    fn row_len(&self) -> usize {
        self.stride * self.phase_cols
    }

    /// Values per plane.
    fn plane_len(&self) -> usize {
        self.rows * self.row_len()
    }

    /// Where tap `(ty, tx)` of output column 0 of the tile's first row lies in a plane.
    fn tap_offset(&self, ty: usize, tx: usize) -> usize {
        ty * self.row_len() + (tx % self.stride) * self.phase_cols + tx / self.stride
    }
}

/// An input element type and the slab values it is rewritten into.
pub(super) trait SlabInput: Copy {
    /// One slab value: a `u32` pair of bf16 channels, or an f32.
    type Value: Copy + Default;
    /// Input channels per plane.
    const CHANNELS: usize;

    /// The value at column `col` of the plane's channel rows (`rows[1]` is empty for one
    /// channel per plane); zero past the rows.
    fn value(rows: [&[Self]; 2], col: usize) -> Self::Value;

    /// `dst[j]` from column `j` of the plane's channel rows, the common case, written so that
    /// it vectorises.
    fn write_row(rows: [&[Self]; 2], dst: &mut [Self::Value]);

    /// `dst[j]` from column `j / 2` of the plane's channel rows (×2 upsampling).
    fn write_row_doubled(rows: [&[Self]; 2], dst: &mut [Self::Value]);

    /// `dst[j]` from column `first + 2j` of the plane's channel rows (stride 2) while both
    /// of its columns `first + 2j` and `first + 2j + 1` exist; returns how many it wrote.
    fn write_row_every_other(rows: [&[Self]; 2], first: usize, dst: &mut [Self::Value]) -> usize;
}

/// `dst[j]` from column `(first + j · step) / upsample` of the plane's channel rows.
#[inline(always)]
fn write_run<I: SlabInput>(
    rows: [&[I]; 2],
    first: usize,
    step: usize,
    upsample: usize,
    dst: &mut [I::Value],
) {
    match (first, step, upsample) {
        (0, 1, 1) => I::write_row(rows, dst),
        (0, 1, 2) => I::write_row_doubled(rows, dst),
        (_, 2, 1) => {
            let done = I::write_row_every_other(rows, first, dst);
            for (j, d) in dst.iter_mut().enumerate().skip(done) {
                *d = I::value(rows, first + 2 * j);
            }
        }
        _ => {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = I::value(rows, (first + j * step) / upsample);
            }
        }
    }
}

/// Two bf16 channels of one pixel as one `u32`, the first in the low half.
#[inline(always)]
fn pair(lo: bf16, hi: bf16) -> u32 {
    u32::from(lo.to_bits()) | (u32::from(hi.to_bits()) << 16)
}

impl SlabInput for bf16 {
    type Value = u32;
    const CHANNELS: usize = 2;

    #[inline(always)]
    fn value([lo, hi]: [&[bf16]; 2], col: usize) -> u32 {
        match (lo.get(col), hi.get(col)) {
            (Some(&l), Some(&h)) => pair(l, h),
            _ => 0,
        }
    }

    #[inline(always)]
    fn write_row([lo, hi]: [&[bf16]; 2], dst: &mut [u32]) {
        for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
            *d = pair(l, h);
        }
    }

    #[inline(always)]
    fn write_row_doubled([lo, hi]: [&[bf16]; 2], dst: &mut [u32]) {
        for ((d, &l), &h) in dst.chunks_exact_mut(2).zip(lo).zip(hi) {
            let v = pair(l, h);
            d[0] = v;
            d[1] = v;
        }
    }

    #[inline(always)]
    fn write_row_every_other([lo, hi]: [&[bf16]; 2], first: usize, dst: &mut [u32]) -> usize {
        let (lo, hi) = (
            lo.get(first..).unwrap_or_default(),
            hi.get(first..).unwrap_or_default(),
        );
        let pairs = dst.len().min(lo.len() / 2).min(hi.len() / 2);
        for ((d, l), h) in dst[..pairs]
            .iter_mut()
            .zip(lo.chunks_exact(2))
            .zip(hi.chunks_exact(2))
        {
            *d = pair(l[0], h[0]);
        }
        pairs
    }
}

impl SlabInput for f32 {
    type Value = f32;
    const CHANNELS: usize = 1;

    #[inline(always)]
    fn value([row, _]: [&[f32]; 2], col: usize) -> f32 {
        row.get(col).copied().unwrap_or_default()
    }

    #[inline(always)]
    fn write_row([row, _]: [&[f32]; 2], dst: &mut [f32]) {
        let n = dst.len().min(row.len());
        dst[..n].copy_from_slice(&row[..n]);
    }

    #[inline(always)]
    fn write_row_doubled([row, _]: [&[f32]; 2], dst: &mut [f32]) {
        for (d, &v) in dst.chunks_exact_mut(2).zip(row) {
            d[0] = v;
            d[1] = v;
        }
    }

    #[inline(always)]
    fn write_row_every_other([row, _]: [&[f32]; 2], first: usize, dst: &mut [f32]) -> usize {
        let row = row.get(first..).unwrap_or_default();
        let pairs = dst.len().min(row.len() / 2);
        for (d, v) in dst[..pairs].iter_mut().zip(row.chunks_exact(2)) {
            *d = v[0];
        }
        pairs
    }
}

/// One tile's input: `[c_in / CHANNELS][(count − 1) · stride + kh][stride][phase_cols]`
/// values, row `r`, phase `q` and column `j` holding the prepared input at `(oh0 · stride + r −
/// padding, j · stride + q − padding)`, zero outside it; plus the offset tables that make it the
/// tile's B.
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
        let shape = SlabShape::new(g, tile.count);
        let plane = shape.plane_len();
        values.resize(planes * plane, V::default());
        fill_planes(g, x, tile, shape, &mut values[..planes * plane]);
        row_offsets.clear();
        row_offsets.extend((0..planes * taps).map(|p| {
            let (index, tap) = (p / taps, p % taps);
            index * plane + shape.tap_offset(tap / g.kernel_w, tap % g.kernel_w)
        }));
        let n = tile.count * g.out_w;
        let row_step = g.stride * shape.row_len();
        panel_offsets.clear();
        panel_offsets.extend(
            (0..n.div_ceil(PANEL_COLUMNS))
                .map(|j| j * PANEL_COLUMNS)
                .map(|first| (first / g.out_w) * row_step + first % g.out_w),
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
    shape: SlabShape,
    out: &mut [I::Value],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        return unsafe { fill_planes_avx512(g, x, tile, shape, out) };
    }
    fill_planes_body(g, x, tile, shape, out);
}

/// [`fill_planes_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn fill_planes_avx512<I: SlabInput>(
    g: &Geometry,
    x: &[I],
    tile: TileRows,
    shape: SlabShape,
    out: &mut [I::Value],
) {
    fill_planes_body(g, x, tile, shape, out);
}

/// The work of [`fill_planes`].
#[inline(always)]
fn fill_planes_body<I: SlabInput>(
    g: &Geometry,
    x: &[I],
    tile: TileRows,
    shape: SlabShape,
    out: &mut [I::Value],
) {
    let (image, oh0) = (tile.first / g.out_h, tile.first % g.out_h);
    let src_plane = g.src_height * g.src_width;
    for (index, plane) in out.chunks_exact_mut(shape.plane_len().max(1)).enumerate() {
        let channel = image * g.c_in + I::CHANNELS * index;
        let first = x.get(channel * src_plane..).unwrap_or_default();
        let second = match I::CHANNELS {
            2 => x.get((channel + 1) * src_plane..).unwrap_or_default(),
            _ => &[],
        };
        for (r, dst) in plane.chunks_exact_mut(shape.row_len().max(1)).enumerate() {
            let iy = (oh0 * g.stride + r).checked_sub(g.padding);
            let Some(iy) = iy.filter(|&iy| iy < g.height) else {
                dst.fill(I::Value::default());
                continue;
            };
            let row = (iy / g.upsample) * g.src_width..(iy / g.upsample + 1) * g.src_width;
            let source = [
                first.get(row.clone()).unwrap_or_default(),
                second.get(row).unwrap_or_default(),
            ];
            for (q, phase) in dst.chunks_exact_mut(shape.phase_cols.max(1)).enumerate() {
                // Column j of phase q is slab column j · stride + q, input column j · stride +
                // q − padding: inside the input for j in start..end.
                let start = g.padding.saturating_sub(q).div_ceil(g.stride);
                let end = (g.width + g.padding)
                    .saturating_sub(q)
                    .div_ceil(g.stride)
                    .clamp(start.min(phase.len()), phase.len());
                let (head, rest) = phase.split_at_mut(start.min(end));
                head.fill(I::Value::default());
                let (body, tail) = rest.split_at_mut(end - start.min(end));
                tail.fill(I::Value::default());
                let first_column = (start * g.stride + q).saturating_sub(g.padding);
                write_run::<I>(source, first_column, g.stride, g.upsample, body);
            }
        }
    }
}
