//! Helpers shared by the unit tests.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Tensor};

/// `max |a - b|` over all elements, computed in f32.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    (wide(a) - wide(b))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max |t|` over all elements, computed in f32 (the scale of a tolerance).
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
