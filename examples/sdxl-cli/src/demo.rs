//! A tiny random-weight SDXL, built on the fly so that the whole path runs with no downloads.
//!
//! The configs and tokenizer files are the tiny reference model's (embedded in the binary); the
//! weights are drawn from a seed for every tensor the weight spec lists, and written as a
//! diffusers folder in a temporary directory that is deleted afterwards.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

const MODEL_INDEX: &str = include_str!("../assets/demo/model_index.json");
const SCHEDULER: &str = include_str!("../assets/demo/scheduler/scheduler_config.json");
const UNET: &str = include_str!("../assets/demo/unet/config.json");
const VAE: &str = include_str!("../assets/demo/vae/config.json");
const TEXT_ENCODER: &str = include_str!("../assets/demo/text_encoder/config.json");
const TEXT_ENCODER_2: &str = include_str!("../assets/demo/text_encoder_2/config.json");
const TOKENIZER_CONFIG: &str = include_str!("../assets/demo/tokenizer/tokenizer_config.json");
const TOKENIZER_MAP: &str = include_str!("../assets/demo/tokenizer/special_tokens_map.json");
const TOKENIZER_2_CONFIG: &str = include_str!("../assets/demo/tokenizer_2/tokenizer_config.json");
const TOKENIZER_2_MAP: &str = include_str!("../assets/demo/tokenizer_2/special_tokens_map.json");
const VOCAB: &str = include_str!("../../../sdxl-core/assets/clip/vocab.json");
const MERGES: &str = include_str!("../../../sdxl-core/assets/clip/merges.txt");
const WEIGHTS_SPEC: &str = include_str!("../assets/demo/weights_spec.json");

/// A temporary model folder, removed when dropped.
pub struct DemoDir(PathBuf);

impl DemoDir {
    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SplitMix64 with Box–Muller: a small deterministic normal generator for demo weights.
struct Normal(u64);

impl Normal {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// Values for one tensor, scaled like the reference fixtures: norm weights near 1, small biases,
/// embeddings with std 0.2, other weights with std 1/sqrt(fan_in).
fn init_values(name: &str, shape: &[usize], rng: &mut Normal) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let is_norm = name.contains("norm") || name.contains("layer_norm");
    let (mean, std) = if name.ends_with("bias") {
        (0.0, 0.05)
    } else if is_norm && shape.len() == 1 {
        (1.0, 0.1)
    } else if name.contains("embedding") && shape.len() == 2 && !name.contains("linear") {
        (0.0, 0.2)
    } else {
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        (0.0, 1.0 / (fan_in as f32).sqrt())
    };
    (0..n).map(|_| mean + std * rng.sample()).collect()
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Writes the demo model folder and returns it.
pub fn build_demo_model(seed: u64) -> Result<DemoDir, String> {
    let root = std::env::temp_dir().join(format!("sdxl-demo-{}-{seed}", std::process::id()));
    let dir = DemoDir(root.clone());
    let files: [(&str, &str); 14] = [
        ("model_index.json", MODEL_INDEX),
        ("scheduler/scheduler_config.json", SCHEDULER),
        ("unet/config.json", UNET),
        ("vae/config.json", VAE),
        ("text_encoder/config.json", TEXT_ENCODER),
        ("text_encoder_2/config.json", TEXT_ENCODER_2),
        ("tokenizer/tokenizer_config.json", TOKENIZER_CONFIG),
        ("tokenizer/special_tokens_map.json", TOKENIZER_MAP),
        ("tokenizer/vocab.json", VOCAB),
        ("tokenizer/merges.txt", MERGES),
        ("tokenizer_2/tokenizer_config.json", TOKENIZER_2_CONFIG),
        ("tokenizer_2/special_tokens_map.json", TOKENIZER_2_MAP),
        ("tokenizer_2/vocab.json", VOCAB),
        ("tokenizer_2/merges.txt", MERGES),
    ];
    for (name, text) in files {
        write(&root.join(name), text)?;
    }
    let spec: HashMap<String, Vec<(String, Vec<usize>)>> = serde_json::from_str(WEIGHTS_SPEC)
        .map_err(|e| format!("embedded demo weight spec: {e}"))?;
    let mut rng = Normal(seed);
    let mut components: Vec<_> = spec.into_iter().collect();
    components.sort_by(|a, b| a.0.cmp(&b.0));
    for (component, tensors) in components {
        let mut map = HashMap::new();
        for (name, shape) in tensors {
            let values = init_values(&name, &shape, &mut rng);
            let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)
                .map_err(|e| format!("demo tensor {name}: {e}"))?;
            map.insert(name, t);
        }
        let file = if component.starts_with("text_encoder") {
            "model.safetensors"
        } else {
            "diffusion_pytorch_model.safetensors"
        };
        let path = root.join(&component).join(file);
        candle_core::safetensors::save(&map, &path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(dir)
}
