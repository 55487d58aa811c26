//! Timing one operation: untimed warm-up runs, then timed runs, with the CPU time this process
//! and everything else used meanwhile (to tell a quiet measurement from a contended one).

use std::time::Instant;

use candle_core::Device;

/// Shortest span over which CPU shares are reported (5 % resolution at 100 ticks/s).
const MIN_CORES_WALL_S: f64 = 0.2;

/// Linux's `USER_HZ`: the unit of the CPU times in `/proc/stat` and `/proc/self/stat`.
const TICKS_PER_SECOND: f64 = 100.0;

/// What one measurement took.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Seconds of each timed run.
    pub times: Vec<f64>,
    /// Seconds of each warm-up run.
    pub warmup: Vec<f64>,
    /// CPU cores this process kept busy during the timed runs (CPU seconds per wall second).
    pub own_cores: Option<f64>,
    /// Cores every other process kept busy meanwhile.
    pub others_cores: Option<f64>,
}

impl Timing {
    /// The median of the timed runs (the mean of the middle two for an even count).
    pub fn median(&self) -> f64 {
        let mut t = self.times.clone();
        t.sort_by(f64::total_cmp);
        let n = t.len();
        let upper = t.get(n / 2).copied().unwrap_or(f64::NAN);
        match (n / 2).checked_sub(1).and_then(|i| t.get(i)) {
            Some(lower) if n.is_multiple_of(2) => (lower + upper) / 2.0,
            _ => upper,
        }
    }

    /// The fastest timed run.
    pub fn min(&self) -> f64 {
        self.times.iter().copied().fold(f64::INFINITY, f64::min)
    }

    /// The slowest timed run.
    pub fn max(&self) -> f64 {
        self.times.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Busy CPU seconds of the whole machine and of this process, from `/proc`.
#[derive(Debug, Clone, Copy)]
struct CpuSnapshot {
    wall: Instant,
    machine_busy: f64,
    own: f64,
}

impl CpuSnapshot {
    fn take() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<f64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // Everything but idle and iowait.
        let idle = ticks.get(3)? + ticks.get(4)?;
        let machine_busy = (ticks.iter().sum::<f64>() - idle) / TICKS_PER_SECOND;
        let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the parenthesised command name: state is the first, utime the 12th.
        let after_name = own_stat.rsplit_once(')')?.1;
        let mut fields = after_name.split_whitespace().skip(11);
        let utime: f64 = fields.next()?.parse().ok()?;
        let stime: f64 = fields.next()?.parse().ok()?;
        Some(Self {
            wall: Instant::now(),
            machine_busy,
            own: (utime + stime) / TICKS_PER_SECOND,
        })
    }

    /// `(own cores, others' cores)` between `self` and `later`; `None` over less than
    /// [`MIN_CORES_WALL_S`], where the tick counts are too coarse to mean anything.
    fn cores_until(&self, later: &Self) -> Option<(f64, f64)> {
        let wall = later.wall.duration_since(self.wall).as_secs_f64();
        if wall < MIN_CORES_WALL_S {
            return None;
        }
        let own = later.own - self.own;
        let others = (later.machine_busy - self.machine_busy - own).max(0.0);
        Some((round2(own / wall), round2(others / wall)))
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Runs `f` `warmup` times untimed, then `repeats` times timed; each run ends with a device
/// synchronisation so that queued GPU work is inside its time.
///
/// # Errors
/// The first error of `f` or of the synchronisation.
pub fn measure(
    warmup: usize,
    repeats: usize,
    device: &Device,
    f: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Timing, String> {
    let mut once = || -> Result<f64, String> {
        let t0 = Instant::now();
        f()?;
        device
            .synchronize()
            .map_err(|e| format!("device synchronisation: {e}"))?;
        Ok(t0.elapsed().as_secs_f64())
    };
    let warmup = (0..warmup).map(|_| once()).collect::<Result<Vec<_>, _>>()?;
    let before = CpuSnapshot::take();
    let times = (0..repeats)
        .map(|_| once())
        .collect::<Result<Vec<_>, _>>()?;
    let cores = before
        .zip(CpuSnapshot::take())
        .and_then(|(a, b)| a.cores_until(&b));
    Ok(Timing {
        times,
        warmup,
        own_cores: cores.map(|c| c.0),
        others_cores: cores.map(|c| c.1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(times: &[f64]) -> Timing {
        Timing {
            times: times.to_vec(),
            warmup: vec![],
            own_cores: None,
            others_cores: None,
        }
    }

    #[test]
    fn median_min_max() {
        let t = timing(&[3.0, 1.0, 2.0]);
        assert_eq!((t.median(), t.min(), t.max()), (2.0, 1.0, 3.0));
        assert_eq!(timing(&[4.0, 1.0, 2.0, 3.0]).median(), 2.5);
    }

    #[test]
    fn measures_and_counts_runs() {
        let mut calls = 0;
        let t = measure(2, 3, &Device::Cpu, &mut || {
            calls += 1;
            Ok(())
        });
        assert_eq!(t.map(|t| (t.warmup.len(), t.times.len())), Ok((2, 3)));
        assert_eq!(calls, 5);
        let e = measure(0, 1, &Device::Cpu, &mut || Err("boom".into()));
        assert_eq!(e.err().as_deref(), Some("boom"));
    }
}
