//! DDIM (Song et al. 2020, <https://arxiv.org/abs/2010.02502>), as diffusers' `DDIMScheduler`,
//! and the pieces the other alpha-based schedulers (DDPM, LCM, DPM-Solver++, UniPC) share:
//! prediction and spacing enums, numpy-exact timestep arithmetic, `x₀` prediction from
//! `ᾱ_t` and `add_noise` on the training schedule.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::common;
use super::{NoiseSource, Scheduler, SchedulerConfig, StepOutput};
use crate::error::{Error, Result};

/// What the denoising model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise ε.
    Epsilon,
    /// The velocity `v = √ᾱ ε − √(1−ᾱ) x₀` (Salimans & Ho 2022).
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

/// How inference timesteps are spread over the training timesteps (`timestep_spacing`,
/// Table 2 of <https://arxiv.org/abs/2305.08891>).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly spaced from 0 to `num_train_timesteps - 1`, rounded.
    Linspace,
    /// Multiples of the step ratio, plus `steps_offset`.
    Leading,
    /// Counted down from `num_train_timesteps`, minus one.
    Trailing,
}

/// `DDIMScheduler`'s `config.json`, field for field, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
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
    /// Clip the predicted x₀ to `±clip_sample_range`.
    pub clip_sample: bool,
    /// Use ᾱ = 1 past the last step (otherwise ᾱ of timestep 0).
    pub set_alpha_to_one: bool,
    /// Offset added to `leading` timesteps.
    pub steps_offset: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding (Imagen); not supported here.
    pub thresholding: bool,
    /// Quantile for dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Clip range used when `clip_sample` is set.
    pub clip_sample_range: f64,
    /// Upper bound for dynamic thresholding.
    pub sample_max_value: f64,
    /// How timesteps are spread.
    pub timestep_spacing: TimestepSpacing,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Denoising diffusion implicit models: diffusers' `DDIMScheduler`.
///
/// Deterministic with the default `eta = 0`; `eta > 0` adds noise drawn from the
/// [`NoiseSource`] (`eta = 1` is DDPM-like). DDIM locates each step by its timestep value, so
/// [`Scheduler::set_begin_index`] has nothing to do.
#[derive(Debug, Clone)]
pub struct Ddim {
    config: DdimConfig,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    eta: f64,
    use_clipped_model_output: bool,
}

impl Ddim {
    /// Builds the scheduler from a scheduler config (unknown keys ignored).
    ///
    /// # Errors
    /// See [`Ddim::new`]; also a known key with a value of the wrong type.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?)
    }

    /// Builds the scheduler from its typed config.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for thresholding or an unknown beta schedule;
    /// [`Error::InvalidArgument`] for zero training timesteps.
    pub fn new(config: DdimConfig) -> Result<Self> {
        reject_thresholding(config.thresholding)?;
        let betas = common::betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
        )?;
        let alphas_cumprod = train_alphas_cumprod(&betas, config.rescale_betas_zero_snr)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alpha_at(&alphas_cumprod, 0)?
        };
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            num_inference_steps: None,
            eta: 0.0,
            use_clipped_model_output: false,
        })
    }

    /// The typed config this scheduler was built from.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// Sets η, the weight of the noise added per step (`step(eta=...)` in diffusers).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `eta` is negative or not finite.
    pub fn set_eta(&mut self, eta: f64) -> Result<()> {
        if !eta.is_finite() || eta < 0.0 {
            return Err(Error::invalid(format!(
                "DDIM eta must be a finite value >= 0, got {eta}"
            )));
        }
        self.eta = eta;
        Ok(())
    }

    /// Re-derives ε from the clipped x₀ before stepping (`use_clipped_model_output`).
    pub fn set_use_clipped_model_output(&mut self, on: bool) {
        self.use_clipped_model_output = on;
    }

    fn alpha_prev(&self, prev_timestep: i64) -> Result<f64> {
        match usize::try_from(prev_timestep) {
            Ok(p) => alpha_at(&self.alphas_cumprod, p),
            Err(_) => Ok(self.final_alpha_cumprod),
        }
    }
}

impl Scheduler for Ddim {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        check_step_count(num_inference_steps, train)?;
        self.timesteps = spaced_timesteps(
            self.config.timestep_spacing,
            train,
            num_inference_steps,
            self.config.steps_offset,
        )
        .into_iter()
        .map(|t| t as f64)
        .collect();
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn set_begin_index(&mut self, _begin_index: usize) {}

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
        let n = self.num_inference_steps.ok_or_else(not_set)?;
        let t = timestep_index(timestep)?;
        let ratio = (self.config.num_train_timesteps / n) as i64;
        let prev_t = t as i64 - ratio;
        let a_t = alpha_at(&self.alphas_cumprod, t)?;
        let a_prev = self.alpha_prev(prev_t)?;
        let b_t = 1.0 - a_t;

        let out_dtype = model_output.dtype();
        let mo = upcast(model_output)?;
        let x = upcast(sample)?;
        let (x0, mut eps) = match self.config.prediction_type {
            PredictionType::Epsilon => (
                lincomb(&[(1.0 / a_t.sqrt(), &x), (-b_t.sqrt() / a_t.sqrt(), &mo)])?,
                mo.clone(),
            ),
            PredictionType::Sample => (
                mo.clone(),
                lincomb(&[(1.0 / b_t.sqrt(), &x), (-a_t.sqrt() / b_t.sqrt(), &mo)])?,
            ),
            PredictionType::VPrediction => (
                lincomb(&[(a_t.sqrt(), &x), (-b_t.sqrt(), &mo)])?,
                lincomb(&[(a_t.sqrt(), &mo), (b_t.sqrt(), &x)])?,
            ),
        };
        let x0 = clip(x0, self.config.clip_sample, self.config.clip_sample_range)?;

        let variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev);
        let std_dev = self.eta * variance.sqrt();
        if self.use_clipped_model_output {
            eps = lincomb(&[(1.0 / b_t.sqrt(), &x), (-a_t.sqrt() / b_t.sqrt(), &x0)])?;
        }
        let direction = (1.0 - a_prev - std_dev * std_dev).sqrt();
        let mut prev = lincomb(&[(a_prev.sqrt(), &x0), (direction, &eps)])?;
        if self.eta > 0.0 {
            let z = noise.randn(model_output.dims(), out_dtype, model_output.device())?;
            prev = (prev + upcast(&z)?.affine(std_dev, 0.0)?)?;
        }
        Ok(StepOutput {
            prev_sample: prev.to_dtype(out_dtype)?,
            pred_original_sample: Some(x0.to_dtype(out_dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_alpha(&self.alphas_cumprod, original, noise, timestep)
    }
}

/// [`Error::Unsupported`] when dynamic thresholding is requested.
pub(crate) fn reject_thresholding(thresholding: bool) -> Result<()> {
    if thresholding {
        return Err(Error::unsupported(
            "dynamic thresholding (`thresholding: true`) is not implemented",
        ));
    }
    Ok(())
}

/// The error for stepping before `set_timesteps`.
pub(crate) fn not_set() -> Error {
    Error::invalid("set_timesteps must be called before step")
}

/// Checks a step count against the training timesteps.
pub(crate) fn check_step_count(
    num_inference_steps: usize,
    num_train_timesteps: usize,
) -> Result<()> {
    if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
        return Err(Error::invalid(format!(
            "num_inference_steps must be between 1 and num_train_timesteps ({num_train_timesteps}), got {num_inference_steps}"
        )));
    }
    Ok(())
}

/// `cumprod(1 - betas)` in float32, after the optional zero-terminal-SNR rescaling.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty schedule.
pub(crate) fn train_alphas_cumprod(betas: &[f64], rescale_zero_snr: bool) -> Result<Vec<f64>> {
    if betas.is_empty() {
        return Err(Error::invalid("num_train_timesteps must be at least 1"));
    }
    Ok(if rescale_zero_snr {
        common::alphas_cumprod(&common::rescale_zero_terminal_snr(betas))
    } else {
        common::alphas_cumprod(betas)
    })
}

/// ᾱ at an integer training timestep.
pub(crate) fn alpha_at(alphas_cumprod: &[f64], t: usize) -> Result<f64> {
    alphas_cumprod.get(t).copied().ok_or_else(|| {
        Error::invalid(format!(
            "timestep {t} is outside the {} training timesteps",
            alphas_cumprod.len()
        ))
    })
}

/// A timestep as an index into the training schedule: a non-negative integer.
pub(crate) fn timestep_index(timestep: f64) -> Result<usize> {
    if timestep.is_finite() && timestep >= 0.0 && timestep.fract() == 0.0 {
        Ok(timestep as usize)
    } else {
        Err(Error::invalid(format!(
            "timestep {timestep} is not an integer training timestep"
        )))
    }
}

/// `np.round`: halves go to the even neighbour.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, num)` (endpoint included), element by element.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    (0..num)
        .map(|i| {
            if i + 1 == num {
                stop
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

/// `np.arange(start, stop, step)` for floats: `ceil((stop - start) / step)` values
/// `start + i * step`.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if !(len.is_finite() && len > 0.0) {
        return Vec::new();
    }
    (0..len as usize).map(|i| start + i as f64 * step).collect()
}

/// The `num` inference timesteps of DDIM/DDPM (descending).
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    num: usize,
    steps_offset: usize,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, num)
            .into_iter()
            .rev()
            .map(|t| np_round(t) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (num_train / num) as i64;
            (0..num as i64)
                .rev()
                .map(|i| i * ratio + steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / num as f64;
            np_arange(num_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect()
        }
    }
}

/// The dtype stepping arithmetic runs in: half types are widened to f32.
pub(crate) fn work_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// The tensor in [`work_dtype`].
pub(crate) fn upcast(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(work_dtype(t.dtype()))?)
}

/// `Σ cᵢ·tᵢ` over same-shaped tensors.
pub(crate) fn lincomb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut iter = terms.iter();
    let Some((c, t)) = iter.next() else {
        return Err(Error::invalid("empty linear combination"));
    };
    let mut acc = t.affine(*c, 0.0)?;
    for (c, t) in iter {
        acc = (acc + t.affine(*c, 0.0)?)?;
    }
    Ok(acc)
}

/// Clamps the predicted x₀ to `±range` when `on`.
pub(crate) fn clip(x0: Tensor, on: bool, range: f64) -> Result<Tensor> {
    if on {
        Ok(x0.clamp(-range, range)?)
    } else {
        Ok(x0)
    }
}

/// The x₀ prediction from a model output at cumulative alpha `alpha_prod_t`.
pub(crate) fn predict_x0(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f64,
) -> Result<Tensor> {
    let (sa, sb) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
    match prediction_type {
        PredictionType::Epsilon => lincomb(&[(1.0 / sa, sample), (-sb / sa, model_output)]),
        PredictionType::Sample => Ok(model_output.clone()),
        PredictionType::VPrediction => lincomb(&[(sa, sample), (-sb, model_output)]),
    }
}

/// `√ᾱ_t x + √(1−ᾱ_t) ε` (diffusers' `add_noise` for DDIM, DDPM and LCM).
pub(crate) fn add_noise_alpha(
    alphas_cumprod: &[f64],
    original: &Tensor,
    noise: &Tensor,
    timestep: f64,
) -> Result<Tensor> {
    let a = alpha_at(alphas_cumprod, timestep_index(timestep)?)?;
    let noise = noise.to_dtype(original.dtype())?;
    lincomb(&[(a.sqrt(), original), ((1.0 - a).sqrt(), &noise)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    struct NoNoise;
    impl NoiseSource for NoNoise {
        fn randn(&mut self, _: &[usize], _: DType, _: &Device) -> Result<Tensor> {
            Err(Error::invalid("deterministic scheduler drew noise"))
        }
    }

    #[test]
    fn numpy_rounding_and_ranges() {
        assert_eq!(np_round(937.5), 938.0);
        assert_eq!(np_round(812.5), 812.0);
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_arange(10.0, 0.0, -2.5), vec![10.0, 7.5, 5.0, 2.5]);
        assert!(np_arange(0.0, 10.0, -1.0).is_empty());
    }

    #[test]
    fn spacing_matches_diffusers() {
        use TimestepSpacing::*;
        assert_eq!(
            spaced_timesteps(Leading, 1000, 4, 1),
            vec![751, 501, 251, 1]
        );
        assert_eq!(
            spaced_timesteps(Trailing, 1000, 4, 1),
            vec![999, 749, 499, 249]
        );
        // 1000 / 16 = 62.5: numpy rounds half to even.
        let t = spaced_timesteps(Trailing, 1000, 16, 0);
        assert_eq!(&t[..4], &[999, 937, 874, 811]);
        assert_eq!(
            spaced_timesteps(Linspace, 1000, 4, 0),
            vec![999, 666, 333, 0]
        );
    }

    #[test]
    fn invalid_step_counts() -> Result<()> {
        let mut s = Ddim::new(DdimConfig::default())?;
        assert!(matches!(s.set_timesteps(0), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            s.set_timesteps(1001),
            Err(Error::InvalidArgument(_))
        ));
        assert!(s.set_eta(-1.0).is_err());
        Ok(())
    }

    #[test]
    fn clean_sample_is_a_fixed_point_of_sample_prediction() -> Result<()> {
        let cfg = DdimConfig {
            prediction_type: PredictionType::Sample,
            clip_sample: false,
            ..DdimConfig::default()
        };
        let mut s = Ddim::new(cfg)?;
        s.set_timesteps(5)?;
        let x0 = Tensor::new(&[0.5f32, -0.25], &Device::Cpu)?;
        let t = s.timesteps().last().copied().unwrap_or(0.0);
        let noisy = s.add_noise(&x0, &Tensor::new(&[0.1f32, 0.2], &Device::Cpu)?, t)?;
        let out = s.step(&x0, t, &noisy, &mut NoNoise)?;
        // set_alpha_to_one: the last step lands exactly on the predicted x0.
        let got = out.prev_sample.to_vec1::<f32>()?;
        assert!((got[0] - 0.5).abs() < 1e-6 && (got[1] + 0.25).abs() < 1e-6);
        Ok(())
    }
}
