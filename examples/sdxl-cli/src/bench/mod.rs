//! `sdxl bench`: times full-size SDXL components after a warm-up (median, min and max of
//! `--repeats` runs), with the analytic FLOP rate and the process's peak RSS, in the JSON lines
//! of `shared/bench/torch_baseline.py` so that both can be joined row by row (`bench/compare.sh`).
//!
//! Components are loaded one at a time, once per dtype, and dropped before the next (a
//! full-size f32 UNet alone is about 10 GiB). Inputs are seeded.

mod anchors;
mod args;
mod components;
mod flops;
mod measure;
mod report;
mod rss;

use candle_core::{DType, Device};
use serde_json::{json, Map, Value};

pub use args::BenchArgs;
use args::Component;
use flops::Flops;
use report::{machine_info, Measurement, Reporter};
use rss::PeakRss;

use crate::args::{DTypeName, DeviceName};

/// Runs `sdxl bench`.
///
/// # Errors
/// Invalid flags, a device that is not available, a model folder that cannot be loaded. A
/// failing measurement (e.g. an op without a kernel for that dtype) is reported as an `error`
/// row and the run goes on.
pub fn run(args: &BenchArgs) -> Result<(), String> {
    if args.threads > 0 {
        // Before any work: rayon's pool and candle's matmul read it when they first need it.
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    }
    if args.repeats == 0 {
        return Err("--repeats must be at least 1".into());
    }
    let mut out = Reporter::new(args.json);
    if args.flops_only {
        return components::flops_only(args, &mut out);
    }
    let components = selected_components(args)?;
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; time a release build (cargo run --release …)");
    }
    let (device, device_name) = match args.device {
        DeviceName::Cpu => (Device::Cpu, "cpu"),
        DeviceName::Cuda => (
            Device::new_cuda(0).map_err(|e| format!("CUDA device: {e}"))?,
            "cuda",
        ),
        DeviceName::Metal => (
            Device::new_metal(0).map_err(|e| format!("Metal device: {e}"))?,
            "metal",
        ),
    };
    let threads = candle_core::utils::get_num_threads();
    out.emit(&machine_info(threads, device_name));
    let mut bench = Bench {
        args,
        device,
        out,
        peak: PeakRss::default(),
        threads,
    };
    for c in components {
        bench.component(c)?;
    }
    let done = json!({
        "kind": "done",
        "process_peak_rss_gib": (bench.peak.lifetime_gib() * 100.0).round() / 100.0,
    });
    bench.out.emit(&done);
    Ok(())
}

/// The components to run: `--components`, or every model component (the refiner UNet only
/// with `--refiner`).
fn selected_components(args: &BenchArgs) -> Result<Vec<Component>, String> {
    let list = match &args.components {
        Some(list) => list.clone(),
        None => [
            Component::Unet,
            Component::Vae,
            Component::TextEncoder,
            Component::TextEncoder2,
            Component::RefinerUnet,
            Component::Pipeline,
        ]
        .into_iter()
        .filter(|c| *c != Component::RefinerUnet || args.refiner.is_some())
        .collect(),
    };
    for c in &list {
        match c {
            Component::Matmul => {}
            Component::RefinerUnet if args.refiner.is_none() => {
                return Err("refiner_unet needs --refiner DIR (an SDXL refiner folder)".into())
            }
            _ if args.model.is_none() => {
                return Err(format!("{} needs --model DIR (an SDXL folder)", c.name()))
            }
            _ => {}
        }
    }
    Ok(list)
}

/// The candle dtype and torch's name for it.
fn dtype_names(d: DTypeName) -> (DType, &'static str) {
    match d {
        DTypeName::F32 => (DType::F32, "float32"),
        DTypeName::F16 => (DType::F16, "float16"),
        DTypeName::Bf16 => (DType::BF16, "bfloat16"),
    }
}

/// What identifies a row and how much work it is.
struct Row<'a> {
    component: &'a str,
    op: &'a str,
    dtype: &'a str,
    shape: String,
    flops: Flops,
    extra: Map<String, Value>,
}

/// The state of a run.
struct Bench<'a> {
    args: &'a BenchArgs,
    device: Device,
    out: Reporter,
    peak: PeakRss,
    threads: usize,
}

impl Bench<'_> {
    fn component(&mut self, c: Component) -> Result<(), String> {
        let a = self.args;
        let model = a.model.as_deref();
        match (c, model, a.refiner.as_deref()) {
            (Component::Matmul, _, _) => self.anchors(),
            (Component::Unet, Some(dir), _) => self.unet(c, dir, &a.dtypes, &a.unet_sizes),
            (Component::RefinerUnet, _, Some(dir)) => {
                self.unet(c, dir, &a.refiner_dtypes, &a.refiner_sizes)
            }
            (Component::Vae, Some(dir), _) => self.vae(dir),
            (Component::TextEncoder | Component::TextEncoder2, Some(dir), _) => {
                self.text_encoder(c, dir)
            }
            (Component::Pipeline, Some(dir), _) => self.pipeline(dir),
            _ => Err(format!("{}: no model folder given", c.name())),
        }
    }

    /// Times `f` (`warmup` untimed runs, then `repeats` timed ones) and prints its row, or an
    /// `error` row when it fails.
    fn run_row(
        &mut self,
        row: Row<'_>,
        (warmup, repeats): (usize, usize),
        f: &mut dyn FnMut() -> Result<(), String>,
    ) {
        self.peak.reset();
        let rss_before_gib = rss::current_gib();
        match measure::measure(warmup, repeats, &self.device, f) {
            Ok(timing) => {
                let m = Measurement {
                    component: row.component,
                    op: row.op,
                    dtype: row.dtype,
                    shape: row.shape,
                    flops: row.flops,
                    timing,
                    rss_before_gib,
                    peak_rss_gib: self.peak.since_reset_gib(),
                    extra: row.extra,
                };
                let mut rec = m.to_json(self.threads);
                if let Value::Object(fields) = &mut rec {
                    let peak = (self.peak.lifetime_gib() * 100.0).round() / 100.0;
                    fields.insert("process_peak_rss_gib".into(), json!(peak));
                }
                self.out.emit(&rec);
            }
            Err(e) => {
                // candle appends a backtrace when RUST_BACKTRACE is set: keep the message.
                let e = e.lines().next().unwrap_or_default();
                let rec = json!({
                    "kind": "error",
                    "component": row.component,
                    "op": row.op,
                    "dtype": row.dtype,
                    "shape": row.shape,
                    "error": e,
                });
                self.out.emit(&rec);
            }
        }
    }

    /// The warm-up and repeat counts of the flags.
    fn runs(&self) -> (usize, usize) {
        (self.args.warmup, self.args.repeats)
    }

    /// Loads something, printing how long it took and the resident set after.
    fn load<T>(
        &mut self,
        component: &str,
        dtype: &str,
        f: impl FnOnce() -> sdxl_core::Result<T>,
    ) -> Result<T, String> {
        let t0 = std::time::Instant::now();
        let v = f().map_err(|e| format!("loading {component} ({dtype}): {e}"))?;
        let rec = json!({
            "kind": "load",
            "component": component,
            "dtype": dtype,
            "load_s": (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "rss_gib": rss::current_gib().map(|v| (v * 100.0).round() / 100.0),
        });
        self.out.emit(&rec);
        Ok(v)
    }
}
