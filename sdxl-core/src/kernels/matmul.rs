//! Tensor-level matmul and linear that run bf16 CPU tensors on the native bf16 GEMM.
//!
//! [`matmul`] and [`linear`] have candle's semantics. When both operands are bf16 tensors on the
//! CPU and the CPU has AVX512-BF16 ([`native_available`]), they run
//! [`gemm_bf16_bias`] directly on the tensors' storage (strided views
//! such as a transposed weight are read in place, never copied) on candle's thread count
//! ([`candle_core::utils::get_num_threads`]). Every other case (other dtypes, devices or CPUs,
//! unequal batch dims) is candle's own `Tensor::matmul`, so results and errors match candle's.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, TensorId};
use half::{bf16, vec::HalfBitsVecExt};

use super::bf16_gemm::{
    gemm_bf16_bias, gemm_bf16_operands, native_available, pack_b, Bias, Lhs, MatMut, MatRef,
    PackedB, Rhs,
};

/// `a . b` for `[..., m, k] x [..., k, n]` (the same batch dims on both sides), as
/// `Tensor::matmul`; bf16 CPU tensors use the native bf16 GEMM (bf16 result, f32 accumulation).
///
/// # Errors
/// The errors of `Tensor::matmul` (shape, dtype or device mismatch).
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if native_applies(a, b) {
        a.apply_op2_no_bwd(b, &Bf16Matmul::new(None))
    } else {
        a.matmul(b)
    }
}

/// `x . weightᵀ + bias` for `x [..., in]`, `weight [out, in]` and `bias [out]`, as candle-nn's
/// `Linear`; bf16 CPU tensors use the native bf16 GEMM with the weight read transposed in place
/// and the bias added in f32 before the single rounding to bf16 (as PyTorch's `addmm` does).
///
/// # Errors
/// If `weight` is not 2-D, `x`'s last dim is not `in`, `bias` does not broadcast to `[out]`, or
/// a tensor operation fails.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        return Err(candle_core::Error::msg(
            "linear: input must have at least one dim",
        ));
    };
    if last != in_features {
        return Err(candle_core::Error::msg(format!(
            "linear: input {:?} does not end in the weight's {in_features} input features",
            dims
        )));
    }
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, in_features))?;
    let wt = weight.t()?;
    let mut out_dims = lead.to_vec();
    out_dims.push(out_features);
    let fused_bias = match bias {
        Some(b) if b.dims() == [out_features] && native_applies(&x2, &wt) => {
            Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        }
        _ => None,
    };
    if let Some(bias) = fused_bias {
        return x2
            .apply_op2_no_bwd(&wt, &Bf16Matmul::new(Some(bias)))?
            .reshape(out_dims);
    }
    let y = matmul(&x2, &wt)?.reshape(out_dims)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// A linear layer's bf16 weight packed once for the native GEMM (see
/// [`crate::kernels::bf16_gemm::pack_b`]): the same values as the `[out, in]` weight, in the
/// panel order the micro-kernel reads, so that no call re-packs it. It takes the memory of the
/// bf16 weight (it replaces it; [`PackedWeight::weight`] unpacks a copy).
#[derive(Debug, Clone)]
pub struct PackedWeight {
    /// The packed `u32` pairs, a 1-D U32 tensor on the CPU.
    panels: Tensor,
    in_features: usize,
    out_features: usize,
}

impl PackedWeight {
    /// Whether [`PackedWeight::pack`] packs weights of `dtype` on `device`: bf16 on the CPU, on
    /// a CPU with AVX512-BF16.
    pub fn applies(dtype: DType, device: &candle_core::Device) -> bool {
        dtype == DType::BF16 && device.is_cpu() && native_available()
    }

    /// Packs `weight_t` `[in, out]` (the transposed weight, any strides: the transposed view of
    /// a checkpoint's `[out, in]` weight packs fastest) when the native bf16 GEMM runs it (see
    /// [`PackedWeight::applies`]). `None` otherwise.
    ///
    /// # Errors
    /// `weight_t` not 2-D, or a tensor operation fails.
    pub fn pack(weight_t: &Tensor) -> candle_core::Result<Option<Self>> {
        let (in_features, out_features) = weight_t.dims2()?;
        if !Self::applies(weight_t.dtype(), weight_t.device()) {
            return Ok(None);
        }
        let (storage, layout) = weight_t.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let data = cpu
            .as_slice::<bf16>()?
            .get(layout.start_offset()..)
            .unwrap_or(&[]);
        let &[rs, cs] = layout.stride() else {
            candle_core::bail!("packed weight: weight must be 2-D")
        };
        let b = MatRef::new(data, in_features, out_features, rs, cs).map_err(to_candle)?;
        Self::from_transposed_view(b).map(Some)
    }

    /// Packs a checkpoint's `[out, in]` weight given as row-major values (each output row is
    /// one line of the packed panels).
    ///
    /// # Errors
    /// `weight` does not hold `out_features · in_features` values, or the packed size cannot
    /// be allocated.
    pub fn pack_rows(
        weight: &[bf16],
        out_features: usize,
        in_features: usize,
    ) -> candle_core::Result<Self> {
        let b =
            MatRef::new(weight, in_features, out_features, 1, in_features).map_err(to_candle)?;
        Self::from_transposed_view(b)
    }

    /// Packs `weight_t` `[in, out]` into a CPU tensor of panels.
    fn from_transposed_view(weight_t: MatRef<'_, bf16>) -> candle_core::Result<Self> {
        let panels = pack_b(weight_t).map_err(to_candle)?;
        let len = panels.len();
        Ok(Self {
            panels: Tensor::from_vec(panels, len, &candle_core::Device::Cpu)?,
            in_features: weight_t.rows(),
            out_features: weight_t.cols(),
        })
    }

    /// `(out, in)`: the weight's shape.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// The id of the packed storage (it changes only when the layer gets another weight).
    pub fn id(&self) -> TensorId {
        self.panels.id()
    }

    /// The weight `[out, in]` in bf16, unpacked into a new tensor.
    ///
    /// # Errors
    /// A tensor operation fails.
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        let panels = self.panels.to_vec1::<u32>()?;
        let packed =
            PackedB::new(&panels, self.in_features, self.out_features).map_err(to_candle)?;
        Tensor::from_vec(
            packed.unpack_transposed(),
            (self.out_features, self.in_features),
            self.panels.device(),
        )
    }

    /// `x . weightᵀ + bias (+ residual)` for a bf16 `x [..., in]`, `bias [out]` and a bf16
    /// `residual [..., out]` (a residual connection), both added in f32 before the single
    /// rounding to bf16.
    ///
    /// # Errors
    /// `x` not bf16 or not ending in `in`, a bias of another length, a residual of another
    /// shape or dtype, or a tensor failure.
    pub fn linear(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let Some((&last, lead)) = dims.split_last() else {
            candle_core::bail!("linear: input must have at least one dim")
        };
        if last != self.in_features || x.dtype() != DType::BF16 {
            candle_core::bail!(
                "packed linear: input {dims:?} {:?} is not bf16 ending in {} features",
                x.dtype(),
                self.in_features
            )
        }
        let col_bias = match bias {
            Some(b) if b.dims() == [self.out_features] => {
                Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?)
            }
            Some(b) => candle_core::bail!(
                "packed linear: bias {:?} is not [{}]",
                b.dims(),
                self.out_features
            ),
            None => None,
        };
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, self.in_features))?;
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features);
        let residual = match residual {
            Some(r) if r.dims() == out_dims.as_slice() && r.dtype() == DType::BF16 => {
                Some(r.contiguous()?)
            }
            Some(r) => candle_core::bail!(
                "packed linear: residual {:?} {:?} is not bf16 {out_dims:?}",
                r.dims(),
                r.dtype()
            ),
            None => None,
        };
        let op = PackedLinear {
            in_features: self.in_features,
            out_features: self.out_features,
            threads: candle_core::utils::get_num_threads(),
            col_bias,
            residual,
        };
        x2.apply_op2_no_bwd(&self.panels, &op)?.reshape(out_dims)
    }
}

/// `x . Wᵀ (+ bias) (+ residual)` with `W` packed, as a candle custom op (forward only).
struct PackedLinear {
    in_features: usize,
    out_features: usize,
    threads: usize,
    col_bias: Option<Vec<f32>>,
    /// A contiguous bf16 tensor of the output's size, the GEMM's starting values.
    residual: Option<Tensor>,
}

impl PackedLinear {
    /// The output buffer: the residual's values, or zeros (calloc'd, so that the GEMM's
    /// threads fault the pages in instead of this one writing zeros first).
    fn initial_output(&self, len: usize) -> candle_core::Result<Vec<bf16>> {
        let Some(residual) = &self.residual else {
            return Ok(vec![0u16; len].reinterpret_into());
        };
        let (storage, layout) = residual.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("packed linear: the residual is not on the CPU")
        };
        let start = layout.start_offset();
        match cpu.as_slice::<bf16>()?.get(start..start + len) {
            Some(values) if layout.shape().elem_count() == len => Ok(values.to_vec()),
            _ => candle_core::bail!("packed linear: the residual does not fit the output"),
        }
    }
}

impl CustomOp2 for PackedLinear {
    fn name(&self) -> &'static str {
        "sdxl-bf16-packed-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (k, n) = (self.in_features, self.out_features);
        let (m, _) = l1.shape().dims2()?;
        let &[rs, cs] = l1.stride() else {
            candle_core::bail!("packed linear: input must be 2-D")
        };
        let x = s1
            .as_slice::<bf16>()?
            .get(l1.start_offset()..)
            .unwrap_or(&[]);
        let panels = s2.as_slice::<u32>()?;
        let panels = panels
            .get(l2.start_offset()..l2.start_offset() + l2.shape().elem_count())
            .unwrap_or(&[]);
        let a = MatRef::new(x, m, k, rs, cs).map_err(to_candle)?;
        let b = PackedB::new(panels, k, n).map_err(to_candle)?;
        let mut out = self.initial_output(m * n)?;
        let c = MatMut::row_major(&mut out, m, n).map_err(to_candle)?;
        let bias = self.col_bias.as_deref().map_or(Bias::None, Bias::Cols);
        let accumulate = self.residual.is_some();
        gemm_bf16_operands(
            Lhs::Matrix(a),
            Rhs::Packed(b),
            bias,
            c,
            accumulate,
            self.threads,
        )
        .map_err(to_candle)?;
        Ok((CpuStorage::BF16(out), Shape::from((m, n))))
    }
}

/// Whether [`matmul`] takes the native path for these operands.
fn native_applies(a: &Tensor, b: &Tensor) -> bool {
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    a.dtype() == DType::BF16
        && b.dtype() == DType::BF16
        && a.device().is_cpu()
        && b.device().is_cpu()
        && r >= 2
        && bd.len() == r
        && ad.get(..r - 2) == bd.get(..r - 2)
        && ad.get(r - 1) == bd.get(r - 2)
        && native_available()
}

/// The native matmul as a candle custom op (forward only), with an optional per-column bias.
struct Bf16Matmul {
    threads: usize,
    col_bias: Option<Vec<f32>>,
}

impl Bf16Matmul {
    /// The op on candle's thread count.
    fn new(col_bias: Option<Vec<f32>>) -> Self {
        Self {
            threads: candle_core::utils::get_num_threads(),
            col_bias,
        }
    }
}

/// Element offsets of each batch matrix of a layout with `batch_rank` leading batch dims.
fn batch_offsets(layout: &Layout, batch_rank: usize) -> Vec<usize> {
    let dims = layout.dims().get(..batch_rank).unwrap_or(&[]);
    let strides = layout.stride().get(..batch_rank).unwrap_or(&[]);
    let mut offsets = vec![layout.start_offset()];
    for (&d, &s) in dims.iter().zip(strides) {
        offsets = offsets
            .iter()
            .flat_map(|&o| (0..d).map(move |i| o + i * s))
            .collect();
    }
    offsets
}

/// Our error as candle's.
fn to_candle(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::msg(e.to_string())
}

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "sdxl-bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ad, bd) = (l1.dims(), l2.dims());
        let r = ad.len();
        let shapes = (
            ad.get(r.wrapping_sub(2)..),
            bd.get(r.wrapping_sub(2)..),
            l1.stride().get(r.wrapping_sub(2)..),
            l2.stride().get(r.wrapping_sub(2)..),
        );
        let (Some(&[m, k]), Some(&[_, n]), Some(&[ars, acs]), Some(&[brs, bcs])) = shapes else {
            return Err(candle_core::Error::msg(
                "bf16 matmul: operands must be at least 2-D",
            ));
        };
        let (a_data, b_data) = (s1.as_slice::<bf16>()?, s2.as_slice::<bf16>()?);
        let a_offsets = batch_offsets(l1, r - 2);
        let b_offsets = batch_offsets(l2, r - 2);
        let mut out = vec![bf16::ZERO; a_offsets.len() * m * n];
        let tail = |data: &'static str, off: usize, len: usize| {
            candle_core::Error::msg(format!(
                "bf16 matmul: {data} offset {off} is outside its storage of {len}"
            ))
        };
        for ((&ao, &bo), c) in a_offsets
            .iter()
            .zip(&b_offsets)
            .zip(out.chunks_exact_mut((m * n).max(1)))
        {
            let a_slice = a_data
                .get(ao..)
                .ok_or_else(|| tail("A", ao, a_data.len()))?;
            let b_slice = b_data
                .get(bo..)
                .ok_or_else(|| tail("B", bo, b_data.len()))?;
            let a = MatRef::new(a_slice, m, k, ars, acs).map_err(to_candle)?;
            let b = MatRef::new(b_slice, k, n, brs, bcs).map_err(to_candle)?;
            let c = MatMut::row_major(c, m, n).map_err(to_candle)?;
            let bias = self.col_bias.as_deref().map_or(Bias::None, Bias::Cols);
            gemm_bf16_bias(a, b, bias, c, false, self.threads).map_err(to_candle)?;
        }
        let mut shape = ad.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::BF16(out), Shape::from(shape)))
    }
}
