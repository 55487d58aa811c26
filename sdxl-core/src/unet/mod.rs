//! The SDXL UNet (`UNet2DConditionModel`).
