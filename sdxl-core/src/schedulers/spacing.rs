//! Where the inference timesteps fall in the training range (`timestep_spacing`), with numpy's
//! `linspace`/`arange`/`round` reproduced element by element so that the timesteps match
//! diffusers exactly.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `timestep_spacing`: how the inference timesteps are spread over the training range (Table 2
/// of "Common Diffusion Noise Schedules and Sample Steps are Flawed",
/// <https://arxiv.org/abs/2305.08891>).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly spaced over `[0, T - 1]` (fractional for the sigma families, rounded for the
    /// alpha-based ones).
    Linspace,
    /// Multiples of `T / n` counted up from 0, plus `steps_offset`.
    Leading,
    /// Multiples of `T / n` counted down from `T`, minus one.
    Trailing,
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

/// `np.arange(start, stop, step)` for floats: `ceil((stop - start) / step)` values. numpy fills
/// the array as `start + i · ((start + step) - start)` after its second element, which can differ
/// from `start + i · step` in the last bit (and so round the other way).
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if !(len.is_finite() && len > 0.0) {
        return Vec::new();
    }
    let second = start + step;
    let delta = second - start;
    (0..len as usize)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// Checks a step count against the training timesteps.
///
/// # Errors
/// [`Error::InvalidArgument`] when `num_inference_steps` is 0 or exceeds `num_train_timesteps`.
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

/// The `n` inference timesteps of the single-step families (DDIM, DDPM and the sigma families),
/// highest first, as the float64 values numpy computes before diffusers' dtype cast: `linspace`
/// values are fractional (the sigma families keep them as float32, DDIM and DDPM round them).
///
/// # Errors
/// As [`check_step_count`].
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    n: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    check_step_count(n, num_train_timesteps)?;
    let total = num_train_timesteps;
    Ok(match spacing {
        TimestepSpacing::Linspace => {
            let mut t = np_linspace(0.0, (total - 1) as f64, n);
            t.reverse();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = total / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f64 + steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(total as f64, total, n),
    })
}

/// The `n` inference timesteps of the multistep solvers (DPM-Solver++, UniPC), highest first:
/// spread over `[0, last_timestep)` and rounded to integers.
///
/// # Errors
/// As [`check_step_count`].
pub(crate) fn multistep_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    last_timestep: usize,
    n: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    check_step_count(n, num_train_timesteps)?;
    Ok(match spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<f64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect();
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio) as f64 + steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(last_timestep as f64, num_train_timesteps, n),
    })
}

/// `np.round(np.arange(start, 0, -T / n)) - 1`.
fn trailing(start: f64, num_train_timesteps: usize, n: usize) -> Vec<f64> {
    let ratio = num_train_timesteps as f64 / n as f64;
    np_arange(start, 0.0, -ratio)
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use TimestepSpacing::{Leading, Linspace, Trailing};

    #[test]
    fn numpy_ranges() {
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_linspace(5.0, 9.0, 1), vec![5.0]);
        assert_eq!(np_arange(10.0, 0.0, -2.5), vec![10.0, 7.5, 5.0, 2.5]);
        assert!(np_arange(0.0, 10.0, -1.0).is_empty());
        // numpy: np.arange(1000, 0, -1000 / 48)[3] is just below 937.5, which rounds down.
        let a = np_arange(1000.0, 0.0, -1000.0 / 48.0);
        assert!(a[3] < 937.5 && a[3].round_ties_even() == 937.0);
    }

    #[test]
    fn spacing_matches_diffusers() -> Result<()> {
        assert_eq!(
            spaced_timesteps(Leading, 1000, 4, 1)?,
            vec![751.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(
            spaced_timesteps(Trailing, 1000, 4, 1)?,
            vec![999.0, 749.0, 499.0, 249.0]
        );
        // 1000 / 16 = 62.5: numpy rounds half to even (1000 - 3 · 62.5 = 812.5 -> 812).
        let t = spaced_timesteps(Trailing, 1000, 16, 0)?;
        assert_eq!(&t[..4], &[999.0, 937.0, 874.0, 811.0]);
        assert_eq!(spaced_timesteps(Linspace, 1000, 1, 0)?, vec![0.0]);
        assert_eq!(
            spaced_timesteps(Linspace, 1000, 4, 0)?,
            vec![999.0, 666.0, 333.0, 0.0]
        );
        assert_eq!(
            spaced_timesteps(Linspace, 1000, 3, 0)?,
            vec![999.0, 499.5, 0.0]
        );
        Ok(())
    }

    #[test]
    fn multistep_spacing_matches_diffusers() -> Result<()> {
        let lead = multistep_timesteps(Leading, 1000, 1000, 10, 1)?;
        assert_eq!(lead.first().copied(), Some(901.0));
        assert_eq!(lead.last().copied(), Some(91.0));
        assert_eq!(
            multistep_timesteps(Linspace, 1000, 1000, 4, 0)?,
            vec![999.0, 749.0, 500.0, 250.0]
        );
        assert_eq!(
            multistep_timesteps(Trailing, 1000, 1000, 4, 0)?,
            vec![999.0, 749.0, 499.0, 249.0]
        );
        Ok(())
    }

    #[test]
    fn step_count_is_validated() {
        assert!(spaced_timesteps(Leading, 1000, 0, 0).is_err());
        assert!(spaced_timesteps(Leading, 1000, 1001, 0).is_err());
        assert!(multistep_timesteps(Trailing, 1000, 1000, 0, 0).is_err());
    }
}
