//! DPM-Solver++ (Lu et al. 2022, <https://arxiv.org/abs/2211.01095>), as diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type` `dpmsolver++` (ODE) or
//! `sde-dpmsolver++` (SDE, fresh noise every step), orders 1–3.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::arith::{lincomb, upcast};
use super::noising::Vp;
use super::prediction::{data_prediction, reject_thresholding, PredictionType};
use super::schedule::{betas, f32_round, train_alphas_cumprod, vp_sigmas, TerminalAlpha};
use super::sigmas::{multistep_plan, FinalSigmasType, SigmaBounds, SigmaFlags, SigmaSpacing};
use super::spacing::{multistep_timesteps, TimestepSpacing};
use super::stepping::{schedule_accessors, ModelHistory, StepSchedule};
use super::{NoiseSource, Scheduler, SchedulerConfig, StepOutput};
use crate::error::{Error, Result};

/// `DPMSolverMultistepScheduler`'s `config.json`, field for field, with diffusers' defaults.
///
/// `sigma_min`/`sigma_max` are not constructor arguments in diffusers, but a config carried over
/// from another scheduler may hold them, and diffusers' Karras conversion then uses them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpmSolverConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First beta of the training schedule.
    pub beta_start: f64,
    /// Last beta of the training schedule.
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// Solver order: 1, 2 (2M) or 3 (3M).
    pub solver_order: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding (Imagen); not supported here.
    pub thresholding: bool,
    /// Quantile for dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound for dynamic thresholding.
    pub sample_max_value: f64,
    /// `dpmsolver++` or `sde-dpmsolver++` (`deis` is read as `dpmsolver++`, as diffusers does).
    pub algorithm_type: String,
    /// Second-order solver: `midpoint` or `heun` (`logrho`, `bh1`, `bh2` read as `midpoint`).
    pub solver_type: String,
    /// Use lower orders for the last steps when there are fewer than 15 steps.
    pub lower_order_final: bool,
    /// Use a first-order (Euler) update for the very last step.
    pub euler_at_final: bool,
    /// Space sigmas as Karras et al. (2022).
    pub use_karras_sigmas: bool,
    /// Space sigmas exponentially (log-linear).
    pub use_exponential_sigmas: bool,
    /// Beta-distribution sigmas; not supported here.
    pub use_beta_sigmas: bool,
    /// Space log-sigmas linearly (Lu et al. 2022).
    pub use_lu_lambdas: bool,
    /// Flow-matching sigmas; not supported here.
    pub use_flow_sigmas: bool,
    /// Flow-matching shift (used with `use_flow_sigmas`).
    pub flow_shift: f64,
    /// The σ the last step lands on.
    pub final_sigmas_type: FinalSigmasType,
    /// Lower clip for λ(t) (`null` = −∞), for the cosine schedule.
    pub lambda_min_clipped: Option<f64>,
    /// `learned`/`learned_range` for variance-predicting models; not supported here.
    pub variance_type: Option<String>,
    /// How timesteps are spread.
    pub timestep_spacing: TimestepSpacing,
    /// Offset added to `leading` timesteps.
    pub steps_offset: usize,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
    /// Dynamic shifting (flow models); not supported here.
    pub use_dynamic_shifting: bool,
    /// Time-shift function for dynamic shifting.
    pub time_shift_type: String,
    /// Smallest sigma for Karras/exponential spacing (absent: from the training schedule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigma_min: Option<f64>,
    /// Largest sigma for Karras/exponential spacing (absent: from the training schedule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigma_max: Option<f64>,
}

impl Default for DpmSolverConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            algorithm_type: "dpmsolver++".to_string(),
            solver_type: "midpoint".to_string(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: None,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".to_string(),
            sigma_min: None,
            sigma_max: None,
        }
    }
}

/// Whether the SDE variant is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Ode,
    Sde,
}

/// DPM-Solver++ multistep sampling: diffusers' `DPMSolverMultistepScheduler`.
///
/// The SDE variant draws one noise tensor per step (float32, as diffusers). The step's
/// `pred_original_sample` is the converted model output (the data prediction x₀).
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    config: DpmSolverConfig,
    algorithm: Algorithm,
    heun: bool,
    spacing: SigmaSpacing,
    alphas_cumprod: Vec<f64>,
    train_sigmas: Vec<f64>,
    schedule: StepSchedule,
    model_outputs: ModelHistory,
    lower_order_nums: usize,
}

impl DpmSolverMultistep {
    /// Builds the scheduler from a scheduler config (unknown keys ignored).
    ///
    /// # Errors
    /// See [`DpmSolverMultistep::new`]; also a known key with a value of the wrong type.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?)
    }

    /// Builds the scheduler from its typed config.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for options not implemented here (thresholding, the noise-
    /// prediction `dpmsolver`/`sde-dpmsolver` algorithms, learned variance, beta/flow sigmas,
    /// dynamic shifting, solver orders above 3) or an unknown beta schedule;
    /// [`Error::InvalidArgument`] for a zero solver order or zero training timesteps.
    pub fn new(config: DpmSolverConfig) -> Result<Self> {
        reject_thresholding(config.thresholding)?;
        let algorithm = match config.algorithm_type.as_str() {
            "dpmsolver++" | "deis" => Algorithm::Ode,
            "sde-dpmsolver++" => Algorithm::Sde,
            other => {
                return Err(Error::unsupported(format!(
                    "DPM-Solver algorithm_type `{other}` (supported: dpmsolver++, sde-dpmsolver++)"
                )))
            }
        };
        let heun = match config.solver_type.as_str() {
            "heun" => true,
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            other => {
                return Err(Error::unsupported(format!(
                    "DPM-Solver solver_type `{other}` (expected midpoint or heun)"
                )))
            }
        };
        match config.solver_order {
            0 => return Err(Error::invalid("solver_order must be at least 1")),
            1..=3 => {}
            n => {
                return Err(Error::unsupported(format!(
                    "DPM-Solver solver_order {n} (supported: 1, 2, 3)"
                )))
            }
        }
        if let Some(v) = &config.variance_type {
            return Err(Error::unsupported(format!(
                "DPM-Solver variance_type `{v}` (learned variance)"
            )));
        }
        if config.use_dynamic_shifting {
            return Err(Error::unsupported("use_dynamic_shifting (flow models)"));
        }
        let spacing = SigmaFlags {
            karras: config.use_karras_sigmas,
            exponential: config.use_exponential_sigmas,
            beta: config.use_beta_sigmas,
            lu: config.use_lu_lambdas,
            flow: config.use_flow_sigmas,
        }
        .spacing()?;
        let betas = betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
        )?;
        let alphas_cumprod =
            train_alphas_cumprod(&betas, config.rescale_betas_zero_snr, TerminalAlpha::Finite)?;
        Ok(Self {
            model_outputs: ModelHistory::new(config.solver_order),
            train_sigmas: vp_sigmas(&alphas_cumprod),
            config,
            algorithm,
            heun,
            spacing,
            alphas_cumprod,
            schedule: StepSchedule::multistep(),
            lower_order_nums: 0,
        })
    }

    /// The typed config this scheduler was built from.
    pub fn config(&self) -> &DpmSolverConfig {
        &self.config
    }

    /// The last training timestep whose λ is not clipped by `lambda_min_clipped`, plus one.
    fn last_timestep(&self) -> usize {
        let train = self.config.num_train_timesteps;
        let Some(min) = self.config.lambda_min_clipped else {
            return train;
        };
        // torch.searchsorted(flip(lambda_t), min): how many λ (ascending) lie below `min`.
        let clipped = self
            .alphas_cumprod
            .iter()
            .filter(|&&a| {
                let a = a as f32;
                let l = a.sqrt().ln() - (1.0 - a).sqrt().ln();
                f64::from(l) < min
            })
            .count();
        train - clipped
    }

    /// One solver update of `order` from step `i` to `i + 1`.
    fn update(
        &self,
        order: usize,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let s = |k: usize| -> Result<(f64, f64, f64)> {
            let vp = Vp::from_sigma(self.schedule.sigma(k)?);
            Ok((vp.alpha, vp.sigma, vp.lambda()))
        };
        let back = |n: usize| {
            i.checked_sub(n)
                .ok_or_else(|| Error::invalid("solver history underflow"))
        };
        let (alpha_t, sigma_t, lambda_t) = s(i + 1)?;
        let (_, sigma_s0, lambda_s0) = s(i)?;
        let h = lambda_t - lambda_s0;
        let m0 = self.model_outputs.get(0)?;
        let (exp_h, exp_2h) = ((-h).exp(), (-2.0 * h).exp());

        // x_t = c_x·x + Σ c_k·D_k (+ noise term), written per algorithm.
        let mut terms: Vec<(f64, Tensor)> = Vec::with_capacity(4);
        let (c_x, c0, c_noise) = match self.algorithm {
            Algorithm::Ode => (sigma_t / sigma_s0, alpha_t * (1.0 - exp_h), 0.0),
            Algorithm::Sde => (
                sigma_t / sigma_s0 * exp_h,
                alpha_t * (1.0 - exp_2h),
                sigma_t * (1.0 - exp_2h).sqrt(),
            ),
        };
        terms.push((c_x, sample.clone()));
        terms.push((c0, m0.clone()));
        match order {
            1 => {}
            2 => {
                let m1 = self.model_outputs.get(1)?;
                let (_, _, lambda_s1) = s(back(1)?)?;
                let r0 = (lambda_s0 - lambda_s1) / h;
                let d1 = (m0 - m1)?.affine(1.0 / r0, 0.0)?;
                let c1 = match (self.algorithm, self.heun) {
                    (_, false) => 0.5 * c0,
                    (Algorithm::Ode, true) => alpha_t * ((exp_h - 1.0) / h + 1.0),
                    (Algorithm::Sde, true) => alpha_t * ((1.0 - exp_2h) / (-2.0 * h) + 1.0),
                };
                terms.push((c1, d1));
            }
            _ => {
                let m1 = self.model_outputs.get(1)?;
                let m2 = self.model_outputs.get(2)?;
                let (_, _, lambda_s1) = s(back(1)?)?;
                let (_, _, lambda_s2) = s(back(2)?)?;
                let (r0, r1) = ((lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h);
                let d1_0 = (m0 - m1)?.affine(1.0 / r0, 0.0)?;
                let d1_1 = (m1 - m2)?.affine(1.0 / r1, 0.0)?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = (&d1_0 + diff.affine(r0 / (r0 + r1), 0.0)?)?;
                let d2 = diff.affine(1.0 / (r0 + r1), 0.0)?;
                let (c1, c2) = match self.algorithm {
                    Algorithm::Ode => (
                        alpha_t * ((exp_h - 1.0) / h + 1.0),
                        -alpha_t * ((exp_h - 1.0 + h) / (h * h) - 0.5),
                    ),
                    Algorithm::Sde => (
                        alpha_t * ((1.0 - exp_2h) / (-2.0 * h) + 1.0),
                        alpha_t * ((1.0 - exp_2h - 2.0 * h) / (4.0 * h * h) - 0.5),
                    ),
                };
                terms.push((c1, d1));
                terms.push((c2, d2));
            }
        }
        if let (Algorithm::Sde, Some(z)) = (self.algorithm, noise) {
            terms.push((c_noise, z.clone()));
        }
        let refs: Vec<(f64, &Tensor)> = terms.iter().map(|(c, t)| (*c, t)).collect();
        lincomb(&refs)
    }
}

impl Scheduler for DpmSolverMultistep {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        let spaced = multistep_timesteps(
            c.timestep_spacing,
            c.num_train_timesteps,
            self.last_timestep(),
            num_inference_steps,
            c.steps_offset,
        )?;
        let plan = multistep_plan(
            &self.train_sigmas,
            spaced,
            self.spacing,
            num_inference_steps,
            SigmaBounds {
                min: c.sigma_min,
                max: c.sigma_max,
            },
            c.beta_schedule != "squaredcos_cap_v2",
        );
        let last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => self.train_sigmas.first().copied().unwrap_or(0.0),
        };
        let sigmas = plan
            .sigmas
            .into_iter()
            .chain(std::iter::once(last))
            .map(f32_round)
            .collect();
        self.schedule.set(plan.timesteps, sigmas);
        self.model_outputs = ModelHistory::new(c.solver_order);
        self.lower_order_nums = 0;
        Ok(())
    }

    schedule_accessors!();

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        self.schedule.step_count()?;
        let (i, sigma) = self.schedule.current_sigma(timestep)?;
        let n = self.schedule.timesteps().len();
        let short = self.config.lower_order_final && n < 15;
        let lower_order_final = i + 1 == n
            && (self.config.euler_at_final
                || short
                || self.config.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == n && short;

        let out_dtype = model_output.dtype();
        let x = upcast(sample)?;
        let x0 = data_prediction(
            self.config.prediction_type,
            &upcast(model_output)?,
            &x,
            Vp::from_sigma(sigma),
        )?;
        self.model_outputs.push(x0.clone());

        let z = match self.algorithm {
            Algorithm::Sde => Some(
                noise
                    .randn(model_output.dims(), DType::F32, model_output.device())?
                    .to_dtype(x.dtype())?,
            ),
            Algorithm::Ode => None,
        };
        let solver_order = self.config.solver_order;
        let order = if solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        let prev = self.update(order, i, &x, z.as_ref())?;
        if self.lower_order_nums < solver_order {
            self.lower_order_nums += 1;
        }
        self.schedule.advance();
        Ok(StepOutput {
            prev_sample: prev.to_dtype(out_dtype)?,
            pred_original_sample: Some(x0.to_dtype(out_dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        Vp::from_sigma(self.schedule.noise_sigma(timestep)?).add_noise(original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl_like() -> DpmSolverConfig {
        DpmSolverConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".to_string(),
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
            ..DpmSolverConfig::default()
        }
    }

    fn ode_config(order: usize, solver_type: &str) -> DpmSolverConfig {
        DpmSolverConfig {
            solver_order: order,
            solver_type: solver_type.into(),
            prediction_type: PredictionType::Sample,
            use_lu_lambdas: true,
            ..sdxl_like()
        }
    }

    #[test]
    fn higher_orders_solve_the_gaussian_ode_more_accurately() -> Result<()> {
        let err = |order: usize, solver: &str, steps: usize| -> Result<f64> {
            let mut s = DpmSolverMultistep::new(ode_config(order, solver))?;
            crate::schedulers::testing::gaussian_ode_error(&mut s, steps)
        };
        let (e1, e2, e2h, e3) = (
            err(1, "midpoint", 20)?,
            err(2, "midpoint", 20)?,
            err(2, "heun", 20)?,
            err(3, "midpoint", 20)?,
        );
        let (e2_40, e3_40) = (err(2, "midpoint", 40)?, err(3, "midpoint", 40)?);
        println!("order1 {e1:.3e} order2 {e2:.3e} heun {e2h:.3e} order3 {e3:.3e} | 40 steps: order2 {e2_40:.3e} order3 {e3_40:.3e}");
        assert!(e2 < e1 && e2h < e1 && e3 < e2, "{e1} {e2} {e2h} {e3}");
        assert!(
            e2_40 < e2 / 3.0 && e3_40 < e3 / 4.0,
            "{e2}->{e2_40}, {e3}->{e3_40}"
        );
        Ok(())
    }

    #[test]
    fn add_noise_uses_the_begin_index() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let mut s = DpmSolverMultistep::new(sdxl_like())?;
        s.set_timesteps(10)?;
        let (x, z) = (Tensor::new(&[1.0f64], &dev)?, Tensor::new(&[0.0f64], &dev)?);
        let t3 = s.timesteps()[3];
        let expected = Vp::from_sigma(s.schedule.sigma(3)?).alpha;
        let by_lookup = s.add_noise(&x, &z, t3)?.to_vec1::<f64>()?;
        s.set_begin_index(3);
        let by_begin = s.add_noise(&x, &z, 0.0)?.to_vec1::<f64>()?;
        assert_eq!((by_lookup[0], by_begin[0]), (expected, expected));
        Ok(())
    }

    #[test]
    fn leading_timesteps_and_final_sigma() -> Result<()> {
        let mut s = DpmSolverMultistep::new(sdxl_like())?;
        s.set_timesteps(10)?;
        assert_eq!(s.timesteps().first().copied(), Some(901.0));
        assert_eq!(s.timesteps().last().copied(), Some(91.0));
        assert_eq!(s.sigmas().map(<[f64]>::len), Some(11));
        assert_eq!(s.sigmas().and_then(|v| v.last().copied()), Some(0.0));
        Ok(())
    }

    #[test]
    fn unsupported_options_are_reported() {
        let cases = [
            DpmSolverConfig {
                algorithm_type: "dpmsolver".into(),
                ..sdxl_like()
            },
            DpmSolverConfig {
                use_beta_sigmas: true,
                ..sdxl_like()
            },
            DpmSolverConfig {
                thresholding: true,
                ..sdxl_like()
            },
            DpmSolverConfig {
                solver_order: 4,
                ..sdxl_like()
            },
        ];
        for cfg in cases {
            assert!(matches!(
                DpmSolverMultistep::new(cfg),
                Err(Error::Unsupported(_))
            ));
        }
        let both = DpmSolverConfig {
            use_karras_sigmas: true,
            use_exponential_sigmas: true,
            ..sdxl_like()
        };
        assert!(matches!(
            DpmSolverMultistep::new(both),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn lambda_clipping_shortens_the_schedule() -> Result<()> {
        let cfg = DpmSolverConfig {
            beta_schedule: "squaredcos_cap_v2".into(),
            lambda_min_clipped: Some(-5.1),
            ..DpmSolverConfig::default()
        };
        let s = DpmSolverMultistep::new(cfg)?;
        assert!(s.last_timestep() < 1000);
        Ok(())
    }
}
