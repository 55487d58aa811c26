//! The SDXL VAE (`AutoencoderKL`).
