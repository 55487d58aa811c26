//! Test support shared by the families' unit tests.

use candle_core::{DType, Device, Tensor};

use super::noising::Vp;
use super::{NoiseSource, Scheduler};
use crate::error::{Error, Result};

/// A noise source for deterministic samplers: any draw is an error.
pub(crate) struct NoNoise;

impl NoiseSource for NoNoise {
    fn randn(&mut self, _: &[usize], _: DType, _: &Device) -> Result<Tensor> {
        Err(Error::invalid("a deterministic sampler drew noise"))
    }
}

/// Samples 1-D Gaussian data N(0, s²) with its exact denoiser E[x₀|x_t] (the scheduler must use
/// `prediction_type: sample`) up to the last timestep, skipping the final first-order jump to
/// σ = 0, and returns the largest error there against the exact ODE solution:
/// `x_t / √(α²s² + σ_t²)` is constant along the flow.
pub(crate) fn gaussian_ode_error(sched: &mut dyn Scheduler, steps: usize) -> Result<f64> {
    let s2 = 0.25;
    let z = [1.3f64, -0.7, 0.2, 2.1];
    let scale = |sigma: f64| {
        let vp = Vp::from_sigma(sigma);
        (vp.alpha * vp.alpha * s2 + vp.sigma * vp.sigma).sqrt()
    };
    sched.set_timesteps(steps)?;
    sched.set_begin_index(0);
    let sigmas = sched.sigmas().map(<[f64]>::to_vec).unwrap_or_default();
    let timesteps = sched.timesteps().to_vec();
    let sigma_at = |i: usize| sigmas.get(i).copied().unwrap_or(0.0);
    let mut x = Tensor::new(&z.map(|v| v * scale(sigma_at(0))), &Device::Cpu)?;
    let last = timesteps.len().saturating_sub(1);
    for (i, &t) in timesteps.iter().enumerate().take(last) {
        let vp = Vp::from_sigma(sigma_at(i));
        let x0 = x.affine(
            vp.alpha * s2 / (vp.alpha * vp.alpha * s2 + vp.sigma * vp.sigma),
            0.0,
        )?;
        x = sched.step(&x0, t, &x, &mut NoNoise)?.prev_sample;
    }
    let exact = Tensor::new(&z.map(|v| v * scale(sigma_at(last))), &Device::Cpu)?;
    Ok((x - exact)?.abs()?.max(0)?.to_scalar::<f64>()?)
}
