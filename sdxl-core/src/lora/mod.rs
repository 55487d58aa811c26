//! LoRA adapters: reading kohya (sd-scripts) and diffusers/PEFT files and merging them into a
//! loaded [`SdxlModel`](crate::pipeline::SdxlModel), several at once with their own scales, and
//! taking them out again, so that a loaded model can switch LoRAs without reloading.
//!
//! # File layouts
//!
//! - **kohya**: `<name>.lora_down.weight` `[r, in]` (or `[r, in, k, k]` for a convolution),
//!   `<name>.lora_up.weight` `[out, r]` (or `[out, r, 1, 1]`) and `<name>.alpha` (a scalar;
//!   alpha = r when absent). `<name>` is `lora_unet_`, `lora_te1_` or `lora_te2_` followed by
//!   the module path in the original model with `.` replaced by `_`; UNet paths are the
//!   single-file (SGM) names (`lora_unet_input_blocks_4_1_proj_in`), mapped to the model's
//!   layers through its own block structure ([`SgmUnetLayout`]). Names built from diffusers
//!   paths (`lora_unet_down_blocks_1_attentions_0_proj_in`) are accepted too.
//! - **diffusers/PEFT**: `<component>.<module>.lora_A.weight` and `.lora_B.weight` with
//!   `<component>` one of `unet`, `text_encoder`, `text_encoder_2`; rank and alpha come from the
//!   header metadata `lora_adapter_metadata` (`"unet.r"`, `"unet.lora_alpha"`, with
//!   `rank_pattern`/`alpha_pattern` and `use_rslora`); without it alpha = rank.
//!
//! Every UNet linear and convolution layer (attention projections, feed-forwards, `proj_in`/
//! `proj_out`, resnets' `conv1`/`conv2`/`conv_shortcut`/`time_emb_proj`, resamplers,
//! `conv_in`/`conv_out`, the time embeddings) and every text-encoder linear layer
//! (`q/k/v/out_proj`, `mlp.fc1/fc2`, `text_projection`) can be a target.
//!
//! # Semantics
//!
//! Merging computes `W ← W + scale · scaling · up @ down` with `scaling = alpha / rank`, which is
//! what diffusers' `pipe.fuse_lora(lora_scale=scale)` does, and gives the outputs of an unfused
//! pipeline run with `cross_attention_kwargs={"scale": scale}` (one LoRA) or
//! `set_adapters([..], adapter_weights=[..])` (several): the scale applies to the UNet and both
//! text encoders. kohya files keep a per-module alpha (sd-scripts' meaning; diffusers' kohya
//! loader uses the most common alpha for some modules).
//!
//! A module that matches no layer of the model, or a key that belongs to no LoRA module (LoHa,
//! LoKr, DoRA, LoRA biases), is an error listing them unless
//! [`LoraOptions::skip_unknown`] is set; a LoRA whose shapes do not fit (made for another model)
//! is a [`ShapeMismatch`](crate::Error::ShapeMismatch). Either way the model is left unchanged.
//!
//! ```no_run
//! use sdxl_core::lora::{LoraSpec, LoraWeights};
//! use sdxl_core::pipeline::{LoadOptions, SdxlModel};
//! # fn main() -> sdxl_core::Result<()> {
//! let mut model = SdxlModel::load("sdxl-base".as_ref(), &LoadOptions::default())?;
//! let style = LoraWeights::load("style.safetensors".as_ref())?;
//! let detail = LoraWeights::load("detail.kohya.safetensors".as_ref())?;
//! let applied = model.apply_loras(&[
//!     LoraSpec { lora: &style, scale: 0.8 },
//!     LoraSpec { lora: &detail, scale: 0.4 },
//! ])?;
//! // ... generate with `model` ...
//! model.remove_loras(&applied)?; // the original weights, bit for bit
//! # Ok(()) }
//! ```

pub mod file;
pub mod kohya;
pub mod merge;
mod metadata;

pub use file::{LoraComponent, LoraFormat, LoraModule, LoraWeights};
pub use kohya::{kohya_module_name, SgmUnetLayout};
pub(crate) use merge::PendingLoras;
pub use merge::{AppliedLoras, LoraOptions, LoraSpec};
