//! Linear multistep sampler (k-diffusion's `sample_lms`), as diffusers' `LMSDiscreteScheduler`.
//!
//! Each step combines the ODE derivatives of the last (up to four) steps with weights that
//! integrate their Lagrange basis polynomials over `[σ_i, σ_{i+1}]`. diffusers integrates with
//! `scipy.integrate.quad`; the integrands are polynomials of degree < 4, so a 4-point
//! Gauss–Legendre rule gives them exactly.

use std::collections::VecDeque;

use candle_core::Tensor;
use serde::Deserialize;

use super::arith::compute_dtype;
use super::noising::add_sigma_noise;
use super::prediction::{denoised, PredictionType};
use super::schedule::{betas, f32_round};
use super::sigmas::{training_sigmas, KSigmaSource, SigmaBounds, SigmaFlags, SigmaSpacing};
use super::spacing::TimestepSpacing;
use super::stepping::{schedule_accessors, value_at, StepSchedule};
use super::{NoiseSource, Scheduler, SchedulerConfig, StepOutput};
use crate::error::{Error, Result};

/// The multistep order diffusers' `step` uses by default.
const MAX_ORDER: usize = 4;

/// 4-point Gauss–Legendre nodes and weights on `[-1, 1]` (exact up to degree 7).
const GAUSS_LEGENDRE_4: [(f64, f64); 4] = [
    (-0.861_136_311_594_052_6, 0.347_854_845_137_453_9),
    (-0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
    (0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
    (0.861_136_311_594_052_6, 0.347_854_845_137_453_9),
];

/// `LMSDiscreteScheduler`'s config, field for field, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct LmsDiscreteConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First training beta.
    pub beta_start: f64,
    /// Last training beta.
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    /// Explicit training betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// Karras sigmas.
    pub use_karras_sigmas: Option<bool>,
    /// Exponentially spaced sigmas.
    pub use_exponential_sigmas: Option<bool>,
    /// Beta-distribution sigmas (not supported).
    pub use_beta_sigmas: Option<bool>,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// How timesteps are spread over the training range.
    pub timestep_spacing: TimestepSpacing,
    /// Offset added to `leading` timesteps.
    pub steps_offset: usize,
    /// Not a parameter of this class: diffusers keeps it when the source config has it and then
    /// uses it as the lower bound of exponential sigmas (its Karras sigmas ignore it).
    pub sigma_min: Option<f64>,
    /// Upper counterpart of [`LmsDiscreteConfig::sigma_min`].
    pub sigma_max: Option<f64>,
}

impl Default for LmsDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

/// The linear multistep scheduler (`LMSDiscreteScheduler`).
#[derive(Debug, Clone)]
pub struct LmsDiscrete {
    config: LmsDiscreteConfig,
    source: KSigmaSource,
    schedule: StepSchedule,
    /// The most recent derivatives, oldest first (at most [`MAX_ORDER`]).
    derivatives: VecDeque<Tensor>,
}

/// ∫ f over `[a, b]` with the 4-point Gauss–Legendre rule.
fn integrate(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    GAUSS_LEGENDRE_4
        .iter()
        .map(|&(x, w)| w * f(mid + half * x))
        .sum::<f64>()
        * half
}

/// diffusers' `get_lms_coefficient(order, t, current_order)`: the integral over
/// `[σ_t, σ_{t+1}]` of the Lagrange basis polynomial that is 1 at `σ_{t-current}` and 0 at the
/// other `σ_{t-k}`, `k < order`.
///
/// # Errors
/// [`Error::InvalidArgument`] when the schedule has no `σ_{t-k}` or `σ_{t+1}`.
pub fn lms_coefficient(sigmas: &[f64], order: usize, t: usize, current: usize) -> Result<f64> {
    let at = |k: usize| -> Result<f64> {
        let index = t.checked_sub(k).ok_or_else(|| {
            Error::invalid(format!("LMS order {order} needs σ_(t-{k}) at t = {t}"))
        })?;
        value_at(sigmas, index, "sigma")
    };
    let nodes = (0..order).map(at).collect::<Result<Vec<f64>>>()?;
    let own = at(current)?;
    let basis = |tau: f64| {
        nodes
            .iter()
            .enumerate()
            .filter(|&(k, _)| k != current)
            .map(|(_, &s)| (tau - s) / (own - s))
            .product::<f64>()
    };
    Ok(integrate(
        basis,
        value_at(sigmas, t, "sigma")?,
        value_at(sigmas, t + 1, "sigma")?,
    ))
}

impl LmsDiscrete {
    /// Builds the scheduler from a (possibly foreign) scheduler config plus overrides, like
    /// `LMSDiscreteScheduler.from_config(config)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a malformed or inconsistent config,
    /// [`Error::Unsupported`] for options this crate does not implement.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?)
    }

    /// Builds the scheduler from its typed config.
    ///
    /// # Errors
    /// As [`LmsDiscrete::from_config`].
    pub fn new(config: LmsDiscreteConfig) -> Result<Self> {
        let spacing = SigmaFlags::from_options(
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        )
        .spacing()?;
        let betas = betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
        )?;
        // diffusers' LMS Karras sigmas always span the interpolated schedule.
        let bounds = match spacing {
            SigmaSpacing::Exponential => SigmaBounds {
                min: config.sigma_min,
                max: config.sigma_max,
            },
            SigmaSpacing::Karras | SigmaSpacing::Interpolated | SigmaSpacing::LuLambdas => {
                SigmaBounds::default()
            }
        };
        let source = KSigmaSource {
            train_sigmas: training_sigmas(&betas, false)?,
            num_train_timesteps: config.num_train_timesteps,
            timestep_spacing: config.timestep_spacing,
            steps_offset: config.steps_offset,
            spacing,
            bounds,
        };
        let schedule = StepSchedule::k_diffusion(config.timestep_spacing);
        let mut this = Self {
            config,
            source,
            schedule,
            derivatives: VecDeque::new(),
        };
        // diffusers' constructor runs `set_timesteps(num_train_timesteps)`.
        this.set_timesteps(this.config.num_train_timesteps)?;
        Ok(this)
    }

    /// The typed config.
    pub fn config(&self) -> &LmsDiscreteConfig {
        &self.config
    }
}

impl Scheduler for LmsDiscrete {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let plan = self.source.plan(num_inference_steps)?;
        let sigmas = plan
            .sigmas
            .into_iter()
            .chain(std::iter::once(0.0))
            .map(f32_round)
            .collect();
        let timesteps = plan.timesteps.into_iter().map(f32_round).collect();
        self.schedule.set(timesteps, sigmas);
        self.derivatives.clear();
        Ok(())
    }

    schedule_accessors!();

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let (i, sigma) = self.schedule.current_sigma(timestep)?;
        let dtype = compute_dtype(model_output.dtype());
        let (mo, x) = (model_output.to_dtype(dtype)?, sample.to_dtype(dtype)?);
        let x0 = denoised(self.config.prediction_type, &mo, &x, sigma)?;
        self.derivatives
            .push_back(x.sub(&x0)?.affine(1.0 / sigma, 0.0)?);
        if self.derivatives.len() > MAX_ORDER {
            self.derivatives.pop_front();
        }
        // As diffusers: the order follows the step index (not the stored history), and the
        // coefficients pair with the newest derivatives first.
        let order = (i + 1).min(MAX_ORDER);
        let mut prev = x;
        for (current, derivative) in (0..order).zip(self.derivatives.iter().rev()) {
            let coeff = lms_coefficient(
                self.schedule.sigmas().unwrap_or_default(),
                order,
                i,
                current,
            )?;
            prev = prev.add(&derivative.affine(coeff, 0.0)?)?;
        }
        self.schedule.advance();
        Ok(StepOutput {
            prev_sample: prev.to_dtype(model_output.dtype())?,
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_sigma_noise(original, noise, self.schedule.noise_sigma(timestep)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SIGMAS: [f64; 6] = [14.6, 7.3, 3.1, 1.2, 0.4, 0.0];

    #[test]
    fn quadrature_is_exact_for_cubics() {
        let f = |x: f64| 2.0 * x * x * x - x * x + 3.0 * x - 5.0;
        let antiderivative = |x: f64| 0.5 * x.powi(4) - x.powi(3) / 3.0 + 1.5 * x * x - 5.0 * x;
        let (a, b) = (7.3, 0.4);
        let exact = antiderivative(b) - antiderivative(a);
        assert!((integrate(f, a, b) - exact).abs() < 1e-10 * exact.abs());
    }

    #[test]
    fn first_order_coefficient_is_the_sigma_step() {
        for t in 0..SIGMAS.len() - 1 {
            let c = lms_coefficient(&SIGMAS, 1, t, 0).unwrap();
            assert!((c - (SIGMAS[t + 1] - SIGMAS[t])).abs() < 1e-12);
        }
    }

    #[test]
    fn coefficients_sum_to_the_sigma_step() {
        for order in 1..=MAX_ORDER {
            for t in order - 1..SIGMAS.len() - 1 {
                let sum: f64 = (0..order)
                    .map(|k| lms_coefficient(&SIGMAS, order, t, k).unwrap())
                    .sum();
                let step = SIGMAS[t + 1] - SIGMAS[t];
                assert!(
                    (sum - step).abs() < 1e-10,
                    "order {order}, t {t}: {sum} vs {step}"
                );
            }
        }
    }

    #[test]
    fn second_order_coefficients_match_closed_form() {
        // Basis 0 is (τ - σ_{t-1}) / (σ_t - σ_{t-1}); integrate by hand.
        let (t, s0, s1, sm) = (2, SIGMAS[2], SIGMAS[3], SIGMAS[1]);
        let exact = ((s1 - sm).powi(2) - (s0 - sm).powi(2)) / (2.0 * (s0 - sm));
        let c = lms_coefficient(&SIGMAS, 2, t, 0).unwrap();
        assert!((c - exact).abs() < 1e-12);
    }

    #[test]
    fn missing_history_is_an_error() {
        assert!(lms_coefficient(&SIGMAS, 3, 1, 0).is_err());
    }
}
