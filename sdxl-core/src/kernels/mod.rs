//! Hand-written CPU compute kernels that candle lacks or runs slowly (native bf16 GEMM).

pub mod bf16_gemm;
pub mod matmul;
