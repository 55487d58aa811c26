//! CPU kernels that candle 0.11 lacks or runs slowly (fused attention, convolution, group and
//! layer norm, activations, native bf16 GEMM and the convolutions' f32 GEMM, transposes, and the
//! loader's type conversions), used by the layers when they apply.

pub mod activation;
pub mod attention;
pub mod bf16_gemm;
pub mod conv2d;
pub(crate) mod convert;
pub mod group_norm;
pub mod layer_norm;
mod math;
pub mod matmul;
pub(crate) mod parallel;
mod storage;
pub mod transpose;
#[cfg(target_arch = "x86_64")]
mod vector;
#[cfg(test)]
mod written_outputs;
