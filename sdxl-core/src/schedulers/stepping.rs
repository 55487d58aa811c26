//! Bookkeeping across steps: which entry of the schedule a step is at (diffusers' `_step_index`,
//! `_begin_index`, `index_for_timestep`), the schedule every scheduler holds, and the
//! model-output history of the multistep solvers.

use candle_core::Tensor;

use super::sigmas::{k_init_noise_sigma, scale_by_sigma};
use super::spacing::TimestepSpacing;
use crate::error::{Error, Result};

/// The error for stepping before `set_timesteps`.
pub(crate) fn not_set() -> Error {
    Error::invalid("set_timesteps must be called before step")
}

/// `values[index]`, or an error naming `what` when the schedule has no such entry.
///
/// # Errors
/// [`Error::InvalidArgument`] when `index` is past the end.
pub(crate) fn value_at(values: &[f64], index: usize, what: &str) -> Result<f64> {
    values.get(index).copied().ok_or_else(|| {
        Error::invalid(format!(
            "{what} index {index} is outside the schedule ({} entries); was set_timesteps called?",
            values.len()
        ))
    })
}

/// diffusers' `index_for_timestep`: the position of `timestep` in `timesteps`, taking the second
/// match when the value occurs more than once (so that a schedule entered mid-way does not skip a
/// sigma); `None` when it is absent.
pub(crate) fn index_for_timestep(timesteps: &[f64], timestep: f64) -> Option<usize> {
    let mut matches = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i);
    let first = matches.next()?;
    Some(matches.next().unwrap_or(first))
}

/// What looking up a timestep that is not in the schedule gives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum MissingTimestep {
    /// An error (diffusers' k-diffusion families and LCM raise).
    #[default]
    Error,
    /// The last step (diffusers' multistep solvers, DPM-Solver++ and UniPC).
    LastStep,
}

impl MissingTimestep {
    /// The index of `timestep` in `timesteps` under this policy.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an absent timestep under [`MissingTimestep::Error`].
    fn lookup(self, timesteps: &[f64], timestep: f64) -> Result<usize> {
        match (index_for_timestep(timesteps, timestep), self) {
            (Some(i), _) => Ok(i),
            (None, Self::LastStep) => Ok(timesteps.len().saturating_sub(1)),
            (None, Self::Error) => Err(Error::invalid(format!(
                "timestep {timestep} is not in the schedule"
            ))),
        }
    }
}

/// Step-index bookkeeping (diffusers' `_step_index`, `_begin_index`, `_init_step_index`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StepCursor {
    step: Option<usize>,
    begin: Option<usize>,
    missing: MissingTimestep,
}

impl StepCursor {
    /// A cursor whose lookups treat absent timesteps as `missing` says.
    pub(crate) fn new(missing: MissingTimestep) -> Self {
        Self {
            missing,
            ..Self::default()
        }
    }

    /// Forgets the step and begin indices (what `set_timesteps` does).
    pub(crate) fn reset(&mut self) {
        *self = Self::new(self.missing);
    }

    /// Sets the index the first step starts from.
    pub(crate) fn set_begin(&mut self, begin_index: usize) {
        self.begin = Some(begin_index);
    }

    /// The current step index, initialised on first use from the begin index or, when none was
    /// set, from the position of `timestep` in `timesteps`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the lookup fails or every timestep has already been
    /// stepped.
    pub(crate) fn current(&mut self, timesteps: &[f64], timestep: f64) -> Result<usize> {
        let index = match (self.step, self.begin) {
            (Some(s), _) => s,
            (None, Some(b)) => b,
            (None, None) => self.missing.lookup(timesteps, timestep)?,
        };
        if index >= timesteps.len() {
            return Err(Error::invalid(format!(
                "step index {index} is past the last of {} timesteps",
                timesteps.len()
            )));
        }
        self.step = Some(index);
        Ok(index)
    }

    /// Moves to the next timestep (after a step).
    pub(crate) fn advance(&mut self) {
        if let Some(s) = self.step.as_mut() {
            *s += 1;
        }
    }

    /// The index `add_noise` uses: by timestep when no begin index was set, else the current
    /// step (inpainting, after the first step) or the begin index (img2img, before it).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a lookup by timestep fails.
    pub(crate) fn noise_index(&self, timesteps: &[f64], timestep: f64) -> Result<usize> {
        match (self.begin, self.step) {
            (None, _) => self.missing.lookup(timesteps, timestep),
            (Some(_), Some(s)) => Ok(s),
            (Some(b), None) => Ok(b),
        }
    }
}

/// How a family prepares the model input and the initial noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputScaling {
    /// The sample goes to the model unchanged and the initial noise has unit variance
    /// (the variance-preserving families).
    Identity,
    /// The k-diffusion families: the sample is divided by `√(σ² + 1)` and the initial noise
    /// scaled by [`k_init_noise_sigma`] for this timestep spacing.
    KDiffusion(TimestepSpacing),
}

/// The schedule a scheduler steps through: its timesteps, its sigmas (the final one included)
/// where it is sigma-based, and the step cursor (diffusers' `_step_index`, `_begin_index`).
///
/// Every family holds one; [`Scheduler`](super::Scheduler)'s provided methods read it.
#[derive(Debug, Clone)]
pub struct StepSchedule {
    timesteps: Vec<f64>,
    sigmas: Option<Vec<f64>>,
    cursor: StepCursor,
    scaling: InputScaling,
}

impl StepSchedule {
    /// An empty schedule of a k-diffusion family (Euler, Euler ancestral, Heun, KDPM2, LMS)
    /// configured with `spacing`: absent timesteps are errors, inputs are scaled by σ.
    pub(crate) fn k_diffusion(spacing: TimestepSpacing) -> Self {
        Self::with(
            Some(Vec::new()),
            MissingTimestep::Error,
            InputScaling::KDiffusion(spacing),
        )
    }

    /// An empty schedule of a multistep solver (DPM-Solver++, UniPC): sigma-based, absent
    /// timesteps are the last step, inputs unscaled.
    pub(crate) fn multistep() -> Self {
        Self::with(
            Some(Vec::new()),
            MissingTimestep::LastStep,
            InputScaling::Identity,
        )
    }

    /// An empty schedule of a family indexed by ᾱ (DDIM, DDPM, LCM): no sigmas, absent
    /// timesteps are errors, inputs unscaled.
    pub(crate) fn alpha() -> Self {
        Self::with(None, MissingTimestep::Error, InputScaling::Identity)
    }

    fn with(sigmas: Option<Vec<f64>>, missing: MissingTimestep, scaling: InputScaling) -> Self {
        Self {
            timesteps: Vec::new(),
            sigmas,
            cursor: StepCursor::new(missing),
            scaling,
        }
    }

    /// Replaces the timesteps and sigmas and resets the cursor.
    pub(crate) fn set(&mut self, timesteps: Vec<f64>, sigmas: Vec<f64>) {
        self.sigmas = Some(sigmas);
        self.set_timesteps(timesteps);
    }

    /// Replaces the timesteps (keeping the sigmas) and resets the cursor.
    pub(crate) fn set_timesteps(&mut self, timesteps: Vec<f64>) {
        self.timesteps = timesteps;
        self.cursor.reset();
    }

    /// The timesteps.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The sigmas, the final one included; `None` for the families indexed by ᾱ.
    pub fn sigmas(&self) -> Option<&[f64]> {
        self.sigmas.as_deref()
    }

    /// The number of timesteps, or the error for stepping before `set_timesteps`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when there are no timesteps.
    pub(crate) fn step_count(&self) -> Result<usize> {
        match self.timesteps.len() {
            0 => Err(not_set()),
            n => Ok(n),
        }
    }

    /// The sigma at index `i`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `i` is past the end.
    pub(crate) fn sigma(&self, i: usize) -> Result<f64> {
        value_at(self.sigmas().unwrap_or_default(), i, "sigma")
    }

    /// Starts stepping at `begin_index`.
    pub(crate) fn set_begin_index(&mut self, begin_index: usize) {
        self.cursor.set_begin(begin_index);
    }

    /// The index of the current step ([`StepCursor::current`]).
    ///
    /// # Errors
    /// As [`StepCursor::current`].
    pub(crate) fn step_index(&mut self, timestep: f64) -> Result<usize> {
        self.cursor.current(&self.timesteps, timestep)
    }

    /// The index and sigma of the current step.
    ///
    /// # Errors
    /// As [`StepCursor::current`].
    pub(crate) fn current_sigma(&mut self, timestep: f64) -> Result<(usize, f64)> {
        let i = self.step_index(timestep)?;
        Ok((i, self.sigma(i)?))
    }

    /// Moves to the next step.
    pub(crate) fn advance(&mut self) {
        self.cursor.advance();
    }

    /// The sigma `add_noise` noises to ([`StepCursor::noise_index`]).
    ///
    /// # Errors
    /// As [`StepCursor::noise_index`].
    pub(crate) fn noise_sigma(&self, timestep: f64) -> Result<f64> {
        self.sigma(self.cursor.noise_index(&self.timesteps, timestep)?)
    }

    /// The standard deviation of the initial noise.
    pub(crate) fn init_noise_sigma(&self) -> f64 {
        match self.scaling {
            InputScaling::Identity => 1.0,
            InputScaling::KDiffusion(spacing) => {
                k_init_noise_sigma(spacing, self.sigmas().unwrap_or_default())
            }
        }
    }

    /// The model input for the current step: `sample` itself, or for the k-diffusion families
    /// `sample / √(σ² + 1)` at the current sigma (which starts the cursor).
    ///
    /// # Errors
    /// Tensor failures, or a timestep not in the schedule.
    pub(crate) fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        match self.scaling {
            InputScaling::Identity => Ok(sample.clone()),
            InputScaling::KDiffusion(_) => {
                let (_, sigma) = self.current_sigma(timestep)?;
                scale_by_sigma(sample, sigma)
            }
        }
    }
}

/// The two required [`Scheduler`](super::Scheduler) methods that hand out the family's
/// `schedule` field, for use inside its `impl Scheduler` block.
macro_rules! schedule_accessors {
    () => {
        fn schedule(&self) -> &StepSchedule {
            &self.schedule
        }

        fn schedule_mut(&mut self) -> &mut StepSchedule {
            &mut self.schedule
        }
    };
}
pub(crate) use schedule_accessors;

/// `[v0, v1, v1, v2, v2, …]`: every value but the first twice, as the schedules of the
/// second-order samplers (Heun, KDPM2) visit them.
pub(crate) fn repeat_after_first(values: &[f64]) -> impl Iterator<Item = f64> + '_ {
    values
        .iter()
        .enumerate()
        .flat_map(|(k, &v)| std::iter::repeat_n(v, if k == 0 { 1 } else { 2 }))
}

/// The last `order` model outputs of a multistep solver (diffusers' `model_outputs`), oldest
/// first; empty slots until enough steps were taken.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelHistory {
    outputs: Vec<Option<Tensor>>,
}

impl ModelHistory {
    /// An empty history of `order` slots.
    pub(crate) fn new(order: usize) -> Self {
        Self {
            outputs: vec![None; order],
        }
    }

    /// Shifts the history left and appends `latest`.
    pub(crate) fn push(&mut self, latest: Tensor) {
        self.outputs.rotate_left(1);
        if let Some(slot) = self.outputs.last_mut() {
            *slot = Some(latest);
        }
    }

    /// The `back`-th most recent output (0 = latest).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when fewer outputs were pushed.
    pub(crate) fn get(&self, back: usize) -> Result<&Tensor> {
        self.outputs
            .len()
            .checked_sub(back + 1)
            .and_then(|i| self.outputs.get(i))
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::invalid("multistep history is shorter than the solver order"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_lookup_takes_second_duplicate() {
        let ts = [999.0, 500.0, 500.0, 1.0];
        assert_eq!(index_for_timestep(&ts, 500.0), Some(2));
        assert_eq!(index_for_timestep(&ts, 1.0), Some(3));
        assert_eq!(index_for_timestep(&ts, 2.0), None);
        assert!(MissingTimestep::Error.lookup(&ts, 2.0).is_err());
        assert_eq!(MissingTimestep::LastStep.lookup(&ts, 2.0).ok(), Some(3));
    }

    #[test]
    fn cursor_follows_begin_index_and_stops_at_the_end() -> Result<()> {
        let ts = [9.0, 5.0, 1.0];
        let mut c = StepCursor::new(MissingTimestep::LastStep);
        assert_eq!(c.noise_index(&ts, 5.0)?, 1);
        c.set_begin(2);
        assert_eq!(c.noise_index(&ts, 9.0)?, 2);
        assert_eq!(c.current(&ts, 9.0)?, 2);
        c.advance();
        assert!(c.current(&ts, 1.0).is_err());
        c.reset();
        assert_eq!(c.current(&ts, 7.0)?, 2);
        assert_eq!(c, {
            let mut d = StepCursor::new(MissingTimestep::LastStep);
            d.current(&ts, 1.0)?;
            d
        });
        Ok(())
    }

    #[test]
    fn second_order_repetition() {
        let v: Vec<f64> = repeat_after_first(&[3.0, 2.0, 1.0]).collect();
        assert_eq!(v, vec![3.0, 2.0, 2.0, 1.0, 1.0]);
    }

    #[test]
    fn history_keeps_the_latest_outputs() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let mut h = ModelHistory::new(2);
        assert!(h.get(0).is_err());
        for v in [1.0f64, 2.0, 3.0] {
            h.push(Tensor::new(&[v], &dev)?);
        }
        assert_eq!(h.get(0)?.to_vec1::<f64>()?, vec![3.0]);
        assert_eq!(h.get(1)?.to_vec1::<f64>()?, vec![2.0]);
        assert!(h.get(2).is_err());
        Ok(())
    }
}
