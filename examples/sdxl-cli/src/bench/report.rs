//! Output: one JSON object per line in `torch_baseline.py`'s shape (`--json`), or a readable
//! table. Every record is built as JSON first; the table is a view of the same fields.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::flops::Flops;
use super::measure::Timing;

/// One timed row, before it is printed.
#[derive(Debug)]
pub struct Measurement<'a> {
    /// `unet`, `vae`, … (the join key with torch's rows, with `op`, `dtype` and `shape`).
    pub component: &'a str,
    /// `forward`, `decode`, `encode`, `txt2img`, or an anchor's name.
    pub op: &'a str,
    /// torch's dtype name: `float32`, `bfloat16`, `float16`.
    pub dtype: &'a str,
    /// The input shape, `2x4x32x32`.
    pub shape: String,
    /// Analytic FLOPs of one run.
    pub flops: Flops,
    /// The times.
    pub timing: Timing,
    /// Resident set before the warm-up, GiB.
    pub rss_before_gib: Option<f64>,
    /// Peak resident set over warm-up and timed runs, GiB.
    pub peak_rss_gib: Option<f64>,
    /// Row-specific fields (`px`, `batch`, `steps`, …).
    pub extra: Map<String, Value>,
}

fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

fn round_opt(v: Option<f64>, digits: i32) -> Value {
    v.map_or(Value::Null, |v| json!(round(v, digits)))
}

impl Measurement<'_> {
    /// The JSON record (`"kind": "measure"`).
    pub fn to_json(&self, threads: usize) -> Value {
        let t = &self.timing;
        let (g, med, best) = (self.flops.gflop(), t.median(), t.min());
        let gb = |v: u64| round(v as f64 / 1e9, 2);
        let mut rec = json!({
            "kind": "measure",
            "component": self.component,
            "op": self.op,
            "dtype": self.dtype,
            "shape": self.shape,
            "threads": threads,
            "repeats": t.times.len(),
            "median_s": round(med, 4),
            "min_s": round(best, 4),
            "max_s": round(t.max(), 4),
            "times_s": t.times.iter().map(|v| round(*v, 4)).collect::<Vec<_>>(),
            "warmup_s": t.warmup.iter().map(|v| round(*v, 3)).collect::<Vec<_>>(),
            "gflop": round(g, 2),
            "gflop_by_kind": {
                "conv": gb(self.flops.conv),
                "linear": gb(self.flops.linear),
                "attention": gb(self.flops.attn),
            },
            "gflops_per_s_median": round(g / med, 1),
            "gflops_per_s_best": round(g / best, 1),
            "peak_rss_gib": round_opt(self.peak_rss_gib, 2),
            "rss_before_gib": round_opt(self.rss_before_gib, 2),
            "loadavg_1m": round_opt(loadavg(), 2),
            "time": utc_timestamp(),
            "own_cores": t.own_cores,
            "others_cores": t.others_cores,
        });
        if let Value::Object(m) = &mut rec {
            m.extend(self.extra.clone());
        }
        rec
    }
}

/// Prints records as JSON lines or table rows.
#[derive(Debug)]
pub struct Reporter {
    json: bool,
    header_printed: bool,
}

const TABLE_HEADER: &str = "component      op               dtype     shape          median s    \
                            min s    max s      GFLOP  GFLOP/s  peak RSS GiB  own/others cores";

impl Reporter {
    /// A reporter writing JSON lines (`json`) or a table to stdout.
    pub fn new(json: bool) -> Self {
        Self {
            json,
            header_printed: false,
        }
    }

    /// Prints one record. Table mode shows measurements and errors as rows, load notes on
    /// stderr and the machine description as a heading.
    pub fn emit(&mut self, rec: &Value) {
        if self.json {
            println!("{rec}");
        } else {
            self.table(rec);
        }
        let _ = std::io::stdout().flush();
    }

    fn table(&mut self, rec: &Value) {
        let s = |k: &str| rec.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let f = |k: &str| rec.get(k).and_then(Value::as_f64);
        let num = |k: &str, digits: usize| f(k).map_or("-".into(), |v| format!("{v:.digits$}"));
        match s("kind").as_str() {
            "machine" => println!(
                "{} · {} logical CPUs · {} compute threads · {} build · {}",
                s("cpu"),
                num("logical_cpus", 0),
                num("threads", 0),
                s("build"),
                s("time")
            ),
            "load" => eprintln!(
                "loaded {} ({}) in {} s, RSS {} GiB",
                s("component"),
                s("dtype"),
                num("load_s", 1),
                num("rss_gib", 2)
            ),
            "measure" | "error" => {
                if !self.header_printed {
                    println!("{TABLE_HEADER}");
                    self.header_printed = true;
                }
                let head = format!(
                    "{:<14} {:<16} {:<9} {:<13}",
                    s("component"),
                    s("op"),
                    s("dtype"),
                    s("shape")
                );
                if s("kind") == "error" {
                    println!("{head} error: {}", s("error"));
                } else {
                    println!(
                        "{head} {:>9} {:>8} {:>8} {:>10} {:>8} {:>13} {:>6}/{}",
                        num("median_s", 3),
                        num("min_s", 3),
                        num("max_s", 3),
                        num("gflop", 1),
                        num("gflops_per_s_median", 0),
                        num("peak_rss_gib", 2),
                        num("own_cores", 2),
                        num("others_cores", 2)
                    );
                }
            }
            "flops" => println!(
                "{:<14} {:<8} {:<14} {:>10} GFLOP",
                s("component"),
                s("op"),
                s("shape"),
                num("gflop", 2)
            ),
            "done" => println!("process peak RSS {} GiB", num("process_peak_rss_gib", 2)),
            _ => println!("{rec}"),
        }
    }
}

/// `/proc/loadavg`'s one-minute load.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The machine and build: CPU model and features, memory, threads.
pub fn machine_info(threads: usize, device: &str) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let mem_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let kib: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(round(kib / (1024.0 * 1024.0), 1))
    });
    json!({
        "kind": "machine",
        "cpu": field("model name").unwrap_or_else(|| "?".into()),
        "logical_cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "threads": threads,
        "device": device,
        "avx512f": has("avx512f"),
        "avx512_bf16": has("avx512_bf16"),
        "amx_bf16": has("amx_bf16"),
        "mem_gib": mem_gib,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "sdxl_cli": env!("CARGO_PKG_VERSION"),
        "loadavg_1m": round_opt(loadavg(), 2),
        "time": utc_timestamp(),
    })
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn utc_timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_786), (2026, 11, 29));
    }

    #[test]
    fn measurement_has_torch_baseline_fields() {
        let m = Measurement {
            component: "unet",
            op: "forward",
            dtype: "float32",
            shape: "2x4x32x32".into(),
            flops: Flops {
                conv: 2_000_000_000,
                linear: 1_000_000_000,
                attn: 0,
            },
            timing: Timing {
                times: vec![1.0, 3.0, 2.0],
                warmup: vec![4.0],
                own_cores: Some(2.0),
                others_cores: Some(0.0),
            },
            rss_before_gib: Some(1.0),
            peak_rss_gib: Some(1.5),
            extra: Map::from_iter([("px".to_string(), json!(256))]),
        };
        let v = m.to_json(2);
        for (k, want) in [
            ("kind", json!("measure")),
            ("component", json!("unet")),
            ("op", json!("forward")),
            ("dtype", json!("float32")),
            ("shape", json!("2x4x32x32")),
            ("median_s", json!(2.0)),
            ("min_s", json!(1.0)),
            ("max_s", json!(3.0)),
            ("gflop", json!(3.0)),
            ("gflops_per_s_median", json!(1.5)),
            ("peak_rss_gib", json!(1.5)),
            ("px", json!(256)),
        ] {
            assert_eq!(v.get(k), Some(&want), "{k}");
        }
    }
}
