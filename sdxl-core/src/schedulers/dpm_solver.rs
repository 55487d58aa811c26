//! DPM-Solver++ (Lu et al. 2022, <https://arxiv.org/abs/2211.01095>), as diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type` `dpmsolver++` (ODE) or
//! `sde-dpmsolver++` (SDE, fresh noise every step), orders 1–3; plus the VP-sigma pieces shared
//! with UniPC (sigma schedules, step cursor, sigma-based `add_noise`).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::common;
use super::ddim::{
    check_step_count, lincomb, not_set, np_arange, np_linspace, np_round, reject_thresholding,
    train_alphas_cumprod, upcast, PredictionType, TimestepSpacing,
};
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
    /// Final sigma: `zero` or `sigma_min`.
    pub final_sigmas_type: String,
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
            final_sigmas_type: "zero".to_string(),
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

/// How inference sigmas are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SigmaSpacing {
    /// The training sigmas at the spaced timesteps.
    Timesteps,
    /// Karras et al. (2022), ρ = 7.
    Karras,
    /// Log-linear between the extreme sigmas.
    Exponential,
    /// Linear in log σ (DPM-Solver's λ spacing); DPM-Solver only.
    LuLambdas,
}

impl SigmaSpacing {
    /// The spacing selected by the `use_*_sigmas` flags.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for beta or flow sigmas, [`Error::InvalidArgument`] when more
    /// than one of Karras/exponential/beta is set.
    pub(crate) fn from_flags(
        karras: bool,
        exponential: bool,
        beta: bool,
        lu: bool,
        flow: bool,
    ) -> Result<Self> {
        if [karras, exponential, beta].iter().filter(|&&f| f).count() > 1 {
            return Err(Error::invalid(
                "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set",
            ));
        }
        if beta || flow {
            return Err(Error::unsupported(
                "use_beta_sigmas / use_flow_sigmas are not implemented",
            ));
        }
        Ok(if karras {
            Self::Karras
        } else if lu {
            Self::LuLambdas
        } else if exponential {
            Self::Exponential
        } else {
            Self::Timesteps
        })
    }
}

/// The final sigma (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinalSigma {
    /// Step to σ = 0.
    Zero,
    /// Step to the smallest sigma.
    SigmaMin,
}

impl FinalSigma {
    /// Parses `zero` / `sigma_min`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for any other value.
    pub(crate) fn parse(value: &str) -> Result<Self> {
        match value {
            "zero" => Ok(Self::Zero),
            "sigma_min" => Ok(Self::SigmaMin),
            other => Err(Error::unsupported(format!(
                "final_sigmas_type `{other}` (expected zero or sigma_min)"
            ))),
        }
    }
}

/// Which step of the schedule comes next, as diffusers' `_step_index`/`_begin_index`.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepCursor {
    begin_index: Option<usize>,
    step_index: Option<usize>,
}

impl StepCursor {
    /// Forgets both indices (after `set_timesteps`).
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }

    /// Starts the next run at `begin_index`.
    pub(crate) fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = Some(begin_index);
    }

    /// The current step index, initialised on first use from the begin index or by looking
    /// `timestep` up in `timesteps`.
    pub(crate) fn index(&mut self, timesteps: &[f64], timestep: f64) -> usize {
        *self.step_index.get_or_insert_with(|| {
            self.begin_index
                .unwrap_or_else(|| index_for_timestep(timesteps, timestep))
        })
    }

    /// Moves to the next step.
    pub(crate) fn advance(&mut self) {
        if let Some(i) = self.step_index.as_mut() {
            *i += 1;
        }
    }

    /// The step index `add_noise` uses: the lookup without a begin index, else the current
    /// step (inpainting) or the begin index (img2img).
    pub(crate) fn noise_index(&self, timesteps: &[f64], timestep: f64) -> usize {
        match (self.begin_index, self.step_index) {
            (None, _) => index_for_timestep(timesteps, timestep),
            (Some(_), Some(step)) => step,
            (Some(begin), None) => begin,
        }
    }
}

/// diffusers' `index_for_timestep`: the second match when the timestep repeats (so a run that
/// starts mid-schedule does not skip a sigma), the last index when it is absent.
pub(crate) fn index_for_timestep(timesteps: &[f64], timestep: f64) -> usize {
    let mut matches = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i);
    match (matches.next(), matches.next()) {
        (Some(_), Some(second)) => second,
        (Some(first), None) => first,
        _ => timesteps.len().saturating_sub(1),
    }
}

/// The VP training sigmas `√((1−ᾱ)/ᾱ)`, in float32 as diffusers computes them.
pub(crate) fn vp_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            f64::from(((1.0 - a) / a).sqrt())
        })
        .collect()
}

/// `(α_t, σ_t)` of a VP sigma: `α = 1/√(σ²+1)`, `σ_t = σ α`.
pub(crate) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// The half-log-SNR `λ = log α − log σ_t` of a VP sigma (+∞ at σ = 0).
pub(crate) fn lambda(sigma: f64) -> f64 {
    let (alpha, sigma_t) = alpha_sigma(sigma);
    alpha.ln() - sigma_t.ln()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating in
/// log-sigma.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of the cumulative count of log_sigmas below log_sigma (first maximum).
    let (mut count, mut best, mut low) = (0usize, 0usize, 0usize);
    for (i, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low = i;
        }
    }
    let low = low.min(log_sigmas.len().saturating_sub(2));
    let (lo, hi) = match (log_sigmas.get(low), log_sigmas.get(low + 1)) {
        (Some(&lo), Some(&hi)) => (lo, hi),
        _ => return 0.0,
    };
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The `n` inference timesteps of the multistep solvers (DPM-Solver, UniPC), descending:
/// spaced over `[0, last_timestep)`.
pub(crate) fn multistep_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    last_timestep: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<i64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                .into_iter()
                .rev()
                .map(|t| np_round(t) as i64)
                .collect();
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = (last_timestep / (n + 1)) as i64;
            (1..=n as i64)
                .rev()
                .map(|i| i * ratio + steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / n as f64;
            np_arange(last_timestep as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect()
        }
    }
}

/// The inference sigmas (without the final one) and timesteps for a sigma spacing.
///
/// `round_karras` rounds the Karras/Lu timesteps (diffusers' DPM-Solver skips this for the
/// cosine schedule); other fractional timesteps are truncated, as `astype(int64)` does.
pub(crate) fn spaced_sigmas(
    spacing: SigmaSpacing,
    train_sigmas: &[f64],
    timesteps: Vec<i64>,
    n: usize,
    sigma_range: (Option<f64>, Option<f64>),
    round_karras: bool,
) -> (Vec<f64>, Vec<i64>) {
    let log_sigmas: Vec<f64> = train_sigmas
        .iter()
        .map(|&s| f64::from((s as f32).ln()))
        .collect();
    let first = train_sigmas.first().copied().unwrap_or(0.0);
    let last = train_sigmas.last().copied().unwrap_or(0.0);
    let sigma_min = sigma_range.0.unwrap_or(first);
    let sigma_max = sigma_range.1.unwrap_or(last);
    let to_timesteps = |sigmas: &[f64], round: bool| -> Vec<i64> {
        sigmas
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &log_sigmas);
                (if round { np_round(t) } else { t }) as i64
            })
            .collect()
    };
    match spacing {
        SigmaSpacing::Timesteps => {
            let sigmas = timesteps
                .iter()
                .map(|&t| {
                    let i = usize::try_from(t).unwrap_or(0);
                    train_sigmas.get(i).copied().unwrap_or(last)
                })
                .collect();
            (sigmas, timesteps)
        }
        SigmaSpacing::Karras => {
            let sigmas = common::karras_sigmas(sigma_min, sigma_max, n);
            let ts = to_timesteps(&sigmas, round_karras);
            (sigmas, ts)
        }
        SigmaSpacing::Exponential => {
            let sigmas: Vec<f64> = np_linspace(sigma_max.ln(), sigma_min.ln(), n)
                .into_iter()
                .map(f64::exp)
                .collect();
            let ts = to_timesteps(&sigmas, false);
            (sigmas, ts)
        }
        SigmaSpacing::LuLambdas => {
            let lambda_min = log_sigmas.first().copied().unwrap_or(0.0);
            let lambda_max = log_sigmas.last().copied().unwrap_or(0.0);
            let sigmas: Vec<f64> = np_linspace(0.0, 1.0, n)
                .into_iter()
                .map(|r| (lambda_max + r * (lambda_min - lambda_max)).exp())
                .collect();
            let ts = to_timesteps(&sigmas, round_karras);
            (sigmas, ts)
        }
    }
}

/// `α_t x + σ_t ε` at the sigma of the cursor's step (diffusers' sigma-based `add_noise`).
pub(crate) fn add_noise_sigma(
    sigmas: &[f64],
    timesteps: &[f64],
    cursor: &StepCursor,
    original: &Tensor,
    noise: &Tensor,
    timestep: f64,
) -> Result<Tensor> {
    let i = cursor.noise_index(timesteps, timestep);
    let sigma = sigma_at(sigmas, i)?;
    let (alpha, sigma_t) = alpha_sigma(sigma);
    let noise = noise.to_dtype(original.dtype())?;
    lincomb(&[(alpha, original), (sigma_t, &noise)])
}

/// The sigma at step `i`.
pub(crate) fn sigma_at(sigmas: &[f64], i: usize) -> Result<f64> {
    sigmas.get(i).copied().ok_or_else(|| {
        Error::invalid(format!(
            "step {i} is past the end of the {}-step schedule",
            sigmas.len().saturating_sub(1)
        ))
    })
}

/// Shifts a model-output history left and appends `latest` (diffusers' `model_outputs`).
pub(crate) fn push_history(history: &mut [Option<Tensor>], latest: Tensor) {
    history.rotate_left(1);
    if let Some(slot) = history.last_mut() {
        *slot = Some(latest);
    }
}

/// The `back`-th most recent entry of a history (0 = latest).
pub(crate) fn history_at(history: &[Option<Tensor>], back: usize) -> Result<&Tensor> {
    history
        .len()
        .checked_sub(back + 1)
        .and_then(|i| history.get(i))
        .and_then(Option::as_ref)
        .ok_or_else(|| Error::invalid("multistep history is shorter than the solver order"))
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
    final_sigma: FinalSigma,
    alphas_cumprod: Vec<f64>,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    cursor: StepCursor,
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
        let spacing = SigmaSpacing::from_flags(
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
            config.use_lu_lambdas,
            config.use_flow_sigmas,
        )?;
        let final_sigma = FinalSigma::parse(&config.final_sigmas_type)?;
        let betas = common::betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
        )?;
        let mut alphas_cumprod = train_alphas_cumprod(&betas, config.rescale_betas_zero_snr)?;
        if config.rescale_betas_zero_snr {
            // Close to 0 without being 0, so the first sigma is finite (fp16's smallest subnormal).
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f64.powi(-24);
            }
        }
        let train_sigmas = vp_sigmas(&alphas_cumprod);
        Ok(Self {
            model_outputs: vec![None; config.solver_order],
            config,
            algorithm,
            heun,
            spacing,
            final_sigma,
            alphas_cumprod,
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            lower_order_nums: 0,
            cursor: StepCursor::default(),
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

    /// The data prediction x₀ from the model output at step sigma `sigma`.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        let (alpha, sigma_t) = alpha_sigma(sigma);
        match self.config.prediction_type {
            PredictionType::Epsilon => {
                lincomb(&[(1.0 / alpha, sample), (-sigma_t / alpha, model_output)])
            }
            PredictionType::Sample => Ok(model_output.clone()),
            PredictionType::VPrediction => lincomb(&[(alpha, sample), (-sigma_t, model_output)]),
        }
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
            let sigma = sigma_at(&self.sigmas, k)?;
            let (a, st) = alpha_sigma(sigma);
            Ok((a, st, lambda(sigma)))
        };
        let back = |n: usize| {
            i.checked_sub(n)
                .ok_or_else(|| Error::invalid("solver history underflow"))
        };
        let (alpha_t, sigma_t, lambda_t) = s(i + 1)?;
        let (_, sigma_s0, lambda_s0) = s(i)?;
        let h = lambda_t - lambda_s0;
        let m0 = history_at(&self.model_outputs, 0)?;
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
                let m1 = history_at(&self.model_outputs, 1)?;
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
                let m1 = history_at(&self.model_outputs, 1)?;
                let m2 = history_at(&self.model_outputs, 2)?;
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
        let train = self.config.num_train_timesteps;
        check_step_count(num_inference_steps, train)?;
        let spaced = multistep_timesteps(
            self.config.timestep_spacing,
            train,
            self.last_timestep(),
            num_inference_steps,
            self.config.steps_offset,
        );
        let (mut sigmas, timesteps) = spaced_sigmas(
            self.spacing,
            &self.train_sigmas,
            spaced,
            num_inference_steps,
            (self.config.sigma_min, self.config.sigma_max),
            self.config.beta_schedule != "squaredcos_cap_v2",
        );
        sigmas.push(match self.final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => self.train_sigmas.first().copied().unwrap_or(0.0),
        });
        self.sigmas = sigmas.into_iter().map(common::f32_round).collect();
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.cursor.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.cursor.set_begin_index(begin_index);
    }

    fn scale_model_input(&mut self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        if self.timesteps.is_empty() {
            return Err(not_set());
        }
        let i = self.cursor.index(&self.timesteps, timestep);
        let n = self.timesteps.len();
        let short = self.config.lower_order_final && n < 15;
        let lower_order_final = i + 1 == n
            && (self.config.euler_at_final || short || self.final_sigma == FinalSigma::Zero);
        let lower_order_second = i + 2 == n && short;

        let out_dtype = model_output.dtype();
        let x = upcast(sample)?;
        let x0 = self.convert(&upcast(model_output)?, &x, sigma_at(&self.sigmas, i)?)?;
        push_history(&mut self.model_outputs, x0.clone());

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
        self.cursor.advance();
        Ok(StepOutput {
            prev_sample: prev.to_dtype(out_dtype)?,
            pred_original_sample: Some(x0.to_dtype(out_dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_sigma(
            &self.sigmas,
            &self.timesteps,
            &self.cursor,
            original,
            noise,
            timestep,
        )
    }
}

/// Test support shared with UniPC: a probability-flow ODE with a known solution.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Device, Tensor};

    use super::alpha_sigma;
    use crate::error::{Error, Result};
    use crate::schedulers::{NoiseSource, Scheduler};

    /// A noise source for deterministic samplers: any draw is an error.
    pub(crate) struct NoNoise;

    impl NoiseSource for NoNoise {
        fn randn(&mut self, _: &[usize], _: DType, _: &Device) -> Result<Tensor> {
            Err(Error::invalid("a deterministic sampler drew noise"))
        }
    }

    /// Samples 1-D Gaussian data N(0, s²) with its exact denoiser E[x₀|x_t] (the scheduler must
    /// use `prediction_type: sample`) up to the last timestep, skipping the final first-order
    /// jump to σ = 0, and returns the largest error there against the exact ODE solution:
    /// `x_t / √(α²s² + σ_t²)` is constant along the flow.
    pub(crate) fn gaussian_ode_error(sched: &mut dyn Scheduler, steps: usize) -> Result<f64> {
        let s2 = 0.25;
        let z = [1.3f64, -0.7, 0.2, 2.1];
        sched.set_timesteps(steps)?;
        sched.set_begin_index(0);
        let sigmas = sched.sigmas().map(<[f64]>::to_vec).unwrap_or_default();
        let timesteps = sched.timesteps().to_vec();
        let (a, st) = alpha_sigma(sigmas.first().copied().unwrap_or(0.0));
        let scale = (a * a * s2 + st * st).sqrt();
        let mut x = Tensor::new(&z.map(|v| v * scale), &Device::Cpu)?;
        let last = timesteps.len().saturating_sub(1);
        for (i, &t) in timesteps.iter().enumerate().take(last) {
            let (a, st) = alpha_sigma(sigmas.get(i).copied().unwrap_or(0.0));
            let x0 = x.affine(a * s2 / (a * a * s2 + st * st), 0.0)?;
            x = sched.step(&x0, t, &x, &mut NoNoise)?.prev_sample;
        }
        let (a, st) = alpha_sigma(sigmas.get(last).copied().unwrap_or(0.0));
        let scale = (a * a * s2 + st * st).sqrt();
        let exact = Tensor::new(&z.map(|v| v * scale), &Device::Cpu)?;
        Ok((x - exact)?.abs()?.max(0)?.to_scalar::<f64>()?)
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
            testing::gaussian_ode_error(&mut s, steps)
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
        let expected = alpha_sigma(s.sigmas[3]).0;
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
    fn step_index_lookup_prefers_the_second_match() {
        assert_eq!(index_for_timestep(&[9.0, 5.0, 5.0, 1.0], 5.0), 2);
        assert_eq!(index_for_timestep(&[9.0, 5.0, 1.0], 5.0), 1);
        assert_eq!(index_for_timestep(&[9.0, 5.0, 1.0], 7.0), 2);
    }

    #[test]
    fn sigma_to_t_inverts_the_training_sigmas() -> Result<()> {
        let s = DpmSolverMultistep::new(sdxl_like())?;
        let logs: Vec<f64> = s
            .train_sigmas
            .iter()
            .map(|&x| f64::from((x as f32).ln()))
            .collect();
        for t in [0usize, 1, 500, 998, 999] {
            let got = sigma_to_t(s.train_sigmas[t], &logs);
            assert!((got - t as f64).abs() < 1e-3, "t {t}: {got}");
        }
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
