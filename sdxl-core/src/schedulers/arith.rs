//! Tensor arithmetic of the steps: the dtype they run in and linear combinations.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// The dtype a step is computed in: half-precision inputs are upcast to f32 (as diffusers'
/// schedulers do), other dtypes are kept.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// The tensor in its [`compute_dtype`].
///
/// # Errors
/// Tensor failures.
pub(crate) fn upcast(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(compute_dtype(t.dtype()))?)
}

/// `Σ cᵢ·tᵢ` over same-shaped tensors.
///
/// # Errors
/// [`Error::InvalidArgument`] for no terms; tensor failures (mismatched shapes or dtypes).
pub(crate) fn lincomb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut iter = terms.iter();
    let Some((c, t)) = iter.next() else {
        return Err(Error::invalid("empty linear combination"));
    };
    let mut acc = t.affine(*c, 0.0)?;
    for (c, t) in iter {
        acc = (acc + t.affine(*c, 0.0)?)?;
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn combination_and_dtypes() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[1.0f32, 2.0], &dev)?;
        let b = Tensor::new(&[0.5f32, -1.0], &dev)?;
        let c = lincomb(&[(2.0, &a), (4.0, &b)])?.to_vec1::<f32>()?;
        assert_eq!(c, vec![4.0, 0.0]);
        assert!(lincomb(&[]).is_err());
        assert_eq!(upcast(&a.to_dtype(DType::F16)?)?.dtype(), DType::F32);
        assert_eq!(compute_dtype(DType::F64), DType::F64);
        Ok(())
    }
}
