//! What a single-file checkpoint does not carry, shipped with the library.
//!
//! Real single files hold weights only. The tokenizers, the scheduler config and the pipeline
//! flags of `model_index.json` come from the files under `sdxl-core/assets/` (see its
//! `README.md`), compiled in with `include_str!`: the CLIP BPE vocabulary and merges shared by
//! both tokenizers, each tokenizer's `tokenizer_config.json` (pad token `<|endoftext|>` for the
//! CLIP ViT-L tokenizer, `!` for the OpenCLIP ViT-bigG one, 77 tokens), the real SDXL
//! `scheduler_config.json` (Euler, `leading` spacing) and the base and refiner
//! `model_index.json`.
//!
//! The architecture values no tensor shape reveals follow the rules below; every one can be
//! overridden with [`SingleFileHints`](super::SingleFileHints).
//!
//! | value | rule | real SDXL |
//! |---|---|---|
//! | UNet heads per level | `channels / min(64, model_channels)`: 64-wide heads (SGM's `num_head_channels: 64`); a model narrower than 64 (a test model) has heads of width `model_channels`, so each level's head count is its channel multiplier | base 5/10/20, refiner 6/12/24/24 |
//! | UNet and VAE group-norm groups | `min(32, first_channels / 2)`: SGM's `GroupNorm32`; a model narrower than 64 has groups of two channels | 32 |
//! | text-encoder heads | `hidden / 64` when 64 divides `hidden` (64-wide heads), else 2 | ViT-L 12, bigG 20 |
//! | activations, norm epsilons, `flip_sin_to_cos`, `freq_shift`, legacy EOS id 2 | fixed | as in the diffusers configs |
//! | VAE `scaling_factor`, `force_upcast`, `sample_size` | 0.13025, true, 1024 | same |

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::loading::ModelIndex;
use crate::pipeline::ModelKind;
use crate::schedulers::SchedulerConfig;
use crate::text::tokenizer::ClipTokenizer;

/// The CLIP BPE vocabulary (49,408 tokens) of both SDXL tokenizers.
pub const VOCAB_JSON: &str = include_str!("../../../assets/clip/vocab.json");
/// The CLIP BPE merges of both SDXL tokenizers.
pub const MERGES_TXT: &str = include_str!("../../../assets/clip/merges.txt");
/// `tokenizer/tokenizer_config.json` of SDXL (pad token `<|endoftext|>`).
pub const TOKENIZER_CONFIG: &str =
    include_str!("../../../assets/sdxl/tokenizer/tokenizer_config.json");
/// `tokenizer_2/tokenizer_config.json` of SDXL (pad token `!`).
pub const TOKENIZER_2_CONFIG: &str =
    include_str!("../../../assets/sdxl/tokenizer_2/tokenizer_config.json");
/// The real SDXL `scheduler/scheduler_config.json` (base and refiner share it).
pub const SCHEDULER_CONFIG: &str =
    include_str!("../../../assets/sdxl/scheduler/scheduler_config.json");
/// The real SDXL base `model_index.json`.
pub const MODEL_INDEX_BASE: &str = include_str!("../../../assets/sdxl/model_index_base.json");
/// The real SDXL refiner `model_index.json`.
pub const MODEL_INDEX_REFINER: &str = include_str!("../../../assets/sdxl/model_index_refiner.json");

/// Width of the attention heads of every SDXL network (UNet and both text encoders).
pub const HEAD_DIM: usize = 64;
/// Groups of every SDXL group norm (SGM's `GroupNorm32`).
pub const NORM_GROUPS: usize = 32;
/// The SDXL VAE's latent scale.
pub const VAE_SCALING_FACTOR: f64 = 0.13025;
/// The SDXL VAE's training image size (informational; used only by tiling heuristics).
pub const VAE_SAMPLE_SIZE: usize = 1024;
/// Head count of text encoders too narrow for 64-wide heads (test models).
const NARROW_TEXT_HEADS: usize = 2;

/// Where the shipped files are said to come from in error messages.
const ORIGIN: &str = "<sdxl-core assets>";

/// The CLIP ViT-L tokenizer of the SDXL base (pad `<|endoftext|>`).
///
/// # Errors
/// [`Error::Tokenizer`] if the shipped files were broken (they are checked by the tests).
pub fn tokenizer() -> Result<ClipTokenizer> {
    ClipTokenizer::from_strings(
        VOCAB_JSON,
        MERGES_TXT,
        TOKENIZER_CONFIG,
        &format!("{ORIGIN}/tokenizer"),
    )
}

/// The OpenCLIP ViT-bigG tokenizer of the SDXL base and refiner (pad `!`).
///
/// # Errors
/// As [`tokenizer`].
pub fn tokenizer_2() -> Result<ClipTokenizer> {
    ClipTokenizer::from_strings(
        VOCAB_JSON,
        MERGES_TXT,
        TOKENIZER_2_CONFIG,
        &format!("{ORIGIN}/tokenizer_2"),
    )
}

/// The SDXL scheduler config (`EulerDiscreteScheduler`).
///
/// # Errors
/// [`Error::InvalidArgument`] if the shipped file were not a JSON object.
pub fn scheduler_config() -> Result<SchedulerConfig> {
    let values: Map<String, Value> = serde_json::from_str(SCHEDULER_CONFIG)
        .map_err(|e| Error::invalid(format!("{ORIGIN}/scheduler_config.json: {e}")))?;
    Ok(SchedulerConfig::from_map(values))
}

/// The pipeline flags of the real SDXL base or refiner `model_index.json`.
///
/// # Errors
/// [`Error::InvalidArgument`] if the shipped file did not parse.
pub fn model_index(kind: ModelKind) -> Result<ModelIndex> {
    let text = match kind {
        ModelKind::Base => MODEL_INDEX_BASE,
        ModelKind::Refiner => MODEL_INDEX_REFINER,
    };
    serde_json::from_str(text)
        .map_err(|e| Error::invalid(format!("{ORIGIN}/model_index ({kind:?}): {e}")))
}

/// Width of the UNet's attention heads for a UNet whose first level has `model_channels`
/// channels: 64, or `model_channels` when that is narrower.
pub fn unet_head_dim(model_channels: usize) -> usize {
    HEAD_DIM.min(model_channels).max(1)
}

/// Group-norm groups for a network whose first level has `channels` channels: 32, or
/// `channels / 2` when that is fewer.
pub fn norm_groups(channels: usize) -> usize {
    NORM_GROUPS.min(channels / 2).max(1)
}

/// Attention heads of a CLIP text encoder `hidden` wide: `hidden / 64` when 64 divides it,
/// else 2.
pub fn text_heads(hidden: usize) -> usize {
    if hidden >= HEAD_DIM && hidden.is_multiple_of(HEAD_DIM) {
        hidden / HEAD_DIM
    } else {
        NARROW_TEXT_HEADS
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rules_give_the_real_sdxl_values() {
        // Base UNet (320, 640, 1280): heads 5, 10, 20; refiner (384, 768, 1536): 6, 12, 24.
        for (c0, channels, heads) in [
            (320, [320, 640, 1280], [5, 10, 20]),
            (384, [384, 768, 1536], [6, 12, 24]),
        ] {
            let width = unet_head_dim(c0);
            assert_eq!(channels.map(|c| c / width), heads);
            assert_eq!(norm_groups(c0), 32);
        }
        assert_eq!(norm_groups(128), 32); // the VAE
        assert_eq!(text_heads(768), 12);
        assert_eq!(text_heads(1280), 20);
    }

    #[test]
    fn narrow_models_scale_down() {
        // A model 8 channels wide: head width 8 (heads = channel multipliers), 4 groups.
        assert_eq!(unet_head_dim(8), 8);
        assert_eq!(norm_groups(8), 4);
        assert_eq!(text_heads(24), 2);
        assert_eq!(text_heads(32), 2);
        assert_eq!(norm_groups(1), 1);
    }

    #[test]
    fn shipped_files_parse() {
        let t1 = tokenizer().unwrap();
        let t2 = tokenizer_2().unwrap();
        assert_eq!(
            (t1.bos_id(), t1.eos_id(), t1.pad_id()),
            (49406, 49407, 49407)
        );
        assert_eq!((t2.pad_id(), t2.max_length()), (0, 77));
        let s = scheduler_config().unwrap();
        assert_eq!(s.class_name(), Some("EulerDiscreteScheduler"));
        let base = model_index(ModelKind::Base).unwrap();
        assert!(base.force_zeros_for_empty_prompt && base.has_text_encoder());
        let refiner = model_index(ModelKind::Refiner).unwrap();
        assert!(refiner.requires_aesthetics_score && !refiner.has_text_encoder());
    }

    #[test]
    fn malformed_shipped_files_would_be_tokenizer_errors() {
        let bad_vocab = ClipTokenizer::from_strings("{", MERGES_TXT, TOKENIZER_CONFIG, ORIGIN);
        assert!(matches!(bad_vocab, Err(Error::Tokenizer(m)) if m.contains("vocab.json")));
        let bad_merges = ClipTokenizer::from_strings(VOCAB_JSON, "a b c", TOKENIZER_CONFIG, ORIGIN);
        assert!(matches!(bad_merges, Err(Error::Tokenizer(m)) if m.contains("merges.txt")));
    }
}
