//! A random generator compatible with torch's CPU generator.
//!
//! [`TorchRng`] makes seeds portable: **seed `S` gives exactly the initial latents that diffusers
//! and ComfyUI produce for seed `S` on the CPU, whatever device we run on.** It reproduces
//! `torch.Generator("cpu").manual_seed(S)` followed by `torch.randn(shape, generator=g,
//! dtype=torch.float32)` bit for bit, including the state carried from one draw to the next, so a
//! sampling loop that draws noise at each step also matches.
//!
//! What is reproduced:
//! - the Mersenne Twister engine and its seeding (only the low 32 bits of the seed are used, as
//!   in torch: seeds `S` and `S + 2³²` are the same stream);
//! - for tensors of 16 or more values, torch's block Box–Muller with the float32 `log`/`sincos`
//!   of its x86-64 build (the kernel torch uses on CPUs with AVX2 or AVX-512), emulated in
//!   portable Rust, so the values do not depend on the CPU, OS or accelerator we run on;
//! - for fewer than 16 values, torch's double-precision Box–Muller with its cached second sample
//!   (computed with the platform's `f64` `ln_1p`/`sin`/`cos`; rounding to float32 hides their last
//!   bits).
//!
//! torch on CPUs without AVX2 (or on ARM) uses the platform's `logf`/`sinf`/`cosf` for the block
//! path instead, so its values may differ from these in the last bits.
//!
//! ```
//! use sdxl_core::rng::TorchRng;
//!
//! // torch.manual_seed(0); torch.randn(7)
//! let x = TorchRng::new(0).randn_f32(7);
//! assert!((x[0] - 1.5410).abs() < 1e-4 && (x[6] - 0.4033).abs() < 1e-4);
//! ```

mod mathfun;
mod mt19937;
mod normal;

use std::fmt;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::schedulers::NoiseSource;

use mt19937::Mt19937;

/// torch's CPU random generator (`torch.Generator("cpu")`), for normal samples.
///
/// See the [module documentation](self) for what is reproduced.
#[derive(Clone)]
pub struct TorchRng {
    seed: u64,
    engine: Mt19937,
    /// The second value of the last scalar Box–Muller pair (torch's
    /// `next_double_normal_sample`).
    cached_normal: Option<f64>,
}

impl TorchRng {
    /// A generator in the state of `torch.Generator("cpu").manual_seed(seed)` (or
    /// `torch.manual_seed(seed)` for the default generator).
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            engine: Mt19937::new(seed),
            cached_normal: None,
        }
    }

    /// The seed this generator was created with (`Generator.initial_seed()`).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next `numel` standard normal samples, as `torch.randn(numel, generator=g)` returns
    /// them; the state advances as torch's does.
    pub fn randn_f32(&mut self, numel: usize) -> Vec<f32> {
        let mut out = vec![0f32; numel];
        normal::fill(&mut self.engine, &mut self.cached_normal, &mut out);
        out
    }

    /// A tensor of standard normal samples, as `torch.randn(shape, generator=g,
    /// dtype=torch.float32)` followed by `.to(dtype).to(device)`.
    ///
    /// Values are always drawn in float32 on the CPU, so they are the same on every device; for
    /// f16/bf16 they are the float32 values rounded to `dtype`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the element count overflows `usize`; tensor creation,
    /// conversion or transfer failures.
    pub fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let numel = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| Error::invalid(format!("noise shape {shape:?} is too large")))?;
        let values = self.randn_f32(numel);
        let noise = Tensor::from_vec(values, shape, &Device::Cpu)?;
        Ok(noise.to_dtype(dtype)?.to_device(device)?)
    }
}

impl fmt::Debug for TorchRng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TorchRng")
            .field("seed", &self.seed)
            .field("cached_normal", &self.cached_normal)
            .finish_non_exhaustive()
    }
}

impl NoiseSource for TorchRng {
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        TorchRng::randn(self, shape, dtype, device)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_cached_scalar_sample_carries_over_to_the_next_small_draw() {
        // torch.manual_seed(0); torch.randn(7) then torch.randn(1): the 8th value is the cached
        // sine half of the 4th pair, the same as the 8th value of a single 8-value scalar draw.
        let mut a = TorchRng::new(0);
        let mut first = a.randn_f32(7);
        first.extend(a.randn_f32(1));
        assert_eq!(first, TorchRng::new(0).randn_f32(8));
    }

    #[test]
    fn large_draws_do_not_touch_the_cached_sample() {
        let mut a = TorchRng::new(3);
        let _ = a.randn_f32(1);
        let cached = a.cached_normal;
        let _ = a.randn_f32(40);
        assert!(cached.is_some());
        assert_eq!(a.cached_normal, cached);
    }

    #[test]
    fn tensors_have_the_requested_shape_and_dtype() {
        let t = TorchRng::new(1)
            .randn(&[2, 3, 5], DType::F16, &Device::Cpu)
            .unwrap();
        assert_eq!(t.dims(), &[2, 3, 5]);
        assert_eq!(t.dtype(), DType::F16);
        assert!(TorchRng::new(1)
            .randn(&[usize::MAX, 2], DType::F32, &Device::Cpu)
            .is_err());
    }
}
