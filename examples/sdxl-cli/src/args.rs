//! Command-line flags. The flag names are a contract: other tools and tests call them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Stable Diffusion XL image generation.
#[derive(Debug, Parser)]
#[command(name = "sdxl", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a prompt with an SDXL model (diffusers folder or single file).
    Generate(Box<GenerateArgs>),
    /// Generate with a tiny random-weight SDXL built on the fly: no downloaded weights needed.
    /// The image is noise-like; the point is the whole path (tokenize, encode, denoise, decode,
    /// PNG).
    Demo(Box<DemoArgs>),
    /// Time full-size components (UNet, refiner UNet, VAE, text encoders, a whole generation) in
    /// several precisions: median/min/max seconds, GFLOP/s and peak RSS, as a table or, with
    /// `--json`, in the JSON lines of `shared/bench/torch_baseline.py`.
    Bench(Box<crate::bench::BenchArgs>),
}

/// A size given as HEIGHTxWIDTH (diffusers' tuple order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hw(pub usize, pub usize);

fn parse_pair(s: &str, what: &str) -> Result<(usize, usize), String> {
    let (a, b) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("expected {what}, e.g. 1024x1024, got `{s}`"))?;
    let a = a
        .trim()
        .parse()
        .map_err(|_| format!("bad number `{a}` in `{s}`"))?;
    let b = b
        .trim()
        .parse()
        .map_err(|_| format!("bad number `{b}` in `{s}`"))?;
    Ok((a, b))
}

fn parse_hw(s: &str) -> Result<Hw, String> {
    parse_pair(s, "HEIGHTxWIDTH").map(|(h, w)| Hw(h, w))
}

fn parse_top_left(s: &str) -> Result<Hw, String> {
    parse_pair(s, "TOPxLEFT").map(|(t, l)| Hw(t, l))
}

/// A LoRA file and the strength it is merged with (`PATH` or `PATH:SCALE`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraArg {
    /// The `.safetensors` file (kohya or diffusers layout).
    pub path: PathBuf,
    /// The strength (1 = as trained).
    pub scale: f64,
}

fn parse_lora(s: &str) -> Result<LoraArg, String> {
    if let Some((path, scale)) = s.rsplit_once(':') {
        if let Ok(scale) = scale.trim().parse::<f64>() {
            if path.is_empty() || !scale.is_finite() {
                return Err(format!("expected PATH or PATH:SCALE, got `{s}`"));
            }
            return Ok(LoraArg {
                path: path.into(),
                scale,
            });
        }
    }
    if s.is_empty() {
        return Err("expected PATH or PATH:SCALE, got an empty value".into());
    }
    Ok(LoraArg {
        path: s.into(),
        scale: 1.0,
    })
}

/// Scheduler names.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SchedulerName {
    /// Euler (EulerDiscreteScheduler).
    Euler,
    /// Euler ancestral.
    #[value(name = "euler-a")]
    EulerA,
    /// DDIM.
    Ddim,
    /// DPM-Solver++ 2M.
    #[value(name = "dpmpp-2m")]
    Dpmpp2m,
    /// DPM-Solver++ 3M.
    #[value(name = "dpmpp-3m")]
    Dpmpp3m,
    /// DPM-Solver++ 2M SDE.
    #[value(name = "dpmpp-2m-sde")]
    Dpmpp2mSde,
    /// Heun.
    Heun,
    /// KDPM2.
    Kdpm2,
    /// UniPC.
    Unipc,
    /// DDPM.
    Ddpm,
    /// LCM.
    Lcm,
    /// LMS.
    Lms,
}

/// Timestep spacings.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Spacing {
    /// diffusers' `leading`.
    Leading,
    /// diffusers' `trailing` (SDXL-Turbo style).
    Trailing,
    /// diffusers' `linspace`.
    Linspace,
}

/// Prediction types.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Prediction {
    /// The model predicts the noise.
    Epsilon,
    /// The model predicts v.
    #[value(name = "v_prediction")]
    VPrediction,
}

/// Compute precisions.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DTypeName {
    /// 32-bit float.
    F32,
    /// 16-bit float (the VAE stays f32 when its config sets force_upcast).
    F16,
    /// bfloat16.
    Bf16,
}

/// When the VAE decodes and encodes in tiles.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum VaeTiling {
    /// Tile only images whose untiled pass would take more than the memory budget (8 GiB).
    Auto,
    /// Tile every image larger than one tile (diffusers' `enable_tiling()`).
    On,
    /// Never tile (diffusers' default); enormous images are refused.
    Off,
}

/// Devices.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceName {
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
    /// The Metal GPU (needs a build with `--features metal`).
    Metal,
}

/// Everything about one generation except the model.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// The prompt for text encoder 2 (default: --prompt).
    #[arg(long)]
    pub prompt_2: Option<String>,
    /// The negative prompt. Without one, the base model uses all-zero negative embeddings.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// The negative prompt for text encoder 2 (default: --negative-prompt).
    #[arg(long)]
    pub negative_prompt_2: Option<String>,
    /// Read the prompts as literal text: no `(word:1.3)`/`[word]` weighting, no `BREAK`.
    #[arg(long)]
    pub no_prompt_weighting: bool,
    /// Truncate prompts longer than 75 tokens, as diffusers does, instead of encoding them in
    /// several 75-token windows.
    #[arg(long)]
    pub truncate_long_prompts: bool,
    /// Image width in pixels (multiple of 8). Default: 1024 for a model, 64 for the demo.
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (multiple of 8). Default: 1024 for a model, 64 for the demo.
    #[arg(long)]
    pub height: Option<usize>,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (off at 1).
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// Guidance rescale (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    /// Seed; the same seed gives the same initial noise as diffusers on CPU.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images to generate (files are numbered).
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Scheduler (default: the model's own config).
    #[arg(long, value_enum)]
    pub scheduler: Option<SchedulerName>,
    /// Use Karras sigmas.
    #[arg(long)]
    pub karras: bool,
    /// Timestep spacing override.
    #[arg(long, value_enum)]
    pub timestep_spacing: Option<Spacing>,
    /// Prediction type override.
    #[arg(long, value_enum)]
    pub prediction_type: Option<Prediction>,
    /// Micro-conditioning original size, HEIGHTxWIDTH (default: the output size).
    #[arg(long, value_parser = parse_hw)]
    pub original_size: Option<Hw>,
    /// Micro-conditioning crop top-left, TOPxLEFT (default 0x0).
    #[arg(long, value_parser = parse_top_left)]
    pub crop_top_left: Option<Hw>,
    /// Micro-conditioning target size, HEIGHTxWIDTH (default: the output size).
    #[arg(long, value_parser = parse_hw)]
    pub target_size: Option<Hw>,
    /// Negative original size, HEIGHTxWIDTH.
    #[arg(long, value_parser = parse_hw)]
    pub negative_original_size: Option<Hw>,
    /// Negative crop top-left, TOPxLEFT.
    #[arg(long, value_parser = parse_top_left)]
    pub negative_crop_top_left: Option<Hw>,
    /// Negative target size, HEIGHTxWIDTH.
    #[arg(long, value_parser = parse_hw)]
    pub negative_target_size: Option<Hw>,
    /// Start from this PNG (image-to-image); its size sets the output size.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Image-to-image strength in (0, 1].
    #[arg(long, default_value_t = 0.3)]
    pub strength: f64,
    /// Stop the base model at this fraction of the schedule (with --save-latents).
    #[arg(long)]
    pub denoising_end: Option<f64>,
    /// Hand off to the refiner at this fraction of the schedule.
    #[arg(long, default_value_t = 0.8)]
    pub refiner_start: f64,
    /// Refiner aesthetic score.
    #[arg(long, default_value_t = 6.0)]
    pub aesthetic_score: f64,
    /// Refiner negative aesthetic score.
    #[arg(long, default_value_t = 2.5)]
    pub negative_aesthetic_score: f64,
    /// Compute precision.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeName,
    /// Device.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceName,
    /// VAE tiling: lets large images (e.g. 2048x2048) decode in a few GB of memory.
    #[arg(long, value_enum, default_value = "auto")]
    pub vae_tiling: VaeTiling,
    /// Keep no component in memory between uses: the text encoders, the UNet and the VAE are
    /// each read from the checkpoint when needed and dropped after, so the peak memory is about
    /// the UNet's instead of the whole model's (same images, slower: weights are read again for
    /// every generation stage).
    #[arg(long)]
    pub low_memory: bool,
    /// Output PNG (several images: name-0.png, name-1.png, …).
    #[arg(long, default_value = "sdxl.png")]
    pub out: PathBuf,
    /// Also write the final latents (tensor `latents`, before the scaling-factor division).
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `sdxl generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The SDXL base model: a diffusers folder (`model_index.json`, `unet/`, `vae/`, …) or a
    /// single-file checkpoint (`.safetensors` in the original Stability layout).
    #[arg(long)]
    pub model: PathBuf,
    /// An SDXL refiner (folder or single file); the base hands off at --refiner-start.
    #[arg(long)]
    pub refiner: Option<PathBuf>,
    /// Weights variant, e.g. `fp16` for `*.fp16.safetensors`.
    #[arg(long)]
    pub variant: Option<String>,
    /// A LoRA merged into the base model (kohya or diffusers `.safetensors`), as PATH or
    /// PATH:SCALE (scale 1 by default); repeat for several.
    #[arg(long = "lora", value_name = "PATH[:SCALE]", value_parser = parse_lora)]
    pub loras: Vec<LoraArg>,
    /// A diffusers VAE folder to use instead of the model's `vae/`, e.g. an fp16-fix SDXL VAE
    /// (which runs in f16 with `--dtype f16`; the original SDXL VAE is kept in f32).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Sampling options.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `sdxl demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Seed of the random demo weights.
    #[arg(long, default_value_t = 0)]
    pub weights_seed: u64,
    /// Sampling options.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_height_by_width() {
        assert_eq!(parse_hw("768x1344"), Ok(Hw(768, 1344)));
        assert!(parse_hw("768").is_err());
        assert!(parse_hw("ax2").is_err());
    }

    #[test]
    fn lora_takes_an_optional_scale() {
        let lora = |p: &str, scale| LoraArg {
            path: p.into(),
            scale,
        };
        assert_eq!(parse_lora("a.safetensors"), Ok(lora("a.safetensors", 1.0)));
        assert_eq!(
            parse_lora("a.safetensors:0.7"),
            Ok(lora("a.safetensors", 0.7))
        );
        assert_eq!(
            parse_lora("dir:x/a.safetensors"),
            Ok(lora("dir:x/a.safetensors", 1.0))
        );
        assert_eq!(parse_lora("a:b:-0.5"), Ok(lora("a:b", -0.5)));
        assert!(parse_lora(":0.5").is_err());
        assert!(parse_lora("a:nan").is_err());
        assert!(parse_lora("").is_err());
    }

    #[test]
    fn every_flag_parses() {
        let cli = Cli::try_parse_from([
            "sdxl",
            "generate",
            "--model",
            "m",
            "--prompt",
            "p",
            "--scheduler",
            "dpmpp-2m-sde",
            "--karras",
            "--timestep-spacing",
            "trailing",
            "--prediction-type",
            "v_prediction",
            "--original-size",
            "1024x1024",
            "--crop-top-left",
            "0x0",
            "--target-size",
            "1024x1024",
            "--dtype",
            "bf16",
            "--no-prompt-weighting",
            "--truncate-long-prompts",
            "--lora",
            "a.safetensors",
            "--lora",
            "b.safetensors:0.4",
            "--vae",
            "vae-fp16-fix",
            "--vae-tiling",
            "on",
            "--low-memory",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
    }
}
