//! A CPU 2-D convolution (f32, and bf16 on CPUs with AVX512-BF16) that multiplies the weight
//! directly by the input, tile by tile.
//!
//! candle 0.11's CPU convolution copies the input to NHWC, re-packs the weight on every call and
//! gathers im2col tiles with scalar loops, which makes it about twice as slow as PyTorch's. Here
//! the convolution is a GEMM in the layouts the tensors already have:
//!
//! `out[c_out, p] = W[c_out, c_in·kh·kw] · cols[c_in·kh·kw, p] (+ bias[c_out])`
//!
//! The NCHW weight is already that row-major `[c_out, c_in·kh·kw]` matrix (a bf16 layer packs
//! it once into GEMM panels, [`PackedKernel`]; an f32 convolution packs it per call where
//! slabs apply), and the product is already NCHW, so only the input is rearranged. Output rows
//! are cut into tiles that run on separate threads. A tile whose rows are whole GEMM panels
//! reads its input through a slab, a copy of its input rows with the padding applied,
//! from which our micro-kernel reads every tap's columns in place (`slab.rs`; bf16 kernels pair
//! their input channels for it, `paired.rs`). Other tiles gather their columns with row copies
//! (zero padding at the edges), straight into the GEMM's packed panels (bf16) or into a column
//! matrix that the `gemm` crate multiplies (f32). A 1×1 convolution with stride 1 needs no
//! gathering at all: the input is the column matrix.
//!
//! An f32 3×3 convolution with stride 1 and padding 1 (most of the UNet's and the VAE's
//! convolution work) instead runs Winograd's F(2×2, 3×3) algorithm (`winograd.rs`): 16 GEMMs
//! over transformed tiles, with 2.25× fewer multiply-adds than the direct product.
//!
//! Two neighbours of a convolution are folded into it: an [`InputPrep`] (nearest-neighbour
//! upsampling, extra bottom/right padding) is applied while the columns are gathered, and a
//! residual tensor is loaded into each tile's output block for the GEMM to accumulate onto.

use std::mem::MaybeUninit;

use candle_core::{DType, Device, Layout, Storage, Tensor, WithDType};
use candle_nn::Conv2dConfig;
use half::bf16;
use rayon::prelude::*;

use super::bf16_gemm::{self, Bias, Lhs, MatMut, MatRef, PackedA, PackedBBuilder, PackedF32A, Rhs};
use super::storage::{assume_written, contiguous_values, unwritten};
use paired::KOrder;
use slab::Slab;

mod paired;
mod slab;
#[cfg(test)]
mod tests;
mod winograd;

/// Bytes of gathered columns a tile aims at when the weight is smaller: about what stays in
/// the caches a core sees while the GEMM runs over the tile (measured on Zen 4: 1–4 MiB
/// equally good for the VAE, 24 MiB 5–10% slower).
const MIN_TILE_BYTES: usize = 1 << 20;
/// Most bytes of gathered columns per tile, however large the weight.
const MAX_TILE_BYTES: usize = 32 << 20;
/// Bytes of channel-paired input a tile aims at (`paired.rs`): about half of a Zen 4 core's
/// 1 MiB L2, beside the weight's k-block.
const SLAB_TILE_BYTES: usize = 512 << 10;
/// Largest f32 panels kept between convolutions (a 1280-channel 3×3 kernel's are 59 MB).
const KEEP_PANEL_BYTES: usize = 64 << 20;
/// Fewest columns per tile: narrower tiles spend more on streaming the weight than they
/// save in cache misses.
const MIN_TILE_COLUMNS: usize = 512;

/// What happens to the input before the convolution, applied while the columns are gathered
/// instead of being written out as a tensor: nearest-neighbour upsampling (diffusers'
/// `Upsample2D`, whose ×2 copy of a 512-channel map at 256 px is 64 MiB in bf16) and extra
/// zero padding below and to the right (the VAE encoder's `Downsample2D`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputPrep {
    /// Nearest-neighbour upsampling factor of the input (1: none).
    pub upsample: usize,
    /// Zero rows below and zero columns to the right of the (upsampled) input, on top of the
    /// convolution's own padding on every side.
    pub pad_bottom_right: usize,
}

impl InputPrep {
    /// The input as it is.
    pub const NONE: Self = Self {
        upsample: 1,
        pad_bottom_right: 0,
    };

    /// Nearest-neighbour upsampling by `factor` in both directions.
    pub fn upsample(factor: usize) -> Self {
        Self {
            upsample: factor,
            ..Self::NONE
        }
    }

    /// `rows` zero rows below and `rows` zero columns to the right.
    pub fn pad_bottom_right(rows: usize) -> Self {
        Self {
            pad_bottom_right: rows,
            ..Self::NONE
        }
    }

    /// The prepared input as a tensor, with candle's operations (for devices and dtypes the
    /// kernel does not handle).
    ///
    /// # Errors
    /// `x` is not 4-d, or a tensor operation fails.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        if self.upsample > 1 {
            let (_, _, h, w) = x.dims4()?;
            x = x.upsample_nearest2d(h * self.upsample, w * self.upsample)?;
        }
        if self.pad_bottom_right > 0 {
            let pad = self.pad_bottom_right;
            x = x.pad_with_zeros(2, 0, pad)?.pad_with_zeros(3, 0, pad)?;
        }
        Ok(x)
    }
}

impl Default for InputPrep {
    fn default() -> Self {
        Self::NONE
    }
}

/// Whether [`conv2d`] handles this convolution: one group, 4-d CPU tensors of one dtype, f32
/// or (where the CPU has AVX512-BF16) bf16.
pub fn supports(x: &Tensor, weight: &Tensor, config: &Conv2dConfig) -> bool {
    let dtype_ok = match x.dtype() {
        DType::F32 => true,
        DType::BF16 => bf16_gemm::native_available(),
        _ => false,
    };
    matches!(x.device(), Device::Cpu)
        && dtype_ok
        && weight.dtype() == x.dtype()
        && config.groups == 1
        && x.rank() == 4
        && weight.rank() == 4
}

/// `conv2d(prep(x), weight) + bias (+ residual)` in NCHW for the tensors [`supports`]
/// accepts. A `residual` (a tensor of the output's shape and dtype, e.g. a ResNet block's
/// shortcut) is added in the GEMM's accumulation, rounded once with the products.
///
/// # Errors
/// Shapes that do not fit together, or tensors [`supports`] refuses.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    config: &Conv2dConfig,
    prep: InputPrep,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F32 => {
            let geometry = Geometry::new(x.dims(), weight.dims(), config, prep)?;
            if !winograd::applies(&geometry) {
                return conv2d_typed::<f32>(x, weight, bias, config, prep, residual);
            }
            let weight = weight.contiguous()?;
            let (w_storage, w_layout) = weight.storage_and_layout();
            let w = cpu_slice::<f32>(&w_storage, w_layout)?;
            let threads = candle_core::utils::get_num_threads().max(1);
            convolve_tensors(&geometry, x, bias, residual, |x, post| {
                winograd::convolve(&geometry, x, w, post, threads)
            })
        }
        DType::BF16 => conv2d_typed::<bf16>(x, weight, bias, config, prep, residual),
        other => candle_core::bail!("conv2d kernel: unsupported dtype {other:?}"),
    }
}

/// A bf16 convolution kernel `[c_out, c_in, kh, kw]` packed once for the native bf16 GEMM (the
/// weight is the GEMM's A, and a layer's weight is multiplied at every call: packing it per call
/// cost about 4% of a bf16 UNet step). It replaces the weight (same size); [`weight`] unpacks a
/// copy. A kernel with several taps and an even number of input channels is packed with its
/// input channels in pairs (`paired.rs`), which lets its convolutions skip the column
/// matrix (`slab.rs`).
///
/// [`weight`]: PackedKernel::weight
#[derive(Debug, Clone)]
pub struct PackedKernel {
    /// The packed `u32` pairs, a 1-D U32 tensor on the CPU.
    panels: Tensor,
    dims: [usize; 4],
    /// The order of the packed columns.
    order: KOrder,
}

impl PackedKernel {
    /// Packs `weight` when [`conv2d_packed`] can use it: a 4-d bf16 CPU tensor, on a CPU with
    /// AVX512-BF16. `None` otherwise.
    ///
    /// # Errors
    /// A tensor operation fails.
    pub fn pack(weight: &Tensor) -> candle_core::Result<Option<Self>> {
        let &[c_out, c_in, kh, kw] = weight.dims() else {
            return Ok(None);
        };
        let (k, taps) = (c_in * kh * kw, kh * kw);
        if weight.dtype() != DType::BF16
            || !weight.device().is_cpu()
            || !bf16_gemm::native_available()
        {
            return Ok(None);
        }
        let weight = weight.contiguous()?;
        let (storage, layout) = weight.storage_and_layout();
        let values = cpu_slice::<bf16>(&storage, layout)?;
        let order = KOrder::for_kernel(c_in, taps);
        let ordered = paired::pair_order(values, c_in, taps, order);
        let a = MatRef::new(&ordered, c_out, k, k, 1).map_err(to_candle)?;
        let panels = bf16_gemm::pack_a(a).map_err(to_candle)?;
        let len = panels.len();
        Ok(Some(Self {
            panels: Tensor::from_vec(panels, len, &Device::Cpu)?,
            dims: [c_out, c_in, kh, kw],
            order,
        }))
    }

    /// `[c_out, c_in, kh, kw]`.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// The id of the packed storage (it changes only when the layer gets another weight).
    pub fn id(&self) -> candle_core::TensorId {
        self.panels.id()
    }

    /// The weight in bf16, unpacked into a new tensor.
    ///
    /// # Errors
    /// A tensor operation fails.
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        let [c_out, c_in, kh, kw] = self.dims;
        let panels = self.panels.to_vec1::<u32>()?;
        let packed = PackedA::new(&panels, c_out, c_in * kh * kw).map_err(to_candle)?;
        let values = paired::nchw_order(&packed.unpack(), c_in, kh * kw, self.order);
        Tensor::from_vec(values, self.dims.to_vec(), &Device::Cpu)
    }
}

/// [`conv2d`] with a packed bf16 kernel, for a bf16 CPU `x`.
///
/// # Errors
/// `x` not a 4-d bf16 CPU tensor, shapes that do not fit, or a tensor operation fails.
pub fn conv2d_packed(
    x: &Tensor,
    kernel: &PackedKernel,
    bias: Option<&Tensor>,
    config: &Conv2dConfig,
    prep: InputPrep,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if x.dtype() != DType::BF16 || !x.device().is_cpu() || config.groups != 1 {
        candle_core::bail!(
            "conv2d: a packed kernel needs a bf16 CPU input and one group, got {:?} on {:?}",
            x.dtype(),
            x.device()
        )
    }
    let geometry = Geometry::new(x.dims(), &kernel.dims, config, prep)?;
    let (p_storage, p_layout) = kernel.panels.storage_and_layout();
    let panels = cpu_slice::<u32>(&p_storage, p_layout)?;
    let packed = PackedA::new(panels, geometry.c_out, geometry.k()).map_err(to_candle)?;
    let w = KernelRef::Packed(packed, kernel.order);
    convolve_tensors::<bf16>(&geometry, x, bias, residual, |x, post| {
        convolve(&geometry, x, w, post, true)
    })
}

/// The convolution `g` of the CPU tensor `x` into a new tensor by `run` (which gets the
/// input's values and the epilogue), with the bias and residual checked and read here.
fn convolve_tensors<T: ConvElement>(
    g: &Geometry,
    x: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    run: impl FnOnce(&[T], Epilogue<'_, T>) -> candle_core::Result<Vec<T>>,
) -> candle_core::Result<Tensor> {
    let bias = bias_values(bias, g.c_out)?;
    let x = x.contiguous()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let x_data = cpu_slice::<T>(&x_storage, x_layout)?;
    let residual = checked_residual(residual, g, T::DTYPE)?;
    let guard = residual.as_ref().map(Tensor::storage_and_layout);
    let post = Epilogue {
        bias: bias.as_deref(),
        residual: guard
            .as_ref()
            .map(|(storage, layout)| cpu_slice::<T>(storage, layout))
            .transpose()?,
    };
    let out = run(x_data, post)?;
    Tensor::from_vec(out, g.out_dims(), &Device::Cpu)
}

/// The residual as a contiguous tensor, checked to have the output's shape and `dtype`.
fn checked_residual(
    residual: Option<&Tensor>,
    g: &Geometry,
    dtype: DType,
) -> candle_core::Result<Option<Tensor>> {
    let Some(r) = residual else { return Ok(None) };
    if r.dims() != g.out_dims().as_slice() || r.dtype() != dtype || !r.device().is_cpu() {
        candle_core::bail!(
            "conv2d: the residual is {:?} {:?} on {:?}, the output {:?} {dtype:?} on the CPU",
            r.dims(),
            r.dtype(),
            r.device(),
            g.out_dims()
        )
    }
    Ok(Some(r.contiguous()?))
}

/// What the convolution adds to its products before the single store (and rounding): a
/// per-channel bias and a residual with the output's layout.
#[derive(Debug, Clone, Copy)]
struct Epilogue<'a, T> {
    bias: Option<&'a [f32]>,
    residual: Option<&'a [T]>,
}

/// The bias as f32 values, checked to have `c_out` of them.
fn bias_values(bias: Option<&Tensor>, c_out: usize) -> candle_core::Result<Option<Vec<f32>>> {
    let bias = bias
        .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
        .transpose()?;
    if bias.as_ref().is_some_and(|b| b.len() != c_out) {
        candle_core::bail!("conv2d: bias does not have {c_out} values")
    }
    Ok(bias)
}

/// An element type the convolution multiplies in.
///
/// A 1×1 convolution's output is allocated with [`super::convert::Element::zeroed`]; the
/// others are left unwritten ([`written_output`]) until the tiles store their products.
trait ConvElement: super::convert::Element {
    /// One thread's reusable tile buffers (see [`with_scratch`]).
    type Scratch: Default;

    /// This thread's tile buffers.
    fn scratch() -> &'static std::thread::LocalKey<std::cell::RefCell<Self::Scratch>>;

    /// `dst[m, n] = a[m, k] · b[k, n] (+ bias[m])`, all row-major, `b` and `dst` with row
    /// stride `n` (a pointwise convolution of one image), plus `dst`'s values when
    /// `accumulate`.
    fn pointwise(
        shape: GemmShape,
        a: KernelRef<'_, Self>,
        b: &[Self],
        bias: Option<&[f32]>,
        dst: &mut [Self],
        accumulate: bool,
        threads: usize,
    ) -> candle_core::Result<()>;

    /// The plain weight `w` packed for this call into f32 panels (taken from this thread's
    /// cache; see [`keep_buffer`]), where slab tiles will read through our f32 micro-kernel;
    /// `None` otherwise.
    ///
    /// # Errors
    /// The panel size overflows.
    fn panels(g: &Geometry, w: &[Self]) -> candle_core::Result<Option<Vec<f32>>>;

    /// The output rows `tile` (counted across the batch) of the convolution: gathers their
    /// columns, multiplies the weight `w` by them (+ the epilogue) and writes the rows to
    /// `out`.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        g: &Geometry,
        x: &[Self],
        w: KernelRef<'_, Self>,
        post: Epilogue<'_, Self>,
        tile: TileRows,
        scratch: &mut Self::Scratch,
        out: OutPtr<Self>,
        threads: usize,
    ) -> candle_core::Result<()>;
}

/// The convolution kernel as the GEMM's A `[c_out, c_in·kh·kw]`: the NCHW weight's values, or
/// (bf16) panels packed once by [`PackedKernel`], with their columns in the given order.
#[derive(Debug, Clone, Copy)]
enum KernelRef<'a, T> {
    /// Row-major values.
    Plain(&'a [T]),
    /// Packed bf16 panels.
    Packed(PackedA<'a>, KOrder),
    /// The f32 weight's values, and the same packed into panels for this call (slab tiles
    /// read through our f32 micro-kernel; other tiles multiply the values with the `gemm`
    /// crate).
    WithPanels(&'a [T], PackedF32A<'a>),
}

impl<'a, T> KernelRef<'a, T> {
    /// The plain values (the f32 path has no packed kernels).
    fn plain(self) -> candle_core::Result<&'a [T]> {
        match self {
            KernelRef::Plain(w) => Ok(w),
            KernelRef::WithPanels(w, _) => Ok(w),
            KernelRef::Packed(..) => candle_core::bail!("conv2d: a packed kernel is bf16 only"),
        }
    }

    /// The order of k in its columns.
    fn order(&self) -> KOrder {
        match self {
            KernelRef::Packed(_, order) => *order,
            _ => KOrder::Nchw,
        }
    }

    /// Whether it is packed for reading tiles through slabs (`slab.rs`).
    fn reads_slabs(&self) -> bool {
        matches!(
            self,
            KernelRef::Packed(_, KOrder::ChannelPairs) | KernelRef::WithPanels(..)
        )
    }

    /// Whether it holds a `rows x cols` matrix.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        match self {
            KernelRef::Plain(w) => w.len() == rows * cols,
            KernelRef::Packed(p, _) => p.rows() == rows && p.cols() == cols,
            KernelRef::WithPanels(w, p) => {
                w.len() == rows * cols && p.rows() == rows && p.cols() == cols
            }
        }
    }
}

impl<'a> KernelRef<'a, bf16> {
    /// The GEMM operand for an `m x k` A.
    fn lhs(self, m: usize, k: usize) -> candle_core::Result<Lhs<'a>> {
        Ok(match self {
            KernelRef::Plain(w) => Lhs::Matrix(MatRef::new(w, m, k, k, 1).map_err(to_candle)?),
            KernelRef::Packed(p, _) => Lhs::Packed(p),
            KernelRef::WithPanels(..) => candle_core::bail!("conv2d: f32 panels in a bf16 GEMM"),
        })
    }
}

/// A run of output rows, counted across the batch.
#[derive(Debug, Clone, Copy)]
struct TileRows {
    first: usize,
    count: usize,
    /// Whether the tile reads its input through a slab (`slab.rs`) instead of gathering a
    /// column matrix.
    direct: bool,
}

/// One thread's f32 tile buffers.
#[derive(Debug, Default)]
struct F32Scratch {
    /// The gathered column matrix (the gathering path).
    columns: Vec<f32>,
    /// The product of a tile spanning images.
    product: Vec<f32>,
    /// The tile's input rows (the direct path).
    slab: Vec<f32>,
    /// Where B's rows and panels start in the slab.
    row_offsets: Vec<usize>,
    panel_offsets: Vec<usize>,
}

impl ConvElement for f32 {
    type Scratch = F32Scratch;

    fn scratch() -> &'static std::thread::LocalKey<std::cell::RefCell<Self::Scratch>> {
        &F32_SCRATCH
    }

    fn pointwise(
        shape: GemmShape,
        a: KernelRef<'_, Self>,
        b: &[Self],
        bias: Option<&[f32]>,
        dst: &mut [Self],
        accumulate: bool,
        threads: usize,
    ) -> candle_core::Result<()> {
        let dst = MatMut::row_major(dst, shape.m, shape.n).map_err(to_candle)?;
        gemm_f32(
            shape,
            a.plain()?,
            b,
            shape.n,
            bias,
            dst,
            accumulate,
            threads,
        )
    }

    /// A slab tile reads its input through a [`Slab`] with our f32 micro-kernel; other tiles
    /// gather their columns and multiply them with the `gemm` crate.
    fn tile(
        g: &Geometry,
        x: &[Self],
        w: KernelRef<'_, Self>,
        post: Epilogue<'_, Self>,
        tile: TileRows,
        scratch: &mut Self::Scratch,
        out: OutPtr<Self>,
        threads: usize,
    ) -> candle_core::Result<()> {
        let (n, k) = (tile.count * g.out_w, g.k());
        let F32Scratch {
            columns,
            product,
            slab,
            row_offsets,
            panel_offsets,
        } = scratch;
        if let (true, KernelRef::WithPanels(_, a)) = (tile.direct, w) {
            let b = Slab::fill(g, x, tile, slab, row_offsets, panel_offsets)
                .rhs()
                .map_err(to_candle)?;
            let bias = post.bias.map_or(Bias::None, Bias::Rows);
            return store_tile(g, tile, out, post.residual, product, |view, accumulate| {
                bf16_gemm::gemm_f32_indexed(a, b, bias, view, accumulate, threads)
                    .map_err(to_candle)
            });
        }
        let cols = prefix(columns, k * n);
        for (r, row) in cols.chunks_exact_mut(n.max(1)).enumerate() {
            gather_row(g, x, tile, r, row);
        }
        let shape = GemmShape { m: g.c_out, n, k };
        let w = w.plain()?;
        store_tile(g, tile, out, post.residual, product, |view, accumulate| {
            gemm_f32(shape, w, cols, n, post.bias, view, accumulate, threads)
        })
    }

    fn panels(g: &Geometry, w: &[Self]) -> candle_core::Result<Option<Vec<f32>>> {
        if !(slab::direct_applies(g, true) && bf16_gemm::f32_native_available()) {
            return Ok(None);
        }
        let mut panels = F32_PANELS.take();
        let len = bf16_gemm::packed_f32_a_len(g.c_out, g.k())
            .ok_or_else(|| candle_core::Error::Msg("conv2d: kernel size overflows".into()))?;
        panels.resize(len, 0.0);
        let a = MatRef::new(w, g.c_out, g.k(), g.k(), 1).map_err(to_candle)?;
        bf16_gemm::pack_a_f32_into(a, &mut panels).map_err(to_candle)?;
        Ok(Some(panels))
    }
}

/// `dst (+)= a[m, k] · b[k, n] (+ bias[m])` with the `gemm` crate, `a` row-major, `b` with
/// row stride `b_stride`, `dst` an `m x n` view with unit column stride.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    shape: GemmShape,
    a: &[f32],
    b: &[f32],
    b_stride: usize,
    bias: Option<&[f32]>,
    mut dst: MatMut<'_, f32>,
    accumulate: bool,
    threads: usize,
) -> candle_core::Result<()> {
    let GemmShape { m, n, k } = shape;
    let fits = |len: usize, rows: usize, stride: usize, cols: usize| {
        rows == 0 || cols == 0 || (rows - 1) * stride + cols <= len
    };
    if !fits(a.len(), m, k, k)
        || !fits(b.len(), k, b_stride, n)
        || dst.rows() != m
        || dst.cols() != n
        || (n > 1 && dst.col_stride() != 1)
        || bias.is_some_and(|bias| bias.len() < m)
    {
        candle_core::bail!("conv2d: GEMM operands do not match their shapes")
    }
    if let Some(bias) = bias {
        for (i, &value) in bias.iter().enumerate().take(m) {
            if accumulate {
                if let Some(row) = dst.row_mut(i) {
                    row.iter_mut().for_each(|d| *d += value);
                }
            } else if let Some(row) = dst.row_to_write(i) {
                row.iter_mut().for_each(|d| {
                    d.write(value);
                });
            }
        }
    }
    let dst_stride = dst.row_stride();
    let dst_ptr = dst.as_mut_ptr();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the checks above keep every addressed element of a and b inside its slice and
    // make dst an m x n view with unit column stride, whose elements `MatMut` guarantees to be
    // valid and borrowed exclusively.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst_ptr,
            1,
            dst_stride as isize,
            accumulate || bias.is_some(),
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
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
    Ok(())
}

/// One thread's bf16 tile buffers.
#[derive(Debug, Default)]
struct Bf16Scratch {
    /// Two rows of the column matrix (the gathering path).
    pair: Vec<bf16>,
    /// The packed column panels (the gathering path).
    packed: Vec<u32>,
    /// The product of a tile spanning images.
    product: Vec<bf16>,
    /// The channel-paired input rows (the direct path) and their offset tables.
    slab: Vec<u32>,
    row_offsets: Vec<usize>,
    panel_offsets: Vec<usize>,
}

impl ConvElement for bf16 {
    type Scratch = Bf16Scratch;

    /// bf16 kernels are packed once, by the layer ([`PackedKernel`]).
    fn panels(_: &Geometry, _: &[Self]) -> candle_core::Result<Option<Vec<f32>>> {
        Ok(None)
    }

    fn scratch() -> &'static std::thread::LocalKey<std::cell::RefCell<Self::Scratch>> {
        &BF16_SCRATCH
    }

    fn pointwise(
        shape: GemmShape,
        a: KernelRef<'_, Self>,
        b: &[Self],
        bias: Option<&[f32]>,
        dst: &mut [Self],
        accumulate: bool,
        threads: usize,
    ) -> candle_core::Result<()> {
        let GemmShape { m, n, k } = shape;
        let a = a.lhs(m, k)?;
        let b = MatRef::new(b, k, n, n, 1).map_err(to_candle)?;
        let c = MatMut::new(dst, m, n, n, 1).map_err(to_candle)?;
        let bias = bias.map_or(Bias::None, Bias::Rows);
        bf16_gemm::gemm_bf16_operands(a, Rhs::Matrix(b), bias, c, accumulate, threads)
            .map_err(to_candle)
    }

    /// Reads the tile's input through a channel-paired [`Slab`] where that applies (no column
    /// matrix at all); otherwise gathers the columns straight into the GEMM's packed
    /// k-pair panels (two column rows at a time through a small buffer), so the column matrix
    /// is neither written out nor packed in a second pass.
    fn tile(
        g: &Geometry,
        x: &[Self],
        w: KernelRef<'_, Self>,
        post: Epilogue<'_, Self>,
        tile: TileRows,
        scratch: &mut Self::Scratch,
        out: OutPtr<Self>,
        threads: usize,
    ) -> candle_core::Result<()> {
        let (n, k) = (tile.count * g.out_w, g.k());
        let Bf16Scratch {
            pair,
            packed,
            product,
            slab,
            row_offsets,
            panel_offsets,
        } = scratch;
        let order = w.order();
        let b = if tile.direct {
            let slab = Slab::fill(g, x, tile, slab, row_offsets, panel_offsets);
            Rhs::Indexed(slab.rhs().map_err(to_candle)?)
        } else {
            let len = bf16_gemm::packed_len(k, n)
                .ok_or_else(|| candle_core::Error::Msg("conv2d: tile size overflows".into()))?;
            let mut builder = PackedBBuilder::new(prefix(packed, len), k, n).map_err(to_candle)?;
            let (even, odd) = prefix(pair, 2 * n).split_at_mut(n);
            let taps = g.kernel_h * g.kernel_w;
            for p in 0..k.div_ceil(2) {
                gather_row(g, x, tile, order.nchw_index(2 * p, taps), even);
                let odd = if 2 * p + 1 < k {
                    gather_row(g, x, tile, order.nchw_index(2 * p + 1, taps), odd);
                    Some(&*odd)
                } else {
                    None
                };
                builder.set_row_pair(p, even, odd);
            }
            Rhs::Packed(builder.finish())
        };
        let a = w.lhs(g.c_out, k)?;
        let bias = post.bias.map_or(Bias::None, Bias::Rows);
        store_tile(g, tile, out, post.residual, product, |view, accumulate| {
            bf16_gemm::gemm_bf16_operands(a, b, bias, view, accumulate, threads).map_err(to_candle)
        })
    }
}

/// Our error as candle's.
fn to_candle(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

thread_local! {
    /// The f32 panels of the last convolution on this thread, reused (never re-zeroed:
    /// packing overwrites them).
    static F32_PANELS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// A thread's tile buffers, kept between convolutions so that each tile does not fault in
    /// (and the kernel zero) fresh pages; at most a few tiles of [`MAX_TILE_BYTES`] per thread.
    static F32_SCRATCH: std::cell::RefCell<<f32 as ConvElement>::Scratch> =
        const {
            std::cell::RefCell::new(F32Scratch {
                columns: Vec::new(),
                product: Vec::new(),
                slab: Vec::new(),
                row_offsets: Vec::new(),
                panel_offsets: Vec::new(),
            })
        };
    /// As `F32_SCRATCH`, for bf16.
    static BF16_SCRATCH: std::cell::RefCell<<bf16 as ConvElement>::Scratch> =
        const {
            std::cell::RefCell::new(Bf16Scratch {
                pair: Vec::new(),
                packed: Vec::new(),
                product: Vec::new(),
                slab: Vec::new(),
                row_offsets: Vec::new(),
                panel_offsets: Vec::new(),
            })
        };
}

/// Runs `f` with this thread's buffers in `key`, or with fresh ones when they are in use (a
/// thread waiting inside a multi-threaded GEMM may pick up another tile).
fn with_scratch<S: Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<S>>,
    f: impl FnOnce(&mut S) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut S::default()),
    })
}

/// The first `len` values of `buffer`, grown when shorter. Contents are left over from earlier
/// tiles: callers overwrite every value they read.
fn prefix<T: Copy + Default>(buffer: &mut Vec<T>, len: usize) -> &mut [T] {
    if buffer.len() < len {
        buffer.resize(len, T::default());
    }
    &mut buffer[..len]
}

/// The geometry of one convolution. `height` and `width` are those of the prepared input
/// (after upsampling); `src_height` and `src_width` those of the stored input.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    c_in: usize,
    src_height: usize,
    src_width: usize,
    upsample: usize,
    height: usize,
    width: usize,
    c_out: usize,
    kernel_h: usize,
    kernel_w: usize,
    out_h: usize,
    out_w: usize,
    stride: usize,
    /// Zeros above and to the left (and, plus `pad_after`, below and to the right).
    padding: usize,
    pad_after: usize,
    dilation: usize,
}

impl Geometry {
    fn new(
        x: &[usize],
        w: &[usize],
        config: &Conv2dConfig,
        prep: InputPrep,
    ) -> candle_core::Result<Self> {
        let (&[batch, c_in, src_height, src_width], &[c_out, w_in, kernel_h, kernel_w]) = (x, w)
        else {
            candle_core::bail!("conv2d: expected 4-d input and weight, got {x:?} and {w:?}")
        };
        if w_in != c_in {
            candle_core::bail!("conv2d: input has {c_in} channels, the weight expects {w_in}")
        }
        let upsample = prep.upsample.max(1);
        let (Some(height), Some(width)) = (
            src_height.checked_mul(upsample),
            src_width.checked_mul(upsample),
        ) else {
            candle_core::bail!("conv2d: upsampling by {upsample} overflows")
        };
        let stride = config.stride.max(1);
        let dilation = config.dilation.max(1);
        let pad_after = prep.pad_bottom_right;
        let span = |size: usize, kernel: usize| {
            (size + 2 * config.padding + pad_after)
                .checked_sub(dilation * (kernel.max(1) - 1) + 1)
                .map(|s| s / stride + 1)
        };
        let (Some(out_h), Some(out_w)) = (span(height, kernel_h), span(width, kernel_w)) else {
            candle_core::bail!(
                "conv2d: the {kernel_h}x{kernel_w} kernel is larger than the padded \
                 {height}x{width} input"
            )
        };
        Ok(Self {
            batch,
            c_in,
            src_height,
            src_width,
            upsample,
            height,
            width,
            c_out,
            kernel_h,
            kernel_w,
            out_h,
            out_w,
            stride,
            padding: config.padding,
            pad_after,
            dilation,
        })
    }

    /// `[batch, c_out, out_h, out_w]`.
    fn out_dims(&self) -> Vec<usize> {
        vec![self.batch, self.c_out, self.out_h, self.out_w]
    }

    /// Rows of the column matrix: one per input channel and kernel tap.
    fn k(&self) -> usize {
        self.c_in * self.kernel_h * self.kernel_w
    }

    /// Output positions per image.
    fn positions(&self) -> usize {
        self.out_h * self.out_w
    }

    /// A 1×1 convolution with stride 1 and no padding or upsampling reads the input as its
    /// column matrix.
    fn is_pointwise(&self) -> bool {
        self.kernel_h == 1
            && self.kernel_w == 1
            && self.stride == 1
            && self.padding == 0
            && self.pad_after == 0
            && self.upsample == 1
    }

    /// Values of the stored input.
    fn input_len(&self) -> usize {
        self.batch * self.c_in * self.src_height * self.src_width
    }
}

/// A raw pointer to the NCHW output (`Geometry::out_dims`, allocated by `convolve`) that
/// tiles write to in disjoint places from several threads.
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);

impl<T> OutPtr<T> {
    /// The tile's part of the output as a `c_out x n` view when the tile lies within one
    /// image: channel c's rows of the tile are contiguous, `out_h · out_w` apart. `None` for a
    /// tile spanning images (its product goes through a scratch block).
    fn tile_view(
        &self,
        g: &Geometry,
        tile: TileRows,
    ) -> candle_core::Result<Option<MatMut<'_, T>>> {
        let last = tile.first + tile.count.max(1) - 1;
        let image = tile.first / g.out_h;
        if last / g.out_h != image || tile.count == 0 {
            return Ok(None);
        }
        let offset = (image * g.c_out * g.out_h + tile.first % g.out_h) * g.out_w;
        let n = tile.count * g.out_w;
        // SAFETY: `convolve` allocated `batch · c_out · out_h · out_w` elements; rows
        // `tile.first ..= last` of one image, in every channel, lie inside it and belong to
        // this tile alone (tiles are disjoint row ranges), so nothing else reads or writes
        // them while the view lives.
        let view =
            unsafe { MatMut::from_raw_parts(self.0.add(offset), g.c_out, n, g.positions(), 1) };
        view.map(Some).map_err(to_candle)
    }
}
// SAFETY: every tile writes only its own output rows (disjoint regions), and the buffer
// outlives the parallel loop that uses the pointer.
unsafe impl<T: Send> Send for OutPtr<T> {}
// SAFETY: as above: no two tiles touch the same element.
unsafe impl<T: Send> Sync for OutPtr<T> {}

fn conv2d_typed<T: ConvElement>(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    config: &Conv2dConfig,
    prep: InputPrep,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let geometry = Geometry::new(x.dims(), weight.dims(), config, prep)?;
    let weight = weight.contiguous()?;
    let (w_storage, w_layout) = weight.storage_and_layout();
    let w_data = cpu_slice::<T>(&w_storage, w_layout)?;
    let Some(panels) = T::panels(&geometry, w_data)? else {
        let w = KernelRef::Plain(w_data);
        return convolve_tensors(&geometry, x, bias, residual, |x, post| {
            convolve(&geometry, x, w, post, true)
        });
    };
    let packed = PackedF32A::new(&panels, geometry.c_out, geometry.k()).map_err(to_candle);
    let out = packed.and_then(|packed| {
        let w = KernelRef::WithPanels(w_data, packed);
        convolve_tensors(&geometry, x, bias, residual, |x, post| {
            convolve(&geometry, x, w, post, true)
        })
    });
    keep_buffer(&F32_PANELS, panels, KEEP_PANEL_BYTES);
    out
}

/// Keeps `buffer` in `key` for the next call on this thread, unless it holds more than
/// `max_bytes`.
fn keep_buffer(
    key: &'static std::thread::LocalKey<std::cell::Cell<Vec<f32>>>,
    buffer: Vec<f32>,
    max_bytes: usize,
) {
    if buffer.capacity() * std::mem::size_of::<f32>() <= max_bytes {
        key.set(buffer);
    }
}

/// The contiguous values of a CPU tensor.
fn cpu_slice<'a, T: WithDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    contiguous_values(storage, layout, "conv2d")
}

/// Runs the convolution into a fresh NCHW buffer, reading the input through channel-paired
/// slabs where that applies and `allow_direct` (tests compare the two paths).
fn convolve<T: ConvElement>(
    g: &Geometry,
    x: &[T],
    w: KernelRef<'_, T>,
    post: Epilogue<'_, T>,
    allow_direct: bool,
) -> candle_core::Result<Vec<T>> {
    let positions = g.positions();
    let image_out = g.c_out * positions;
    if x.len() != g.input_len()
        || !w.fits(g.c_out, g.k())
        || post
            .residual
            .is_some_and(|r| r.len() != g.batch * image_out)
    {
        candle_core::bail!("conv2d: tensor sizes do not match their shapes")
    }
    let threads = candle_core::utils::get_num_threads().max(1);

    if g.is_pointwise() {
        let mut out = match post.residual {
            Some(residual) => residual.to_vec(),
            None => T::zeroed(g.batch * image_out),
        };
        let image_in = g.c_in * g.src_height * g.src_width;
        for (image, dst) in out.chunks_exact_mut(image_out.max(1)).enumerate() {
            let src = x.get(image * image_in..).unwrap_or_default();
            let shape = GemmShape {
                m: g.c_out,
                n: positions,
                k: g.c_in,
            };
            let accumulate = post.residual.is_some();
            T::pointwise(shape, w, src, post.bias, dst, accumulate, threads)?;
        }
        return Ok(out);
    }

    let direct = allow_direct && slab::direct_applies(g, w.reads_slabs());
    let tiles = plan_tiles(g, TileSizing::new::<T>(g, direct), threads, direct);
    let gemm_threads = if tiles.len() < threads { threads } else { 1 };
    // SAFETY: the tiles are runs of output rows that together cover every row of every image
    // (`plan_tiles`), and each tile writes all `c_out` channels of its rows: its GEMM stores
    // every element of its block (or accumulates onto the residual that `store_tile` wrote
    // there first).
    unsafe {
        written_output(g.batch * image_out, |out_ptr| {
            let run_tile = |&tile: &TileRows| -> candle_core::Result<()> {
                with_scratch(T::scratch(), |scratch| {
                    T::tile(g, x, w, post, tile, scratch, out_ptr, gemm_threads)
                })
            };
            match tiles.as_slice() {
                [tile] => run_tile(tile),
                _ => tiles.par_iter().try_for_each(run_tile),
            }
        })
    }
}

/// A new buffer of `len` values, written by `write` through the pointer it gets: never zeroed,
/// so its pages are faulted in by the threads that write them (see
/// [`super::storage::unwritten`]).
///
/// # Safety
/// When `write` returns `Ok`, it has written all `len` values.
unsafe fn written_output<T>(
    len: usize,
    write: impl FnOnce(OutPtr<T>) -> candle_core::Result<()>,
) -> candle_core::Result<Vec<T>> {
    let mut out = unwritten::<T>(len);
    write(OutPtr(out.as_mut_ptr().cast()))?;
    // SAFETY: the caller's promise.
    Ok(unsafe { assume_written(out) })
}

/// Runs `multiply` on the tile's `c_out x n` output block: the block of the NCHW output itself
/// when the tile lies within one image, otherwise a scratch block (`product`) that is then
/// copied to its places. The block holds the tile's rows of `residual` first, when there is
/// one, and `multiply` is told to accumulate onto them.
fn store_tile<T: Copy + Default>(
    g: &Geometry,
    tile: TileRows,
    out: OutPtr<T>,
    residual: Option<&[T]>,
    product: &mut Vec<T>,
    multiply: impl FnOnce(MatMut<'_, T>, bool) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    let accumulate = residual.is_some();
    if let Some(mut view) = out.tile_view(g, tile)? {
        load_residual(g, residual, tile, &mut view);
        return multiply(view, accumulate);
    }
    let product = prefix(product, g.c_out * tile.count * g.out_w);
    let mut view = MatMut::row_major(product, g.c_out, tile.count * g.out_w).map_err(to_candle)?;
    load_residual(g, residual, tile, &mut view);
    multiply(view, accumulate)?;
    scatter_rows(g, product, tile, out);
    Ok(())
}

/// Copies the tile's rows of `residual` (the output's layout) into `dst`, the tile's
/// `c_out x n` block (unit column stride), for the GEMM to accumulate onto.
fn load_residual<T: Copy>(
    g: &Geometry,
    residual: Option<&[T]>,
    tile: TileRows,
    dst: &mut MatMut<'_, T>,
) {
    let Some(residual) = residual else { return };
    for c in 0..g.c_out {
        let Some(row) = dst.row_to_write(c) else {
            return;
        };
        for (i, chunk) in row.chunks_exact_mut(g.out_w).enumerate() {
            let global_row = tile.first + i;
            let (image, oh) = (global_row / g.out_h, global_row % g.out_h);
            let offset = ((image * g.c_out + c) * g.out_h + oh) * g.out_w;
            write_values(chunk, &residual[offset..offset + g.out_w]);
        }
    }
}

/// How large a convolution's tiles should be.
#[derive(Debug, Clone, Copy)]
struct TileSizing {
    /// Bytes of working data (gathered columns, or a slab) per output row of a tile.
    row_bytes: usize,
    /// Bytes of working data a tile aims at.
    tile_bytes: usize,
}

impl TileSizing {
    /// The gathered columns of a tile should stay in cache while the GEMM sweeps the weight over
    /// them, so tiles are small ([`MIN_TILE_BYTES`]), except that every tile streams the whole
    /// weight from memory (and the f32 GEMM packs it again), so a tile's columns are at least as
    /// many bytes as the weight, up to [`MAX_TILE_BYTES`]. A tile read through a channel-paired
    /// slab (`slab.rs`) re-reads only its slab, which should stay in the core's L2
    /// ([`SLAB_TILE_BYTES`]); the weight streams past it once per few hundred columns either way.
    fn new<T>(g: &Geometry, direct: bool) -> Self {
        let element = std::mem::size_of::<T>();
        if direct {
            return Self {
                row_bytes: slab::slab_row_bytes(g, element),
                tile_bytes: SLAB_TILE_BYTES,
            };
        }
        let weight_bytes = g.c_out * g.k() * element;
        Self {
            row_bytes: g.k() * g.out_w * element,
            tile_bytes: weight_bytes.clamp(MIN_TILE_BYTES, MAX_TILE_BYTES),
        }
    }
}

/// The tiles: runs of output rows, each within one image, of about `sizing.tile_bytes` of
/// working data, reading a slab (`direct`) where they lie within one image. Tiles are at least [`MIN_TILE_COLUMNS`] wide and, where the rows allow, come
/// in a multiple of the thread count so that no thread idles at the end; when one tile per
/// thread would be narrower than that, a single tile spanning every image runs on the GEMM's
/// own threads.
fn plan_tiles(g: &Geometry, sizing: TileSizing, threads: usize, direct: bool) -> Vec<TileRows> {
    let total_rows = g.batch * g.out_h;
    let by_size = (sizing.tile_bytes / sizing.row_bytes.max(1)).max(1);
    let wide_enough = MIN_TILE_COLUMNS.div_ceil(g.out_w.max(1));
    if total_rows.div_ceil(threads) < wide_enough || g.out_h == 0 {
        let tile = TileRows {
            first: 0,
            count: total_rows,
            direct: false,
        };
        return vec![TileRows {
            direct: direct && slab::within_one_image(g, tile),
            ..tile
        }];
    }
    let rows = by_size.max(wide_enough).min(g.out_h);
    let mut per_image = g.out_h.div_ceil(rows);
    while !(g.batch * per_image).is_multiple_of(threads) && per_image < g.out_h {
        per_image += 1;
    }
    // `per_image` tiles whose row counts differ by at most one. (Cutting every tile
    // `out_h.div_ceil(per_image)` rows long gave fewer tiles than that: 37 instead of 38 for
    // the VAE's 256-row convolutions, which left one thread idle for a tile at the end.)
    (0..g.batch)
        .flat_map(|image| {
            (0..per_image).map(move |i| {
                let (first, end) = (i * g.out_h / per_image, (i + 1) * g.out_h / per_image);
                TileRows {
                    first: image * g.out_h + first,
                    count: end - first,
                    direct,
                }
            })
        })
        .collect()
}

/// Fills `row` (`tile.count · out_w` values) with row `r` of the tile's column matrix: the
/// prepared input's values under kernel tap `r` (an input channel and a kernel position) for
/// each output position of the tile, zero where the tap falls in the padding.
fn gather_row<T: WithDType + Default>(
    g: &Geometry,
    x: &[T],
    tile: TileRows,
    r: usize,
    row: &mut [T],
) {
    let taps = g.kernel_h * g.kernel_w;
    let src_plane = g.src_height * g.src_width;
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
    for (i, out_row) in row.chunks_exact_mut(g.out_w).take(tile.count).enumerate() {
        let global_row = tile.first + i;
        let (image, oh) = (global_row / g.out_h, global_row % g.out_h);
        let iy = (oh * g.stride + ky * g.dilation).checked_sub(g.padding);
        let Some(iy) = iy.filter(|&iy| iy < g.height && ow_start < ow_end) else {
            out_row.fill(T::default());
            continue;
        };
        let src_row = (image * g.c_in + channel) * src_plane + (iy / g.upsample) * g.src_width;
        out_row[..ow_start].fill(T::default());
        out_row[ow_end..].fill(T::default());
        let first_ix = ow_start * g.stride + shift - g.padding;
        copy_columns(
            &x[src_row..src_row + g.src_width],
            first_ix,
            g.stride,
            g.upsample,
            &mut out_row[ow_start..ow_end],
        );
    }
}

/// `dst[j] = src[(first + j·stride) / upsample]`: input columns `first, first + stride, ...` of
/// a row upsampled by `upsample` (nearest neighbour), with a copy, a doubling loop or a strided
/// loop for the common cases.
fn copy_columns<T: Copy>(src: &[T], first: usize, stride: usize, upsample: usize, dst: &mut [T]) {
    match (stride, upsample) {
        (1, 1) => dst.copy_from_slice(&src[first..first + dst.len()]),
        (1, 2) => {
            // Logical column first + j is source column (first + j) / 2: an odd start takes
            // one copy, then each source value fills two columns.
            let (head, rest) = dst.split_at_mut((first % 2).min(dst.len()));
            if let Some(h) = head.first_mut() {
                *h = src[first / 2];
            }
            let (s, pairs) = (first.div_ceil(2), rest.len() / 2);
            let mut chunks = rest.chunks_exact_mut(2);
            for (pair, &v) in (&mut chunks).zip(&src[s..s + pairs]) {
                pair[0] = v;
                pair[1] = v;
            }
            if let [last] = chunks.into_remainder() {
                *last = src[s + pairs];
            }
        }
        (_, 1) => {
            // Strided (the downsampling convolutions): no division per value.
            for (d, &v) in dst.iter_mut().zip(src[first..].iter().step_by(stride)) {
                *d = v;
            }
        }
        _ => {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = src[(first + j * stride) / upsample];
            }
        }
    }
}

/// Copies a tile's product `[c_out, rows·out_w]` to its places in the NCHW output.
fn scatter_rows<T: Copy>(g: &Geometry, product: &[T], tile: TileRows, out: OutPtr<T>) {
    let n = tile.count * g.out_w;
    for (c, tile_channel) in product.chunks_exact(n.max(1)).enumerate() {
        for (i, src) in tile_channel.chunks_exact(g.out_w).enumerate() {
            let global_row = tile.first + i;
            let (image, oh) = (global_row / g.out_h, global_row % g.out_h);
            let offset = ((image * g.c_out + c) * g.out_h + oh) * g.out_w;
            // SAFETY: `offset .. offset + out_w` is one output row inside the buffer, owned by
            // this tile alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(offset).cast(), g.out_w) };
            write_values(dst, src);
        }
    }
}

/// Writes `src` into `dst`, which may be uninitialised.
fn write_values<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

/// Sizes of one product `C[m, n] = A[m, k] · B[k, n]`.
#[derive(Debug, Clone, Copy)]
struct GemmShape {
    m: usize,
    n: usize,
    k: usize,
}
