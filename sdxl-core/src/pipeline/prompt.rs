//! Turning prompts into the UNet's conditioning, as diffusers' `encode_prompt`, with prompt
//! weighting and long prompts.

use candle_core::{DType, Device, Tensor, D};

use super::model::{SdxlModel, TextStack};
use crate::error::{Error, Result};
use crate::text::clip::ClipTextModel;
use crate::text::tokenizer::ClipTokenizer;
pub use crate::text::weighting::LongPrompts;
use crate::text::weighting::{prompt_chunks, TokenChunk};

/// The prompts of one generation, and how their text is read.
///
/// By default the weighting syntax is parsed (`(word)`, `(word:1.3)`, `[word]`, `BREAK`; see
/// [`crate::text::weighting`]) and prompts longer than one encoder window are chunked. A prompt
/// without syntax that fits in one window gives exactly diffusers' embeddings.
#[derive(Debug, Clone)]
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
    /// Parse the weighting syntax (default `true`); when `false` every prompt is literal text.
    pub weighting: bool,
    /// Chunk (default) or truncate prompts longer than one encoder window.
    pub long_prompts: LongPrompts,
}

impl Default for Prompts {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            prompt_2: None,
            negative_prompt: None,
            negative_prompt_2: None,
            weighting: true,
            long_prompts: LongPrompts::default(),
        }
    }
}

/// Text conditioning for one prompt and its negative, each with batch 1.
///
/// Both sides have the same number `k` of encoder windows (the shorter side is padded with
/// windows of the empty prompt); `k` is 1 unless a prompt is longer than one window or uses
/// `BREAK`.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[1, k·max_length, context]` (`[1, 77, 2048]` for one SDXL window): each window's
    /// weighted penultimate hidden states, encoders concatenated along the features, windows
    /// along the sequence.
    pub prompt_embeds: Tensor,
    /// `[1, k·max_length, context]` for the negative prompt.
    pub negative_prompt_embeds: Tensor,
    /// `[1, projection]`: text encoder 2's projected pooled embedding of the first window
    /// (token weights do not change it).
    pub pooled_prompt_embeds: Tensor,
    /// `[1, projection]` for the negative prompt.
    pub negative_pooled_prompt_embeds: Tensor,
}

/// The tokenizer/encoder pairs in concatenation order (encoder 1 when present, then encoder 2).
fn encoders(text: &TextStack) -> Vec<&(ClipTokenizer, ClipTextModel)> {
    text.encoder_1
        .iter()
        .chain(std::iter::once(&text.encoder_2))
        .collect()
}

/// The windows of one side (positive or negative), one list per encoder.
fn side_chunks(
    text: &TextStack,
    prompts: &Prompts,
    texts: [&str; 2],
) -> Result<Vec<Vec<TokenChunk>>> {
    // diffusers zips [prompt, prompt_2] with the available encoders, so a refiner (encoder 2
    // only) sees the first prompt.
    encoders(text)
        .into_iter()
        .zip(texts)
        .map(|((tok, _), text)| prompt_chunks(tok, text, prompts.weighting, prompts.long_prompts))
        .collect()
}

/// Scales each window's hidden states `[k, S, H]` by its token weights and restores the
/// window's mean: `z' = z·w`, then `z' · mean(z) / mean(z')` (means over the whole `[S, H]`
/// window, in f32). Windows whose weights are all 1 are returned unchanged, and so is a window
/// whose weighted mean is 0.
fn apply_weights(hidden: &Tensor, chunks: &[TokenChunk]) -> Result<Tensor> {
    if chunks.iter().all(TokenChunk::is_unweighted) {
        return Ok(hidden.clone());
    }
    let (k, s, h) = hidden.dims3()?;
    let device = hidden.device();
    let weights: Vec<f32> = chunks
        .iter()
        .flat_map(|c| c.weights.iter().copied())
        .collect();
    let weights = Tensor::from_vec(weights, (k, s, 1), device)?;
    let z = hidden.to_dtype(DType::F32)?;
    let weighted = z.broadcast_mul(&weights)?;
    let mean =
        |t: &Tensor| -> Result<Vec<f32>> { Ok(t.reshape((k, s * h))?.mean(1)?.to_vec1::<f32>()?) };
    let scales: Vec<f32> = mean(&z)?
        .into_iter()
        .zip(mean(&weighted)?)
        .map(|(before, after)| {
            if after != 0.0 && after.is_finite() {
                before / after
            } else {
                1.0
            }
        })
        .collect();
    let scales = Tensor::from_vec(scales, (k, 1, 1), device)?;
    Ok(weighted.broadcast_mul(&scales)?.to_dtype(hidden.dtype())?)
}

/// Encodes the windows of one encoder: the weighted hidden states `[1, k·S, H]` and, when the
/// encoder has a projection, the first window's projected pooled embedding `[1, P]`.
fn encode_windows(
    encoder: &ClipTextModel,
    chunks: &[TokenChunk],
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let seq = chunks.first().map_or(0, |c| c.ids.len());
    let ids: Vec<u32> = chunks.iter().flat_map(|c| c.ids.iter().copied()).collect();
    let ids = Tensor::from_vec(ids, (chunks.len(), seq), device)?;
    let out = encoder.prompt_embeddings(&ids)?;
    let hidden = apply_weights(&out.penultimate, chunks)?;
    let (k, s, h) = hidden.dims3()?;
    let hidden = hidden.reshape((1, k * s, h))?;
    let pooled = out.text_embeds.map(|t| t.narrow(0, 0, 1)).transpose()?;
    Ok((hidden, pooled))
}

/// Encodes one side with every encoder: the concatenated hidden states and the pooled
/// embedding of encoder 2.
fn encode_side(
    text: &TextStack,
    device: &Device,
    chunks: &[Vec<TokenChunk>],
) -> Result<(Tensor, Tensor)> {
    let mut hidden = Vec::with_capacity(chunks.len());
    let mut pooled = None;
    for ((_, encoder), windows) in encoders(text).into_iter().zip(chunks) {
        let (h, p) = encode_windows(encoder, windows, device)?;
        hidden.push(h);
        pooled = p;
    }
    let pooled = pooled.ok_or_else(|| {
        Error::unsupported("text_encoder_2 has no text_projection; SDXL needs its pooled output")
    })?;
    Ok((Tensor::cat(&hidden, D::Minus1)?, pooled))
}

/// Appends empty-prompt windows to every list shorter than `count`.
fn pad_windows(text: &TextStack, side: &mut [Vec<TokenChunk>], count: usize) {
    for ((tok, _), windows) in encoders(text).into_iter().zip(side) {
        windows.resize(count.max(windows.len()), TokenChunk::empty(tok));
    }
}

/// Encodes a prompt and its negative.
///
/// For prompts without weighting syntax that fit in one window this is exactly diffusers'
/// `StableDiffusionXL*Pipeline.encode_prompt(…, num_images_per_prompt=1,
/// do_classifier_free_guidance=True)`. Otherwise each encoder reads the windows of
/// [`prompt_chunks`]; each window's penultimate hidden states are scaled by the token weights
/// with their mean restored (`z' = z·w; z' *= mean(z)/mean(z')`, per window and encoder), the
/// windows are concatenated along the sequence axis, and the pooled embedding is encoder 2's
/// projection of the first window. Every encoder on both sides is padded with empty-prompt
/// windows to the largest window count, so both sides have the same length.
///
/// The text encoders are those of [`SdxlModel::text`]: read for this call and dropped before it
/// returns when they are loaded on demand.
///
/// # Errors
/// Tokenizer or tensor failures; read errors of text encoders loaded on demand.
pub fn encode_prompt(model: &SdxlModel, prompts: &Prompts) -> Result<PromptEmbeds> {
    let text = model.text()?;
    let device = &model.options.device;
    let prompt_2 = prompts.prompt_2.as_deref().unwrap_or(&prompts.prompt);
    let mut positive = side_chunks(&text, prompts, [prompts.prompt.as_str(), prompt_2])?;
    let zero_out = prompts.negative_prompt.is_none() && model.index.force_zeros_for_empty_prompt;
    let mut negative = if zero_out {
        Vec::new()
    } else {
        let negative = prompts.negative_prompt.as_deref().unwrap_or("");
        let negative_2 = prompts.negative_prompt_2.as_deref().unwrap_or(negative);
        side_chunks(&text, prompts, [negative, negative_2])?
    };
    let count = positive
        .iter()
        .chain(&negative)
        .map(Vec::len)
        .max()
        .unwrap_or(1);
    pad_windows(&text, &mut positive, count);
    pad_windows(&text, &mut negative, count);
    let (prompt_embeds, pooled_prompt_embeds) = encode_side(&text, device, &positive)?;
    let (negative_prompt_embeds, negative_pooled_prompt_embeds) = if zero_out {
        (
            prompt_embeds.zeros_like()?,
            pooled_prompt_embeds.zeros_like()?,
        )
    } else {
        encode_side(&text, device, &negative)?
    };
    Ok(PromptEmbeds {
        prompt_embeds,
        negative_prompt_embeds,
        pooled_prompt_embeds,
        negative_pooled_prompt_embeds,
    })
}
