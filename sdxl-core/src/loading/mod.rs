//! Reading checkpoints: safetensors weights, JSON configs and the diffusers folder layout.

pub mod diffusers;
pub mod json;
mod mapped;
pub(crate) mod memory;
pub mod single_file;
mod transposing;
pub mod weights;

pub use diffusers::{component_weight_files, ModelIndex};
pub use json::read_json;
pub use weights::{SafetensorsFiles, TensorSource, Weights};
