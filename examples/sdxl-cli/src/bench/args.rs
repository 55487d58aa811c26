//! `sdxl bench` flags. Names and defaults mirror `shared/bench/torch_baseline.py`, so that one
//! command line runs the same rows on both sides.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::args::{DTypeName, DeviceName};

/// What can be timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Component {
    /// Peak-rate anchors: square matmuls (`--matmul-sizes`) and one 3×3 convolution.
    Matmul,
    /// The base UNet forward, batch `--batch` (CFG), at each `--unet-sizes` latent side.
    Unet,
    /// The refiner UNet forward (needs `--refiner`), at each `--refiner-sizes` latent side.
    #[value(name = "refiner_unet")]
    RefinerUnet,
    /// VAE decode at each `--vae-sizes` latent side, encode at each `--vae-encode-px`.
    Vae,
    /// CLIP ViT-L, `--batch` × 77 tokens, all hidden states.
    #[value(name = "text_encoder")]
    TextEncoder,
    /// OpenCLIP ViT-bigG with projection, `--batch` × 77 tokens, all hidden states.
    #[value(name = "text_encoder_2")]
    TextEncoder2,
    /// One whole text-to-image generation (encode, `--pipeline-steps` steps, decode); with
    /// `--refiner`, also one with the refiner hand-off.
    Pipeline,
}

impl Component {
    /// The name used in flags and in the JSON lines.
    pub fn name(self) -> &'static str {
        match self {
            Component::Matmul => "matmul",
            Component::Unet => "unet",
            Component::RefinerUnet => "refiner_unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::Pipeline => "pipeline",
        }
    }
}

/// `sdxl bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The SDXL base model: a diffusers folder (full size for meaningful numbers).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// An SDXL refiner folder, for `refiner_unet` and the `pipeline` base+refiner row.
    #[arg(long)]
    pub refiner: Option<PathBuf>,
    /// Comma list of: matmul, unet, refiner_unet, vae, text_encoder, text_encoder_2, pipeline.
    /// Default: all but matmul (refiner_unet only with --refiner).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub components: Option<Vec<Component>>,
    /// Precisions of every component but the refiner. The `vae` rows run in exactly these
    /// (unlike `generate`, and the `pipeline` rows, which keep an f16 model's VAE in f32).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16")]
    pub dtypes: Vec<DTypeName>,
    /// Precisions of the refiner UNet.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32")]
    pub refiner_dtypes: Vec<DTypeName>,
    /// Latent sides (pixels / 8) of the base UNet.
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    pub unet_sizes: Vec<usize>,
    /// Latent sides of the refiner UNet.
    #[arg(long, value_delimiter = ',', default_value = "32")]
    pub refiner_sizes: Vec<usize>,
    /// Latent sides of the VAE decode.
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    pub vae_sizes: Vec<usize>,
    /// Image sides in pixels of the VAE encode.
    #[arg(long, value_delimiter = ',', default_value = "256")]
    pub vae_encode_px: Vec<usize>,
    /// Sides of the square matmul anchors.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096")]
    pub matmul_sizes: Vec<usize>,
    /// Image side in pixels of the whole generation.
    #[arg(long, default_value_t = 512)]
    pub pipeline_px: usize,
    /// Denoising steps of the whole generation.
    #[arg(long, default_value_t = 4)]
    pub pipeline_steps: usize,
    /// Load the `pipeline` rows' models with every component on demand (`LoadOptions::
    /// low_memory`, `generate --low-memory`) instead of resident.
    #[arg(long)]
    pub low_memory: bool,
    /// Batch of the UNet (2 = one image with classifier-free guidance) and the text encoders.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Timed runs per row.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Untimed runs before them.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Compute threads (sets RAYON_NUM_THREADS before any work); 0 = candle's default.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Device.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceName,
    /// One JSON object per line on stdout (torch_baseline.py's shape) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only print the analytic FLOP counts (configs only, no weights, no timing) at
    /// `--flops-sizes`, as torch_baseline.py's `--flops-only` lines.
    #[arg(long)]
    pub flops_only: bool,
    /// Latent sides for `--flops-only`.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
    pub flops_sizes: Vec<usize>,
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use clap::Parser;

    use crate::args::{Cli, Command};

    #[test]
    fn bench_flags_parse_like_torch_baseline() {
        let cli = Cli::try_parse_from([
            "sdxl",
            "bench",
            "--model",
            "m",
            "--components",
            "unet,vae,text_encoder,text_encoder_2",
            "--dtypes",
            "f32,bf16,f16",
            "--unet-sizes",
            "32",
            "--vae-sizes",
            "32,64",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--threads",
            "2",
            "--json",
        ]);
        let Ok(Cli {
            command: Command::Bench(b),
        }) = cli
        else {
            panic!("{cli:?}");
        };
        assert_eq!(b.components.map(|c| c.len()), Some(4));
        assert_eq!(b.dtypes.len(), 3);
        assert_eq!(b.unet_sizes, vec![32]);
        assert_eq!((b.repeats, b.warmup, b.threads), (1, 0, 2));
        assert!(b.json);
    }
}
