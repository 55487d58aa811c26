//! A CPU 2-D convolution in f32 that multiplies the weight directly by column tiles of the
//! input.
//!
//! candle 0.11's CPU convolution copies the input to NHWC, re-packs the weight on every call and
//! gathers im2col tiles with scalar loops, which makes it about twice as slow as PyTorch's. Here
//! the convolution is a GEMM in the layouts the tensors already have:
//!
//! `out[c_out, p] = W[c_out, c_in·kh·kw] · cols[c_in·kh·kw, p] (+ bias[c_out])`
//!
//! The NCHW weight is already that row-major `[c_out, c_in·kh·kw]` matrix, and the product is
//! already NCHW, so only the input is rearranged: output rows are cut into tiles, each tile's
//! columns are gathered with row copies (zero padding at the edges), and tiles run on separate
//! threads, each multiplying with the `gemm` crate (the same GEMM candle's matmul uses). A 1×1
//! convolution with stride 1 needs no gathering at all: the input is the column matrix.

use std::cell::RefCell;

use candle_core::{DType, Device, Layout, Storage, Tensor};
use candle_nn::Conv2dConfig;
use rayon::prelude::*;

/// Bytes of gathered columns a tile aims at: big enough that the GEMM's re-packing of the
/// weight per tile costs little, small enough that the allocator keeps reusing the buffer.
const TILE_BYTES: usize = 24 << 20;
/// Columns below which a tile is too narrow to be worth its own weight packing: such
/// convolutions run as one tile with the GEMM's own threads.
const MIN_TILE_COLUMNS: usize = 512;

/// Whether [`conv2d_f32`] handles this convolution: f32 tensors on the CPU, one group.
pub fn supports(x: &Tensor, weight: &Tensor, config: &Conv2dConfig) -> bool {
    matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && config.groups == 1
        && x.rank() == 4
        && weight.rank() == 4
}

/// The geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    c_in: usize,
    height: usize,
    width: usize,
    c_out: usize,
    kernel_h: usize,
    kernel_w: usize,
    out_h: usize,
    out_w: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], config: &Conv2dConfig) -> candle_core::Result<Self> {
        let (&[batch, c_in, height, width], &[c_out, w_in, kernel_h, kernel_w]) = (x, w) else {
            candle_core::bail!("conv2d: expected 4-d input and weight, got {x:?} and {w:?}")
        };
        if w_in != c_in {
            candle_core::bail!("conv2d: input has {c_in} channels, the weight expects {w_in}")
        }
        let stride = config.stride.max(1);
        let dilation = config.dilation.max(1);
        let span = |size: usize, kernel: usize| {
            (size + 2 * config.padding)
                .checked_sub(dilation * (kernel.max(1) - 1) + 1)
                .map(|s| s / stride + 1)
        };
        let (Some(out_h), Some(out_w)) = (span(height, kernel_h), span(width, kernel_w)) else {
            candle_core::bail!("conv2d: the {kernel_h}x{kernel_w} kernel is larger than the padded {height}x{width} input")
        };
        Ok(Self {
            batch,
            c_in,
            height,
            width,
            c_out,
            kernel_h,
            kernel_w,
            out_h,
            out_w,
            stride,
            padding: config.padding,
            dilation,
        })
    }

    /// Rows of the column matrix: one per input channel and kernel tap.
    fn k(&self) -> usize {
        self.c_in * self.kernel_h * self.kernel_w
    }

    /// Output positions per image.
    fn positions(&self) -> usize {
        self.out_h * self.out_w
    }

    /// A 1×1 convolution with stride 1 and no padding reads the input as its column matrix.
    fn is_pointwise(&self) -> bool {
        self.kernel_h == 1 && self.kernel_w == 1 && self.stride == 1 && self.padding == 0
    }
}

thread_local! {
    /// Each thread's gathered columns, kept between calls so that every convolution does not
    /// fault in (and zero) a fresh tile of up to [`TILE_BYTES`].
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's product of a tile that spans several images, before it is scattered.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on the first `len` values of this thread's `buffer`, grown when shorter. The values
/// are whatever an earlier call left there: `f` must overwrite what it reads.
fn with_buffer<R>(
    buffer: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    buffer.with_borrow_mut(|values| {
        if values.len() < len {
            values.resize(len, 0.0);
        }
        f(&mut values[..len])
    })
}

/// A raw pointer to the output that tiles write to in disjoint places from several threads.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every tile writes only its own output columns (disjoint regions), and the buffer
// outlives the parallel loop that uses the pointer.
unsafe impl Send for OutPtr {}
// SAFETY: as above: no two tiles touch the same element.
unsafe impl Sync for OutPtr {}

/// `conv2d(x, weight) + bias` for f32 CPU tensors (see [`supports`]), in NCHW.
///
/// # Errors
/// Shapes that do not fit together, or tensors that are not f32 on the CPU.
pub fn conv2d_f32(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    config: &Conv2dConfig,
) -> candle_core::Result<Tensor> {
    let geometry = Geometry::new(x.dims(), weight.dims(), config)?;
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = weight.storage_and_layout();
    let x_data = cpu_f32(&x_storage, x_layout)?;
    let w_data = cpu_f32(&w_storage, w_layout)?;
    let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
    let bias_data = match &bias_guard {
        Some((storage, layout)) => {
            let data = cpu_f32(storage, layout)?;
            if data.len() != geometry.c_out {
                candle_core::bail!(
                    "conv2d: bias has {} values for {} output channels",
                    data.len(),
                    geometry.c_out
                )
            }
            Some(data)
        }
        None => None,
    };
    let out = convolve(&geometry, x_data, w_data, bias_data)?;
    Tensor::from_vec(
        out,
        (
            geometry.batch,
            geometry.c_out,
            geometry.out_h,
            geometry.out_w,
        ),
        &Device::Cpu,
    )
}

/// The contiguous f32 values of a CPU tensor.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("conv2d: expected a CPU tensor")
    };
    let all = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) if end <= all.len() => Ok(&all[start..end]),
        _ => candle_core::bail!("conv2d: expected a contiguous tensor"),
    }
}

/// Runs the convolution into a fresh NCHW buffer.
fn convolve(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
) -> candle_core::Result<Vec<f32>> {
    let positions = g.positions();
    let image_out = g.c_out * positions;
    if x.len() != g.batch * g.c_in * g.height * g.width || w.len() != g.c_out * g.k() {
        candle_core::bail!("conv2d: tensor sizes do not match their shapes")
    }
    let mut out = vec![0f32; g.batch * image_out];
    if let Some(bias) = bias {
        for (c, channel) in out.chunks_exact_mut(positions).enumerate() {
            channel.fill(bias[c % g.c_out]);
        }
    }
    let threads = candle_core::utils::get_num_threads().max(1);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let accumulate = bias.is_some();

    if g.is_pointwise() {
        let image_in = g.c_in * positions;
        for image in 0..g.batch {
            // SAFETY: `x` holds `batch` images of `c_in × positions` values and `out` holds
            // `batch` images of `c_out × positions`; the GEMM reads and writes inside those.
            unsafe {
                gemm_into(
                    GemmShape {
                        m: g.c_out,
                        n: positions,
                        k: g.c_in,
                    },
                    w.as_ptr(),
                    x.as_ptr().add(image * image_in),
                    positions,
                    out_ptr.0.add(image * image_out),
                    positions,
                    accumulate,
                    threads,
                );
            }
        }
        return Ok(out);
    }

    let total_rows = g.batch * g.out_h;
    let tile_rows = tile_rows(g, threads);
    let tiles = total_rows.div_ceil(tile_rows);
    let gemm_threads = if tiles < threads { threads } else { 1 };
    let run_tile = |tile: usize| {
        let first_row = tile * tile_rows;
        let rows = tile_rows.min(total_rows - first_row);
        let n = rows * g.out_w;
        with_buffer(&COLUMNS, g.k() * n, |cols| {
            gather_columns(g, x, first_row, rows, cols);
            let image = first_row / g.out_h;
            let within_one_image = (first_row + rows - 1) / g.out_h == image;
            if within_one_image {
                let offset = image * image_out + (first_row % g.out_h) * g.out_w;
                // SAFETY: the tile's columns `offset .. offset + n` of each of the `c_out` rows
                // (row stride `positions`) lie inside `out` and belong to this tile alone;
                // `cols` holds `k × n` values and `w` holds `c_out × k`.
                unsafe {
                    gemm_into(
                        GemmShape {
                            m: g.c_out,
                            n,
                            k: g.k(),
                        },
                        w.as_ptr(),
                        cols.as_ptr(),
                        n,
                        out_ptr.0.add(offset),
                        positions,
                        accumulate,
                        gemm_threads,
                    );
                }
            } else {
                with_buffer(&SCRATCH, g.c_out * n, |scratch| {
                    // SAFETY: `scratch` holds `c_out × n` values, `cols` `k × n`, `w`
                    // `c_out × k`.
                    unsafe {
                        gemm_into(
                            GemmShape {
                                m: g.c_out,
                                n,
                                k: g.k(),
                            },
                            w.as_ptr(),
                            cols.as_ptr(),
                            n,
                            scratch.as_mut_ptr(),
                            n,
                            false,
                            gemm_threads,
                        );
                    }
                    scatter_rows(g, scratch, first_row, rows, out_ptr, accumulate);
                });
            }
        });
    };
    if tiles == 1 {
        run_tile(0);
    } else {
        (0..tiles).into_par_iter().for_each(run_tile);
    }
    Ok(out)
}

/// Output rows per tile: about [`TILE_BYTES`] of columns, at least one tile per thread when
/// that keeps tiles wide enough, and a single tile when the whole output is narrow.
fn tile_rows(g: &Geometry, threads: usize) -> usize {
    let total_rows = g.batch * g.out_h;
    let row_bytes = g.k() * g.out_w * std::mem::size_of::<f32>();
    let by_size = (TILE_BYTES / row_bytes.max(1)).max(1);
    let by_threads = total_rows.div_ceil(threads);
    let rows = by_size.min(by_threads);
    if rows * g.out_w < MIN_TILE_COLUMNS && total_rows <= by_size {
        total_rows
    } else {
        rows.max(1)
    }
}

/// Fills `cols[k, rows·out_w]` with the input values under each kernel tap for the output rows
/// `first_row ..` (counted across the batch), zero where the tap falls in the padding.
fn gather_columns(g: &Geometry, x: &[f32], first_row: usize, rows: usize, cols: &mut [f32]) {
    let n = rows * g.out_w;
    let taps = g.kernel_h * g.kernel_w;
    let plane = g.height * g.width;
    for (r, col_row) in cols.chunks_exact_mut(n).enumerate() {
        let channel = r / taps;
        let (ky, kx) = ((r % taps) / g.kernel_w, r % g.kernel_w);
        // Output columns whose tap lands inside the input width: ow·stride + kx·dilation −
        // padding ∈ [0, width).
        let shift = kx * g.dilation;
        let ow_start = g.padding.saturating_sub(shift).div_ceil(g.stride);
        let ow_end = (g.width + g.padding)
            .checked_sub(shift)
            .map_or(0, |limit| limit.div_ceil(g.stride))
            .min(g.out_w);
        for (i, out_row) in col_row.chunks_exact_mut(g.out_w).enumerate() {
            let global_row = first_row + i;
            let (image, oh) = (global_row / g.out_h, global_row % g.out_h);
            let iy = (oh * g.stride + ky * g.dilation).checked_sub(g.padding);
            let Some(iy) = iy.filter(|&iy| iy < g.height && ow_start < ow_end) else {
                out_row.fill(0.0);
                continue;
            };
            let src_row = (image * g.c_in + channel) * plane + iy * g.width;
            out_row[..ow_start].fill(0.0);
            out_row[ow_end..].fill(0.0);
            let first_ix = ow_start * g.stride + shift - g.padding;
            if g.stride == 1 {
                let len = ow_end - ow_start;
                out_row[ow_start..ow_end]
                    .copy_from_slice(&x[src_row + first_ix..src_row + first_ix + len]);
            } else {
                for (dst, ix) in out_row[ow_start..ow_end]
                    .iter_mut()
                    .zip((first_ix..).step_by(g.stride))
                {
                    *dst = x[src_row + ix];
                }
            }
        }
    }
}

/// Copies a tile computed into `scratch[c_out, rows·out_w]` to its places in the NCHW output
/// (a tile that spans several images), adding to the bias already there when `accumulate`.
fn scatter_rows(
    g: &Geometry,
    scratch: &[f32],
    first_row: usize,
    rows: usize,
    out: OutPtr,
    accumulate: bool,
) {
    let n = rows * g.out_w;
    for (c, tile_channel) in scratch.chunks_exact(n).enumerate() {
        for (i, src) in tile_channel.chunks_exact(g.out_w).enumerate() {
            let global_row = first_row + i;
            let (image, oh) = (global_row / g.out_h, global_row % g.out_h);
            let offset = ((image * g.c_out + c) * g.out_h + oh) * g.out_w;
            // SAFETY: `offset .. offset + out_w` is one output row inside the buffer, owned by
            // this tile.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(offset), g.out_w) };
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// Sizes of one product `C[m, n] (+)= A[m, k] · B[k, n]`.
#[derive(Debug, Clone, Copy)]
struct GemmShape {
    m: usize,
    n: usize,
    k: usize,
}

/// `C (+)= A · B` with row-major `A[m, k]` (row stride k), `B[k, n]` (row stride `b_stride`) and
/// `C[m, n]` (row stride `c_stride`).
///
/// # Safety
/// Every element addressed by these shapes and strides must be inside its allocation, and no
/// other thread may touch the addressed elements of `c` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    shape: GemmShape,
    a: *const f32,
    b: *const f32,
    b_stride: usize,
    c: *mut f32,
    c_stride: usize,
    accumulate: bool,
    threads: usize,
) {
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            shape.m,
            shape.n,
            shape.k,
            c,
            1,
            c_stride as isize,
            accumulate,
            a,
            1,
            shape.k as isize,
            b,
            1,
            b_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(padding: usize, stride: usize, dilation: usize) -> Conv2dConfig {
        Conv2dConfig {
            padding,
            stride,
            dilation,
            groups: 1,
            cudnn_fwd_algo: None,
        }
    }

    /// Ours against candle's own convolution on shapes that exercise every path: padding,
    /// strides, dilation, 1×1, tiles spanning images, odd sizes.
    #[test]
    fn matches_candle_convolution() {
        let cases = [
            // (batch, c_in, h, w, c_out, kernel, padding, stride, dilation)
            (2, 5, 9, 7, 6, 3, 1, 1, 1),
            (1, 4, 8, 8, 3, 3, 0, 2, 1),
            (2, 3, 9, 11, 4, 3, 1, 2, 1),
            (3, 8, 5, 6, 7, 1, 0, 1, 1),
            (1, 2, 10, 10, 2, 3, 2, 1, 2),
            (2, 16, 40, 40, 8, 3, 1, 1, 1),
            (1, 3, 4, 4, 2, 4, 0, 1, 1),
        ];
        for (b, ci, h, w, co, k, p, s, d) in cases {
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &Device::Cpu).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (co, ci, k, k), &Device::Cpu).unwrap();
            let bias = Tensor::randn(0f32, 1.0, co, &Device::Cpu).unwrap();
            let cfg = config(p, s, d);
            for bias in [None, Some(&bias)] {
                let ours = conv2d_f32(&x, &weight, bias, &cfg).unwrap();
                let mut theirs = x.conv2d(&weight, p, s, d, 1).unwrap();
                if let Some(bias) = bias {
                    theirs = theirs
                        .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                        .unwrap();
                }
                assert_eq!(ours.dims(), theirs.dims());
                let worst = (ours - theirs)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    worst < 1e-4,
                    "case {:?}: worst {worst}",
                    (b, ci, h, w, co, k, p, s, d)
                );
            }
        }
    }

    #[test]
    fn rejects_mismatched_channels() {
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let weight = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(conv2d_f32(&x, &weight, None, &config(1, 1, 1)).is_err());
        let weight = Tensor::zeros((2, 3, 7, 7), DType::F32, &Device::Cpu).unwrap();
        assert!(conv2d_f32(&x, &weight, None, &config(0, 1, 1)).is_err());
    }
}
