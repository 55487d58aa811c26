//! CPU kernels that candle 0.11 lacks or runs slowly, used by the layers when they apply.

pub mod conv2d;
pub mod group_norm;
pub mod transpose;
