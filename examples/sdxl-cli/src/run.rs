//! Turning parsed flags into a generation and writing its results.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use sdxl_core::lora::{LoraSpec, LoraWeights};
use sdxl_core::pipeline::prompt::LongPrompts;
use sdxl_core::pipeline::{
    decode_images, generate_latents, Flow, GenerateParams, LoadOptions, ModelKind, RunControl,
    SchedulerChoice, SdxlModel, StepInfo, StepObserver,
};
use sdxl_core::schedulers::SchedulerKind;
use sdxl_core::vae::{TilingMode, TilingOptions};

use crate::args::{
    Cli, Command, DTypeName, DeviceName, Hw, LoraArg, Prediction, SamplingArgs, Spacing, VaeTiling,
};
use crate::{demo, png_io};

/// Runs one command; the error is printed as one line by `main`.
pub fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Generate(args) => {
            let s = &args.sampling;
            let options = load_options(s, args.variant.clone(), args.vae.clone())?;
            let t0 = Instant::now();
            let mut base = SdxlModel::load(&args.model, &options).map_err(|e| e.to_string())?;
            if base.kind == ModelKind::Refiner {
                return Err(format!(
                    "{} is an SDXL refiner; pass a base model as --model and the refiner as \
                     --refiner",
                    args.model.display()
                ));
            }
            let refiner = match &args.refiner {
                Some(p) => {
                    let r = SdxlModel::load(p, &options).map_err(|e| e.to_string())?;
                    if r.kind != ModelKind::Refiner {
                        return Err(format!(
                            "{} is an SDXL base model, not a refiner; pass it as --model",
                            p.display()
                        ));
                    }
                    Some(r)
                }
                None => None,
            };
            if !s.quiet {
                eprintln!(
                    "loaded {} in {:.1}s",
                    args.model.display(),
                    t0.elapsed().as_secs_f64()
                );
            }
            apply_loras(&mut base, &args.loras, s.quiet)?;
            let name = model_name(&args.model);
            generate(&base, refiner.as_ref(), s, (1024, 1024), &name)
        }
        Command::Demo(args) => {
            let s = &args.sampling;
            let dir = demo::build_demo_model(args.weights_seed)?;
            let options = load_options(s, None, None)?;
            let base = SdxlModel::load(dir.path(), &options).map_err(|e| e.to_string())?;
            generate(&base, None, s, (64, 64), "sdxl-demo-random")
        }
        Command::Bench(args) => crate::bench::run(&args),
    }
}

/// Merges the `--lora` files into the model (kept merged for the whole run).
fn apply_loras(model: &mut SdxlModel, loras: &[LoraArg], quiet: bool) -> Result<(), String> {
    if loras.is_empty() {
        return Ok(());
    }
    let files = loras
        .iter()
        .map(|l| LoraWeights::load(&l.path).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let specs: Vec<LoraSpec<'_>> = files
        .iter()
        .zip(loras)
        .map(|(lora, arg)| LoraSpec {
            lora,
            scale: arg.scale,
        })
        .collect();
    let applied = model.apply_loras(&specs).map_err(|e| e.to_string())?;
    if !quiet {
        for arg in loras {
            eprintln!("LoRA {} at scale {}", arg.path.display(), arg.scale);
        }
        eprintln!("merged into {} layers", applied.num_layers());
    }
    Ok(())
}

fn load_options(
    s: &SamplingArgs,
    variant: Option<String>,
    vae_path: Option<PathBuf>,
) -> Result<LoadOptions, String> {
    let device = match s.device {
        DeviceName::Cpu => Device::Cpu,
        DeviceName::Cuda => Device::new_cuda(0).map_err(|e| format!("CUDA device: {e}"))?,
        DeviceName::Metal => Device::new_metal(0).map_err(|e| format!("Metal device: {e}"))?,
    };
    let dtype = match s.dtype {
        DTypeName::F32 => DType::F32,
        DTypeName::F16 => DType::F16,
        DTypeName::Bf16 => DType::BF16,
    };
    let mode = match s.vae_tiling {
        VaeTiling::Auto => TilingMode::Auto,
        VaeTiling::On => TilingMode::On,
        VaeTiling::Off => TilingMode::Off,
    };
    let options = LoadOptions {
        device,
        dtype,
        vae_dtype: None,
        variant,
        vae_path,
        vae_tiling: TilingOptions::with_mode(mode),
        ..LoadOptions::default()
    };
    Ok(if s.low_memory {
        options.low_memory()
    } else {
        options
    })
}

fn model_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn scheduler_kind(s: &SamplingArgs) -> Result<Option<SchedulerKind>, String> {
    s.scheduler
        .map(|name| {
            let v = clap::ValueEnum::to_possible_value(&name)
                .map(|p| p.get_name().to_string())
                .unwrap_or_default();
            v.parse::<SchedulerKind>().map_err(|e| e.to_string())
        })
        .transpose()
}

fn pair(hw: Option<Hw>) -> Option<(usize, usize)> {
    hw.map(|Hw(a, b)| (a, b))
}

fn params_from(
    s: &SamplingArgs,
    default_size: (usize, usize),
    init_size: Option<(usize, usize)>,
) -> Result<GenerateParams, String> {
    let mut p = GenerateParams::new(s.prompt.clone());
    p.prompts.prompt_2 = s.prompt_2.clone();
    p.prompts.negative_prompt = s.negative_prompt.clone();
    p.prompts.negative_prompt_2 = s.negative_prompt_2.clone();
    p.prompts.weighting = !s.no_prompt_weighting;
    if s.truncate_long_prompts {
        p.prompts.long_prompts = LongPrompts::Truncate;
    }
    let (w, h) = match init_size {
        Some((w, h)) => {
            if s.width.is_some_and(|x| x != w) || s.height.is_some_and(|x| x != h) {
                return Err(format!(
                    "the init image is {w}x{h}; --width/--height must match it or be omitted"
                ));
            }
            (w, h)
        }
        None => (
            s.width.unwrap_or(default_size.1),
            s.height.unwrap_or(default_size.0),
        ),
    };
    p.width = w;
    p.height = h;
    p.steps = s.steps;
    p.guidance_scale = s.guidance;
    p.guidance_rescale = s.guidance_rescale;
    p.seed = s.seed;
    p.num_images = s.num_images;
    p.strength = s.strength;
    p.denoising_end = s.denoising_end;
    p.scheduler = SchedulerChoice {
        kind: scheduler_kind(s)?,
        karras: s.karras.then_some(true),
        timestep_spacing: s.timestep_spacing.map(|t| {
            match t {
                Spacing::Leading => "leading",
                Spacing::Trailing => "trailing",
                Spacing::Linspace => "linspace",
            }
            .to_string()
        }),
        prediction_type: s.prediction_type.map(|t| {
            match t {
                Prediction::Epsilon => "epsilon",
                Prediction::VPrediction => "v_prediction",
            }
            .to_string()
        }),
        overrides: Default::default(),
    };
    let m = &mut p.micro;
    m.original_size = pair(s.original_size);
    m.crops_coords_top_left = pair(s.crop_top_left).unwrap_or((0, 0));
    m.target_size = pair(s.target_size);
    m.negative_original_size = pair(s.negative_original_size);
    m.negative_crops_coords_top_left = pair(s.negative_crop_top_left);
    m.negative_target_size = pair(s.negative_target_size);
    m.aesthetic_score = s.aesthetic_score;
    m.negative_aesthetic_score = s.negative_aesthetic_score;
    p.validate().map_err(|e| e.to_string())?;
    Ok(p)
}

/// A terminal progress bar per stage.
struct Bar {
    bar: Option<ProgressBar>,
    stage: &'static str,
}

impl Bar {
    fn new(quiet: bool) -> Self {
        Self {
            bar: None,
            stage: "",
        }
        .with_quiet(quiet)
    }

    fn with_quiet(mut self, quiet: bool) -> Self {
        if quiet {
            self.stage = "quiet";
        }
        self
    }
}

impl StepObserver for Bar {
    fn on_step(&mut self, info: &StepInfo) -> Flow {
        if self.stage == "quiet" {
            return Flow::Continue;
        }
        if self.bar.is_none() || self.stage != info.stage {
            if let Some(b) = self.bar.take() {
                b.finish();
            }
            let bar = ProgressBar::new(info.total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {pos}/{len} steps {elapsed_precise} (eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(info.stage);
            self.bar = Some(bar);
            self.stage = info.stage;
        }
        if let Some(b) = &self.bar {
            b.set_position(info.step as u64);
            if info.step == info.total {
                b.finish();
            }
        }
        Flow::Continue
    }
}

fn generate(
    base: &SdxlModel,
    refiner: Option<&SdxlModel>,
    s: &SamplingArgs,
    default_size: (usize, usize),
    model_name: &str,
) -> Result<(), String> {
    let init = match &s.init_image {
        Some(path) => Some(png_io::read_png(path)?),
        None => None,
    };
    let params = params_from(s, default_size, init.as_ref().map(|i| (i.width, i.height)))?;
    let outputs = output_paths(&s.out, params.num_images);
    let mut bar = Bar::new(s.quiet);
    let t0 = Instant::now();
    let err = |e: sdxl_core::Error| e.to_string();
    let pixels = match &init {
        Some(img) => Some(img.to_tensor01(&base.options.device).map_err(err)?),
        None => None,
    };
    // An init image runs image-to-image with the base alone; the refiner hand-off follows
    // text-to-image.
    let refiner = refiner
        .filter(|_| pixels.is_none())
        .map(|r| (r, s.refiner_start));
    let (latents, decoder) = generate_latents(
        base,
        refiner,
        &params,
        pixels.as_ref(),
        RunControl::observing(&mut bar),
    )
    .map_err(err)?;
    if let Some(path) = &s.save_latents {
        save_latents(path, &latents)?;
    }
    let images = decode_images(decoder, &latents).map_err(err)?;
    let text = parameters_text(&params, model_name);
    for (img, path) in images.iter().zip(&outputs) {
        png_io::write_png(path, img, &text)?;
        if !s.quiet {
            eprintln!("wrote {}", path.display());
        }
    }
    if !s.quiet {
        eprintln!("done in {:.1}s", t0.elapsed().as_secs_f64());
    }
    Ok(())
}

/// `out.png` for one image; `out-0.png`, `out-1.png`, … for several.
fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    let ext = out
        .extension()
        .map_or("png".to_string(), |e| e.to_string_lossy().into_owned());
    (0..n)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

fn save_latents(path: &Path, latents: &candle_core::Tensor) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("cannot write {}: {e}", path.display());
    let t = latents.to_dtype(DType::F32).map_err(|e| fail(&e))?;
    t.save_safetensors("latents", path).map_err(|e| fail(&e))
}

/// The generation parameters in the text format other SDXL tools read from PNGs.
fn parameters_text(p: &GenerateParams, model: &str) -> String {
    let sampler = p
        .scheduler
        .kind
        .map_or("model default".to_string(), |k| k.to_string());
    let mut text = p.prompts.prompt.clone();
    if let Some(n) = &p.prompts.negative_prompt {
        text.push_str(&format!("\nNegative prompt: {n}"));
    }
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {sampler}{}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {model}",
        p.steps,
        if p.scheduler.karras == Some(true) {
            " Karras"
        } else {
            ""
        },
        p.guidance_scale,
        p.seed,
        p.width,
        p.height
    ));
    if p.guidance_rescale > 0.0 {
        text.push_str(&format!(", CFG rescale: {}", p.guidance_rescale));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_outputs_are_numbered() {
        let p = output_paths(Path::new("dir/out.png"), 2);
        assert_eq!(
            p,
            vec![
                PathBuf::from("dir/out-0.png"),
                PathBuf::from("dir/out-1.png")
            ]
        );
        assert_eq!(
            output_paths(Path::new("a.png"), 1),
            vec![PathBuf::from("a.png")]
        );
    }
}
