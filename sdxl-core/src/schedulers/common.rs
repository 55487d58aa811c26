//! Pieces shared by the scheduler families: the training noise schedule (betas, cumulative
//! alphas, zero-terminal-SNR rescaling) and Karras sigmas.
//!
//! Values are computed in f64 from the same formulas diffusers uses; where diffusers stores a
//! float32 tensor the result is rounded through f32 so that derived quantities match.

use crate::error::{Error, Result};

/// Rounds through f32, as a value stored in a float32 torch tensor.
pub fn f32_round(x: f64) -> f64 {
    x as f32 as f64
}

/// `torch.linspace(start, end, n, dtype=float32)`, element by element.
pub fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![f32_round(start)];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            // torch fills the first half from the start and the second half from the end.
            let v = if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            };
            v as f64
        })
        .collect()
}

/// The training betas for `schedule` (`linear`, `scaled_linear` or `squaredcos_cap_v2`), or
/// `trained` when given, as float32 values.
///
/// # Errors
/// [`Error::Unsupported`] for an unknown schedule name.
pub fn betas(
    schedule: &str,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
    trained: Option<&[f64]>,
) -> Result<Vec<f64>> {
    if let Some(t) = trained {
        return Ok(t.iter().map(|&b| f32_round(b)).collect());
    }
    match schedule {
        "linear" => Ok(linspace_f32(beta_start, beta_end, num_train_timesteps)),
        "scaled_linear" => {
            Ok(
                linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                    .into_iter()
                    .map(|b| f32_round(b * b))
                    .collect(),
            )
        }
        "squaredcos_cap_v2" => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            let n = num_train_timesteps as f64;
            Ok((0..num_train_timesteps)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
                    f32_round((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999))
                })
                .collect())
        }
        other => Err(Error::unsupported(format!(
            "beta_schedule `{other}` (expected linear, scaled_linear or squaredcos_cap_v2)"
        ))),
    }
}

/// `torch.cumprod(1 - betas)` in float32.
pub fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1f32;
    betas
        .iter()
        .map(|&b| {
            acc *= 1.0 - b as f32;
            acc as f64
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), as diffusers'
/// `rescale_zero_terminal_snr`.
pub fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let alphas_bar_sqrt: Vec<f64> = alphas_cumprod(betas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = match (alphas_bar_sqrt.first(), alphas_bar_sqrt.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return Vec::new(),
    };
    let shifted: Vec<f64> = alphas_bar_sqrt
        .iter()
        .map(|a| (a - last) * first / (first - last))
        .collect();
    let alphas_bar: Vec<f64> = shifted.iter().map(|a| a * a).collect();
    let mut out = Vec::with_capacity(alphas_bar.len());
    let mut prev = 1.0;
    for (i, &ab) in alphas_bar.iter().enumerate() {
        let alpha = if i == 0 { ab } else { ab / prev };
        prev = ab;
        out.push(f32_round(1.0 - alpha));
    }
    out
}

/// Karras et al. (2022) noise levels: `n` sigmas from `sigma_max` down to `sigma_min` with
/// `rho` = 7, spaced evenly in `sigma^(1/rho)`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    (0..n)
        .map(|i| {
            let ramp = if n > 1 {
                i as f64 / (n - 1) as f64
            } else {
                0.0
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_linear_endpoints() {
        let b = betas("scaled_linear", 0.00085, 0.012, 1000, None).unwrap_or_default();
        assert_eq!(b.len(), 1000);
        assert!((b[0] - 0.00085).abs() < 1e-9);
        assert!((b[999] - 0.012).abs() < 1e-9);
    }

    #[test]
    fn zero_snr_ends_at_zero() {
        let b = betas("scaled_linear", 0.00085, 0.012, 1000, None).unwrap_or_default();
        let r = rescale_zero_terminal_snr(&b);
        let ac = alphas_cumprod(&r);
        assert!(ac[999].abs() < 1e-6, "terminal alpha_bar {}", ac[999]);
    }

    #[test]
    fn unknown_schedule_is_an_error() {
        assert!(betas("cosine-ish", 0.1, 0.2, 10, None).is_err());
    }
}
