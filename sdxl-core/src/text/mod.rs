//! Text side of SDXL: the CLIP BPE tokenizers and both CLIP text encoders.

pub mod clip;
pub mod tokenizer;
