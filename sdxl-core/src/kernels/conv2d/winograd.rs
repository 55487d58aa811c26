//! Winograd's F(2×2, 3×3) algorithm (Lavin and Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016) for the f32 convolutions that make up most of SDXL's convolution work:
//! 3×3 kernels, stride 1, padding 1.
//!
//! The output is cut into 2×2 tiles. Each tile's 4×4 input patch `d` is transformed to
//! `V = Bᵀ d B`, each kernel `g` to `U = G g Gᵀ`, and the tile is `Aᵀ (Σ_c U ⊙ V) A`: the sum
//! over input channels becomes 16 independent GEMMs, one per point of the 4×4 transform,
//! `M[ξ] = U[ξ] (c_out × c_in) · V[ξ] (c_in × tiles)`. They do 16 multiply-adds per tile and
//! channel pair where the direct convolution does 36, so 2.25× fewer, for transforms that only
//! add and subtract (and halve, in G). In f32 the extra rounding is of the order of the
//! products' own (the tests bound it against a direct convolution in f64).
//!
//! Tiles are processed in blocks of whole tile rows, one block per thread at a time, so a
//! block's transformed input and products stay in cache between the three passes. The
//! kernel transform is done per call, straight into the GEMM's packed panels, like the f32
//! panels of the direct path.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::super::bf16_gemm::{self, Bias, IndexedB, MatMut, PackedF32A, PANEL_COLUMNS};
use super::{
    keep_buffer, prefix, to_candle, with_scratch, written_output, Epilogue, Geometry, OutPtr,
};

/// Points of the 4×4 transform: one GEMM each.
const POINTS: usize = 16;
/// Fewest input and output channels for which the transforms (whose cost grows with
/// `c_in + c_out`) are worth it against the GEMM saving (which grows with `c_in · c_out`).
const MIN_CHANNELS: usize = 16;
/// Fewest 2×2 output tiles (over the batch) for which the GEMMs are long enough to be worth
/// the transformed kernel, which is 16/9 the size of the weight and is read once per block:
/// with fewer, they wait on memory rather than compute. Measured on Zen 5 (f32, 2 threads,
/// alternating): the refiner UNet at latent 32, whose lowest levels have 8 and 32 tiles,
/// 3.7-4.1 s with no limit, 2.5 s from 128 tiles, 2.3-2.5 s from 512; the base UNet at
/// latent 64 7.7-8.1 s from 512 against 7.9-8.3 s from 128 and 8.4-8.9 s from 2048.
const MIN_TILES: usize = 512;
/// Bytes of transformed input and products a block of tile rows aims at (they stay in the
/// caches between the passes; on Zen 5, 4 MiB was 2–5% faster than 2 or 16 MiB for the VAE).
const BLOCK_BYTES: usize = 4 << 20;
/// Fewest tiles per block: narrower GEMMs stream the transformed kernel once per few columns
/// (64 was 20–30% slower than 256 on the 640-channel convolution of the UNet's middle level).
const MIN_BLOCK_TILES: usize = 256;
/// Largest transformed kernel kept between calls on a thread: SDXL's largest, 2560 -> 1280
/// channels, is 210 MB. Allocating (and faulting in) the 105-210 MB kernels of the UNet's
/// lowest level afresh at every call made an f32 step 12% slower (9.0-9.4 s against
/// 7.9-8.3 s at latent 64 on Zen 5).
const KEEP_KERNEL_BYTES: usize = 256 << 20;

/// The kernel transform `G` (`U = G g Gᵀ`).
const G: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// Whether the convolution `g` runs here: a 3×3 kernel with stride 1, padding 1 and no
/// dilation or extra padding (upsampled inputs are fine), at least [`MIN_CHANNELS`] on each
/// side and [`MIN_TILES`] output tiles, on a CPU with our f32 micro-kernel.
pub(super) fn applies(g: &Geometry) -> bool {
    g.kernel_h == 3
        && g.kernel_w == 3
        && g.stride == 1
        && g.dilation == 1
        && g.padding == 1
        && g.pad_after == 0
        && g.c_in >= MIN_CHANNELS
        && g.c_out >= MIN_CHANNELS
        && g.batch * g.out_h.div_ceil(2) * g.out_w.div_ceil(2) >= MIN_TILES
        && bf16_gemm::f32_native_available()
}

/// The convolution `g` of the NCHW input `x` with the `[c_out, c_in, 3, 3]` kernel `w`, plus
/// `post`, into a new NCHW buffer, on `threads` threads.
///
/// # Errors
/// Sizes that do not match `g`, or a GEMM error.
pub(super) fn convolve(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    post: Epilogue<'_, f32>,
    threads: usize,
) -> candle_core::Result<Vec<f32>> {
    let out_len = g.batch * g.c_out * g.positions();
    if x.len() != g.input_len()
        || w.len() != g.c_out * g.k()
        || post.residual.is_some_and(|r| r.len() != out_len)
        || post.bias.is_some_and(|b| b.len() != g.c_out)
    {
        candle_core::bail!("conv2d: tensor sizes do not match their shapes")
    }
    let mut kernel = KERNEL.take();
    let result = transform_kernel(g, w, &mut kernel).and_then(|kernels| {
        let plan = Plan::new(g, threads);
        // SAFETY: the blocks are runs of tile rows covering every output row, and a block
        // writes each of its output rows in every channel (`transform_output`).
        unsafe {
            written_output(out_len, |out_ptr| {
                let run = |block: &std::ops::Range<usize>| {
                    with_scratch(&SCRATCH, |scratch| {
                        plan.run_block(g, x, &kernels, post, block.clone(), scratch, out_ptr)
                    })
                };
                match plan.blocks.as_slice() {
                    [block] => run(block),
                    blocks => blocks.par_iter().try_for_each(run),
                }
            })
        }
    });
    keep_buffer(&KERNEL, kernel, KEEP_KERNEL_BYTES);
    result
}

/// `U = G g Gᵀ` of every `(c_out, c_in)` kernel, written into `buffer` as 16 packed GEMM A
/// operands (`c_out × c_in` each), one per transform point.
fn transform_kernel<'a>(
    g: &Geometry,
    w: &[f32],
    buffer: &'a mut Vec<f32>,
) -> candle_core::Result<Vec<PackedF32A<'a>>> {
    let (rows, cols) = (g.c_out, g.c_in);
    let len = bf16_gemm::packed_f32_a_len(rows, cols)
        .filter(|len| len.checked_mul(POINTS).is_some())
        .ok_or_else(|| candle_core::Error::Msg("conv2d: kernel size overflows".into()))?;
    buffer.resize(POINTS * len, 0.0);
    bf16_gemm::pack_a_f32_rows(rows, cols, POINTS, buffer, |co, out| {
        transform_kernel_row(&w[co * cols * 9..][..cols * 9], cols, out);
    })
    .map_err(to_candle)?;
    buffer
        .chunks_exact(len)
        .map(|panels| PackedF32A::new(panels, rows, cols).map_err(to_candle))
        .collect()
}

/// `U = G g Gᵀ` of the `cols` kernels `taps` (`[cols][3][3]`, one output channel), into `out`:
/// 16 runs of `cols` values, one per point `4i + j`. The taps are first laid out tap by tap so
/// that both products with `G` run over whole rows of input channels.
fn transform_kernel_row(taps: &[f32], cols: usize, out: &mut [f32]) {
    let mut planes = vec![0f32; 12 * cols];
    let (by_tap, rows) = planes.split_at_mut(9 * cols);
    for (c, kernel) in taps.chunks_exact(9).enumerate() {
        for (t, &v) in kernel.iter().enumerate() {
            by_tap[t * cols + c] = v;
        }
    }
    let by_tap: &[f32] = by_tap;
    let tap = |t: usize| &by_tap[t * cols..(t + 1) * cols];
    for (i, weights) in G.iter().enumerate() {
        // Row i of G g: column b combines taps (0, b), (1, b) and (2, b).
        for (b, row) in rows.chunks_exact_mut(cols).enumerate() {
            weighted_sum(row, [tap(b), tap(3 + b), tap(6 + b)], *weights);
        }
        let (r0, r1, r2) = (&rows[..cols], &rows[cols..2 * cols], &rows[2 * cols..]);
        for (j, weights) in G.iter().enumerate() {
            weighted_sum(
                &mut out[(4 * i + j) * cols..][..cols],
                [r0, r1, r2],
                *weights,
            );
        }
    }
}

/// `dst[c] = Σ_k weights[k] · src[k][c]`.
fn weighted_sum(dst: &mut [f32], src: [&[f32]; 3], weights: [f32; 3]) {
    for (((d, &a), &b), &c) in dst.iter_mut().zip(src[0]).zip(src[1]).zip(src[2]) {
        *d = weights[0] * a + weights[1] * b + weights[2] * c;
    }
}

/// How a convolution's tile rows are split into blocks.
#[derive(Debug)]
struct Plan {
    /// Tiles per tile row (`ceil(out_w / 2)`).
    tiles_w: usize,
    /// Tile rows per image (`ceil(out_h / 2)`).
    tiles_h: usize,
    /// Ranges of tile rows, counted across the batch.
    blocks: Vec<std::ops::Range<usize>>,
    /// Threads within each block (all of them when there are fewer blocks than threads).
    block_threads: usize,
}

impl Plan {
    /// Blocks of at most about [`BLOCK_BYTES`] of transformed input and products but at least
    /// [`MIN_BLOCK_TILES`] wide, in a multiple of `threads` where the rows allow.
    fn new(g: &Geometry, threads: usize) -> Self {
        let (tiles_w, tiles_h) = (g.out_w.div_ceil(2), g.out_h.div_ceil(2));
        let total = g.batch * tiles_h;
        let column_bytes = POINTS * (g.c_in + g.c_out) * std::mem::size_of::<f32>();
        let tiles = (BLOCK_BYTES / column_bytes.max(1)).max(MIN_BLOCK_TILES);
        let mut rows = tiles.div_ceil(tiles_w.max(1)).clamp(1, total.max(1));
        let mut count = total.div_ceil(rows);
        if count >= threads {
            while !count.is_multiple_of(threads) && count < total {
                count += 1;
            }
            rows = total.div_ceil(count);
        }
        let blocks: Vec<_> = (0..total)
            .step_by(rows)
            .map(|first| first..(first + rows).min(total))
            .collect();
        let block_threads = if blocks.len() < threads { threads } else { 1 };
        Self {
            tiles_w,
            tiles_h,
            blocks,
            block_threads,
        }
    }

    /// Transforms the input of tile rows `block`, multiplies it by the transformed kernels and
    /// writes the block's output rows (with `post`).
    #[allow(clippy::too_many_arguments)]
    fn run_block(
        &self,
        g: &Geometry,
        x: &[f32],
        kernels: &[PackedF32A<'_>],
        post: Epilogue<'_, f32>,
        block: std::ops::Range<usize>,
        scratch: &mut Scratch,
        out: OutPtr<f32>,
    ) -> candle_core::Result<()> {
        let n = block.len() * self.tiles_w;
        // A channel's 16 runs of `stride` values, one per point, lie side by side.
        let stride = n.div_ceil(PANEL_COLUMNS) * PANEL_COLUMNS;
        let channel_len = POINTS * stride;
        let Scratch {
            input,
            products,
            row_offsets,
            panel_offsets,
        } = scratch;
        let input = prefix(input, g.c_in * channel_len);
        let products = prefix(products, g.c_out * channel_len);
        let parallel = self.block_threads > 1;
        for_each_channel(input, channel_len, parallel, |c, runs| {
            self.transform_input(g, x, c, block.clone(), stride, runs);
        });
        row_offsets.clear();
        row_offsets.extend((0..g.c_in).map(|c| c * channel_len));
        for (point, kernel) in kernels.iter().enumerate() {
            panel_offsets.clear();
            panel_offsets
                .extend((0..stride / PANEL_COLUMNS).map(|j| point * stride + j * PANEL_COLUMNS));
            let b = IndexedB::new_f32(input, g.c_in, n, row_offsets, panel_offsets)
                .map_err(to_candle)?;
            let dst = products.get_mut(point * stride..).unwrap_or_default();
            let c = MatMut::new(dst, g.c_out, n, channel_len, 1).map_err(to_candle)?;
            bf16_gemm::gemm_f32_indexed(*kernel, b, Bias::None, c, false, self.block_threads)
                .map_err(to_candle)?;
        }
        for_each_channel(products, channel_len, parallel, |c, runs| {
            self.transform_output(g, c, runs, block.clone(), stride, post, out);
        });
        Ok(())
    }

    /// `V = Bᵀ d B` of every tile of `block` in input channel `c`, into `runs`: 16 runs of
    /// `stride` values, one per point (tile rows side by side in each run).
    ///
    /// Each input row of a tile row's 4×4 patches is read once, split into its even and odd
    /// columns (the patches start at even columns, padding included), so that both passes of
    /// the transform are element-wise over runs of tiles.
    fn transform_input(
        &self,
        g: &Geometry,
        x: &[f32],
        c: usize,
        block: std::ops::Range<usize>,
        stride: usize,
        runs: &mut [f32],
    ) {
        let tw = self.tiles_w;
        let len = tw + 1;
        let mut lines = vec![0f32; 8 * len];
        let plane = g.src_height * g.src_width;
        for (local, row) in block.enumerate() {
            let (image, ty) = (row / self.tiles_h, row % self.tiles_h);
            let channel = &x[(image * g.c_in + c) * plane..][..plane];
            let (even, odd) = lines.split_at_mut(4 * len);
            for (d, (even, odd)) in even
                .chunks_exact_mut(len)
                .zip(odd.chunks_exact_mut(len))
                .enumerate()
            {
                let y = (2 * ty + d).checked_sub(1).filter(|&y| y < g.height);
                let src = y.map(|y| &channel[(y / g.upsample) * g.src_width..][..g.src_width]);
                split_columns(src, g.width, g.upsample, even, odd);
            }
            // Rows: Bᵀ d, on the even and the odd columns alike.
            for half in lines.chunks_exact_mut(4 * len) {
                let (d0, rest) = half.split_at_mut(len);
                let (d1, rest) = rest.split_at_mut(len);
                let (d2, d3) = rest.split_at_mut(len);
                for (((a, b), c), d) in d0.iter_mut().zip(d1.iter_mut()).zip(d2).zip(d3) {
                    let (v0, v1, v2, v3) = (*a, *b, *c, *d);
                    *a = v0 - v2;
                    *b = v1 + v2;
                    *c = v2 - v1;
                    *d = v1 - v3;
                }
            }
            // Columns: (Bᵀ d) B, four points per row of the row transform.
            let (even, odd) = lines.split_at(4 * len);
            for i in 0..4 {
                let (e, o) = (&even[i * len..][..len], &odd[i * len..][..len]);
                let (e0, e1, o0, o1) = (&e[..tw], &e[1..], &o[..tw], &o[1..]);
                let at = |j: usize| (4 * i + j) * stride + local * tw;
                combine(&mut runs[at(0)..][..tw], e0, e1, |a, b| a - b);
                combine(&mut runs[at(1)..][..tw], o0, e1, |a, b| a + b);
                combine(&mut runs[at(2)..][..tw], e1, o0, |a, b| a - b);
                combine(&mut runs[at(3)..][..tw], o0, o1, |a, b| a - b);
            }
        }
    }

    /// `Y = Aᵀ M A` of every tile of `block` in output channel `c` (`runs`: the products, 16
    /// runs of `stride` values, one per point), plus the bias and residual, written to the
    /// block's output rows.
    #[allow(clippy::too_many_arguments)]
    fn transform_output(
        &self,
        g: &Geometry,
        c: usize,
        runs: &[f32],
        block: std::ops::Range<usize>,
        stride: usize,
        post: Epilogue<'_, f32>,
        out: OutPtr<f32>,
    ) {
        let tw = self.tiles_w;
        let bias = post.bias.map_or(0.0, |b| b[c]);
        let mut columns = vec![0f32; 2 * tw];
        let (left, right) = columns.split_at_mut(tw);
        for (local, row) in block.enumerate() {
            let (image, ty) = (row / self.tiles_h, row % self.tiles_h);
            let m: [&[f32]; POINTS] =
                std::array::from_fn(|point| &runs[point * stride + local * tw..][..tw]);
            for dy in 0..2 {
                let oy = 2 * ty + dy;
                if oy >= g.out_h {
                    break;
                }
                // The row of Aᵀ for this output row, (1, 1, 1, 0) or (0, 1, −1, −1), on the
                // products' rows, then on their columns for the tiles' left and right outputs.
                for t in 0..tw {
                    let s = |j: usize| match dy {
                        0 => m[j][t] + m[4 + j][t] + m[8 + j][t],
                        _ => m[4 + j][t] - m[8 + j][t] - m[12 + j][t],
                    };
                    let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
                    left[t] = s0 + s1 + s2 + bias;
                    right[t] = s1 - s2 - s3 + bias;
                }
                let offset = ((image * g.c_out + c) * g.out_h + oy) * g.out_w;
                // SAFETY: `convolve` allocated `batch · c_out · out_h · out_w` values and this
                // output row belongs to this block's tile rows and this channel alone, so
                // nothing else touches it while the slice lives.
                let row = unsafe { out.0.add(offset) };
                // SAFETY: the row (see above), written here before anything reads it.
                let dst = unsafe { std::slice::from_raw_parts_mut(row.cast(), g.out_w) };
                interleave(dst, left, right);
                if let Some(residual) = post.residual {
                    // SAFETY: the same row, now written in full by `interleave`.
                    let dst = unsafe { std::slice::from_raw_parts_mut(row, g.out_w) };
                    for (d, r) in dst.iter_mut().zip(&residual[offset..offset + g.out_w]) {
                        *d += r;
                    }
                }
            }
        }
    }
}

/// `dst[2t] = left[t]`, `dst[2t + 1] = right[t]`: every value of `dst` when `left` and `right`
/// hold `dst.len().div_ceil(2)` values.
fn interleave(dst: &mut [MaybeUninit<f32>], left: &[f32], right: &[f32]) {
    let mut pairs = dst.chunks_exact_mut(2);
    for ((pair, &l), &r) in (&mut pairs).zip(left).zip(right) {
        pair[0].write(l);
        pair[1].write(r);
    }
    if let ([last], Some(&l)) = (pairs.into_remainder(), left.get(left.len().wrapping_sub(1))) {
        last.write(l);
    }
}

/// Runs `f(channel, values)` on each `len`-value chunk of `buffer`, on rayon's pool when
/// `parallel`.
fn for_each_channel(
    buffer: &mut [f32],
    len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [f32]) + Send + Sync,
) {
    if parallel {
        buffer
            .par_chunks_exact_mut(len)
            .enumerate()
            .for_each(|(c, chunk)| f(c, chunk));
    } else {
        buffer
            .chunks_exact_mut(len)
            .enumerate()
            .for_each(|(c, chunk)| f(c, chunk));
    }
}

/// `dst[t] = f(a[t], b[t])`.
fn combine(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
        *d = f(a, b);
    }
}

/// Splits the padded prepared row `p` (`p[k]` is column `k − 1` of the input upsampled by
/// `upsample`, zero outside `0..width`; `None` for a padding row) into `even[k] = p[2k]` and
/// `odd[k] = p[2k + 1]`, both `ceil(width / 2) + 1` long.
fn split_columns(
    src: Option<&[f32]>,
    width: usize,
    upsample: usize,
    even: &mut [f32],
    odd: &mut [f32],
) {
    even.fill(0.0);
    odd.fill(0.0);
    let Some(src) = src else { return };
    match upsample {
        // even[k] = src[2k − 1], odd[k] = src[2k].
        1 => {
            let mut pairs = src[..width].chunks_exact(2);
            for ((pair, o), e) in (&mut pairs).zip(odd.iter_mut()).zip(&mut even[1..]) {
                *o = pair[0];
                *e = pair[1];
            }
            if let [last] = pairs.remainder() {
                odd[width / 2] = *last;
            }
        }
        // Each source column fills two: even[k] = src[k − 1], odd[k] = src[k].
        2 => {
            let n = width / 2;
            even[1..=n].copy_from_slice(&src[..n]);
            odd[..n].copy_from_slice(&src[..n]);
        }
        _ => {
            let value = |column: usize| match column < width {
                true => src[column / upsample],
                false => 0.0,
            };
            for (k, (e, o)) in even.iter_mut().zip(odd.iter_mut()).enumerate() {
                if k > 0 {
                    *e = value(2 * k - 1);
                }
                *o = value(2 * k);
            }
        }
    }
}

/// One thread's block buffers.
#[derive(Debug, Default)]
struct Scratch {
    /// The transformed input `[c_in][point][stride]`.
    input: Vec<f32>,
    /// The products `[c_out][point][stride]`.
    products: Vec<f32>,
    /// Where B's rows and panels start in `input`.
    row_offsets: Vec<usize>,
    panel_offsets: Vec<usize>,
}

thread_local! {
    /// The transformed kernel of the last call on this thread, reused (never re-zeroed:
    /// packing overwrites it).
    static KERNEL: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// A thread's block buffers, kept between convolutions.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}
