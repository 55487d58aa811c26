//! Text side of SDXL: the CLIP BPE tokenizers, both CLIP text encoders, and the prompt
//! weighting syntax with long-prompt windows.

pub mod clip;
pub mod tokenizer;
pub mod weighting;
