//! Resident memory of this process, from `/proc/self/status` (Linux; `None` elsewhere), with
//! the peak reset before each measurement as `torch_baseline.py` does.

/// Bytes per GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM`, …) in GiB.
fn status_gib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kib: f64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024.0 / GIB)
    })
}

/// The resident set now, in GiB.
pub fn current_gib() -> Option<f64> {
    status_gib("VmRSS")
}

/// The peak resident set, tracked across resets: `VmHWM` since the last
/// [`PeakRss::reset`], and the largest value seen over the whole process.
#[derive(Debug, Default)]
pub struct PeakRss {
    lifetime_gib: f64,
}

impl PeakRss {
    /// `VmHWM`: the peak since the last reset, in GiB (also folded into the lifetime peak).
    pub fn since_reset_gib(&mut self) -> Option<f64> {
        let v = status_gib("VmHWM")?;
        self.lifetime_gib = self.lifetime_gib.max(v);
        Some(v)
    }

    /// Starts a new peak at the current resident set (writes `5` to `/proc/self/clear_refs`).
    /// Returns whether the kernel accepted it.
    pub fn reset(&mut self) -> bool {
        self.since_reset_gib();
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }

    /// The largest resident set seen so far over the whole process, in GiB.
    pub fn lifetime_gib(&mut self) -> f64 {
        self.since_reset_gib();
        self.lifetime_gib
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn reads_linux_status() {
        let now = current_gib().unwrap_or(0.0);
        assert!(now > 0.0);
        let mut peak = PeakRss::default();
        assert!(peak.since_reset_gib().unwrap_or(0.0) >= now * 0.5);
        assert!(peak.lifetime_gib() > 0.0);
    }
}
