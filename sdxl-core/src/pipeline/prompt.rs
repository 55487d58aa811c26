//! Turning prompts into the UNet's conditioning, as diffusers' `encode_prompt`.

use candle_core::{Device, Tensor, D};

use super::model::SdxlModel;
use crate::error::{Error, Result};
use crate::text::clip::ClipTextModel;
use crate::text::tokenizer::ClipTokenizer;

/// The prompts of one generation.
#[derive(Debug, Clone, Default)]
pub struct Prompts {
    /// The prompt (text encoder 1; also encoder 2 unless `prompt_2` is given).
    pub prompt: String,
    /// The prompt for text encoder 2.
    pub prompt_2: Option<String>,
    /// The negative prompt; `None` gives all-zero negative embeddings when the model's
    /// `force_zeros_for_empty_prompt` is set (the base), and encodes `""` otherwise.
    pub negative_prompt: Option<String>,
    /// The negative prompt for text encoder 2 (defaults to `negative_prompt`).
    pub negative_prompt_2: Option<String>,
}

/// Text conditioning for one prompt and its negative, each with batch 1.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[1, 77, context]`: penultimate hidden states of the encoders, concatenated.
    pub prompt_embeds: Tensor,
    /// `[1, 77, context]` for the negative prompt.
    pub negative_prompt_embeds: Tensor,
    /// `[1, projection]`: text encoder 2's projected pooled embedding.
    pub pooled_prompt_embeds: Tensor,
    /// `[1, projection]` for the negative prompt.
    pub negative_pooled_prompt_embeds: Tensor,
}

/// Encodes `text` with one tokenizer/encoder pair: (penultimate hidden state, projected pooled
/// embedding when the encoder has a projection).
fn encode_one(
    tokenizer: &ClipTokenizer,
    encoder: &ClipTextModel,
    text: &str,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let ids = tokenizer.encode(text)?;
    let ids = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
    let out = encoder.forward(&ids)?;
    Ok((out.penultimate, out.text_embeds))
}

/// Encodes one side (positive or negative) with every encoder of the model.
fn encode_side(model: &SdxlModel, texts: [&str; 2]) -> Result<(Tensor, Tensor)> {
    let device = &model.options.device;
    let mut hidden = Vec::with_capacity(2);
    // diffusers zips [prompt, prompt_2] with the available encoders, so a refiner (encoder 2
    // only) sees the first prompt.
    let mut texts = texts.into_iter();
    if let Some((tok, enc)) = &model.text.encoder_1 {
        let (h, _) = encode_one(tok, enc, texts.next().unwrap_or_default(), device)?;
        hidden.push(h);
    }
    let (tok, enc) = &model.text.encoder_2;
    let (h, pooled) = encode_one(tok, enc, texts.next().unwrap_or_default(), device)?;
    hidden.push(h);
    let pooled = pooled.ok_or_else(|| {
        Error::unsupported("text_encoder_2 has no text_projection; SDXL needs its pooled output")
    })?;
    Ok((Tensor::cat(&hidden, D::Minus1)?, pooled))
}

/// Encodes a prompt and its negative exactly as diffusers' `StableDiffusionXL*Pipeline
/// .encode_prompt(…, num_images_per_prompt=1, do_classifier_free_guidance=True)`.
///
/// # Errors
/// Tokenizer or tensor failures.
pub fn encode_prompt(model: &SdxlModel, prompts: &Prompts) -> Result<PromptEmbeds> {
    let prompt_2 = prompts.prompt_2.as_deref().unwrap_or(&prompts.prompt);
    let (prompt_embeds, pooled_prompt_embeds) =
        encode_side(model, [prompts.prompt.as_str(), prompt_2])?;
    let zero_out = prompts.negative_prompt.is_none() && model.index.force_zeros_for_empty_prompt;
    let (negative_prompt_embeds, negative_pooled_prompt_embeds) = if zero_out {
        (
            prompt_embeds.zeros_like()?,
            pooled_prompt_embeds.zeros_like()?,
        )
    } else {
        let negative = prompts.negative_prompt.as_deref().unwrap_or("");
        let negative_2 = prompts.negative_prompt_2.as_deref().unwrap_or(negative);
        encode_side(model, [negative, negative_2])?
    };
    Ok(PromptEmbeds {
        prompt_embeds,
        negative_prompt_embeds,
        pooled_prompt_embeds,
        negative_pooled_prompt_embeds,
    })
}
