//! Both SDXL text encoders: transformers' `CLIPTextModel` (OpenAI CLIP ViT-L, `quick_gelu`) and
//! `CLIPTextModelWithProjection` (OpenCLIP ViT-bigG, exact `gelu`, with `text_projection`).
//!
//! [`ClipTextConfig`] mirrors the component's `config.json`; [`ClipTextModel`] reads the
//! checkpoint under its own keys (`text_model.encoder.layers.{i}.self_attn.q_proj.weight`, …) and
//! returns a [`ClipTextOutput`] with the penultimate hidden state (SDXL's prompt embeddings), the
//! final hidden state, the EOS-pooled state and, with a projection, `text_embeds` (SDXL's pooled
//! prompt embedding).

mod config;
mod model;

pub use config::ClipTextConfig;
pub use model::{ClipPromptEmbeddings, ClipTextModel, ClipTextOutput};
