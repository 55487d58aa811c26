//! [`UNet2DConditionModel`]: the SDXL noise predictor, with its timestep and text-time
//! embeddings, and the typed conditioning it takes ([`UNetConditioning`]).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use crate::kernels::parallel::on_pool;
use crate::layers::Conv2d;

use super::attention::LinearVisitor;
use super::blocks::{
    BlockContext, CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
    UpBlock2D,
};
use super::config::UNetConfig;
use super::embeddings::TimestepEmbedding;
use crate::conditioning::{SinusoidalProjection, TextTimeEmbedding};
use crate::error::{Error, Result};
use crate::layers::{conv2d, group_norm, GroupNorm, LayerMut, LayerVisitor, ResnetBlock2D};
use crate::loading::{component_weight_files, Weights};

/// What the UNet is conditioned on besides the timestep, batched like the latents (for
/// classifier-free guidance: rows `[negative; positive]`).
#[derive(Debug, Clone)]
pub struct UNetConditioning {
    /// Per-token text embeddings `[B, tokens, cross_attention_dim]` (SDXL base: both encoders'
    /// penultimate hidden states concatenated; refiner: text_encoder_2's).
    pub encoder_hidden_states: Tensor,
    /// Pooled text embedding `[B, pooled]` (text_encoder_2's projected pooled output).
    pub text_embeds: Tensor,
    /// Micro-conditioning time ids `[B, n]` (see [`crate::conditioning::MicroConditioning`]).
    pub time_ids: Tensor,
}

/// A down level of the UNet.
#[derive(Debug, Clone)]
pub enum DownBlock {
    /// `DownBlock2D`.
    Plain(DownBlock2D),
    /// `CrossAttnDownBlock2D`.
    CrossAttn(CrossAttnDownBlock2D),
}

/// An up level of the UNet.
#[derive(Debug, Clone)]
pub enum UpBlock {
    /// `UpBlock2D`.
    Plain(UpBlock2D),
    /// `CrossAttnUpBlock2D`.
    CrossAttn(CrossAttnUpBlock2D),
}

/// diffusers' `UNet2DConditionModel` with SDXL's `text_time` add-embedding.
///
/// Layers are public struct fields (candle-nn types) so that weights can be edited in place,
/// e.g. to fuse a LoRA.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    time_proj: SinusoidalProjection,
    /// `time_embedding`.
    pub time_embedding: TimestepEmbedding,
    /// `add_time_proj` + `add_embedding`.
    pub add_embedding: TextTimeEmbedding,
    /// `conv_in`.
    pub conv_in: Conv2d,
    /// `down_blocks.i`.
    pub down_blocks: Vec<DownBlock>,
    /// `mid_block`.
    pub mid_block: UNetMidBlock2DCrossAttn,
    /// `up_blocks.i`.
    pub up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    /// `conv_out`.
    pub conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the UNet from `w` (positioned at the UNet's root keys) and its config.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for options this crate does not implement (named with their
    /// value); [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the full key.
    pub fn new(w: &Weights, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate()?;
        let layout = cfg.layout()?;
        let groups = cfg.groups()?;
        let c0 = cfg.block_out_channels.first().copied().unwrap_or(0);
        let temb = cfg.time_embed_dim();
        let ctx = BlockContext {
            temb_channels: temb,
            groups,
            eps: cfg.norm_eps,
        };
        let down_w = w.pp("down_blocks");
        let down_blocks = layout
            .down
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let bw = down_w.pp(i);
                Ok(match &spec.transformers {
                    None => {
                        DownBlock::Plain(DownBlock2D::new(&bw, spec, &ctx, cfg.downsample_padding)?)
                    }
                    Some(t) => DownBlock::CrossAttn(CrossAttnDownBlock2D::new(
                        &bw,
                        spec,
                        t,
                        &ctx,
                        cfg.downsample_padding,
                    )?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let up_w = w.pp("up_blocks");
        let up_blocks = layout
            .up
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let bw = up_w.pp(i);
                Ok(match &spec.transformers {
                    None => UpBlock::Plain(UpBlock2D::new(&bw, spec, &ctx)?),
                    Some(t) => UpBlock::CrossAttn(CrossAttnUpBlock2D::new(&bw, spec, t, &ctx)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (kin, kout) = (cfg.conv_in_kernel, cfg.conv_out_kernel);
        Ok(Self {
            time_proj: SinusoidalProjection {
                dim: c0,
                flip_sin_to_cos: cfg.flip_sin_to_cos,
                freq_shift: cfg.freq_shift,
            },
            time_embedding: TimestepEmbedding::new(&w.pp("time_embedding"), c0, temb)?,
            add_embedding: TextTimeEmbedding::new(w, cfg)?,
            conv_in: conv2d(cfg.in_channels, c0, kin, 1, (kin - 1) / 2, &w.pp("conv_in"))?,
            down_blocks,
            mid_block: UNetMidBlock2DCrossAttn::new(&w.pp("mid_block"), &layout.mid, &ctx)?,
            up_blocks,
            conv_norm_out: group_norm(groups, c0, cfg.norm_eps, &w.pp("conv_norm_out"))?,
            conv_out: conv2d(
                c0,
                cfg.out_channels,
                kout,
                1,
                (kout - 1) / 2,
                &w.pp("conv_out"),
            )?,
            config: cfg.clone(),
        })
    }

    /// Loads a diffusers `unet/` folder: `config.json` and `diffusion_pytorch_model[.variant]
    /// .safetensors` (or its shards), converted to `dtype` on `device`.
    ///
    /// # Errors
    /// [`Error::NotFound`] / [`Error::Json`] for the config, the errors of
    /// [`component_weight_files`] for the weights, and those of [`UNet2DConditionModel::new`].
    pub fn load(
        unet_dir: &Path,
        dtype: DType,
        device: &Device,
        variant: Option<&str>,
    ) -> Result<Self> {
        let cfg = UNetConfig::load(unet_dir)?;
        let files = component_weight_files(unet_dir, "diffusion_pytorch_model", variant)?;
        let w = Weights::from_safetensors(&files, dtype, device)?;
        Self::new(&w, &cfg)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The dtype of the weights (and of the prediction).
    pub fn dtype(&self) -> DType {
        self.conv_in.dtype()
    }

    /// Calls `f` on every linear layer with its checkpoint name (without `.weight`):
    /// `time_embedding.linear_1/2`, `add_embedding.linear_1/2` and, in every transformer,
    /// `proj_in`, `proj_out`, `attn1/attn2.to_q/to_k/to_v/to_out.0`, `ff.net.0.proj` and
    /// `ff.net.2`. This is how weights are edited in place (e.g. fusing a LoRA). The resnets'
    /// `time_emb_proj` layers are not included.
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_linears_mut(&mut self, f: &mut LinearVisitor<'_>) -> Result<()> {
        self.time_embedding.visit_linears_mut("time_embedding", f)?;
        self.add_embedding
            .add_embedding
            .visit_linears_mut("add_embedding", f)?;
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            if let DownBlock::CrossAttn(b) = block {
                b.visit_linears_mut(&format!("down_blocks.{i}"), f)?;
            }
        }
        self.mid_block.visit_linears_mut("mid_block", f)?;
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            if let UpBlock::CrossAttn(b) = block {
                b.visit_linears_mut(&format!("up_blocks.{i}"), f)?;
            }
        }
        Ok(())
    }

    /// Calls `f` on every layer that has a weight matrix or kernel, with its checkpoint name
    /// (without `.weight`): every linear layer of [`visit_linears_mut`](Self::visit_linears_mut),
    /// plus `conv_in`, `conv_out` and, in every resnet, `conv1`, `time_emb_proj`, `conv2` and
    /// `conv_shortcut`, and the resamplers' `downsamplers.0.conv` / `upsamplers.0.conv`. Norms
    /// are not included. This is how LoRAs covering convolutions are fused.
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_layers_mut(&mut self, f: &mut LayerVisitor<'_>) -> Result<()> {
        fn resnets(
            resnets: &mut [ResnetBlock2D],
            prefix: &str,
            f: &mut LayerVisitor<'_>,
        ) -> Result<()> {
            for (j, r) in resnets.iter_mut().enumerate() {
                r.visit_layers_mut(&format!("{prefix}.resnets.{j}"), f)?;
            }
            Ok(())
        }
        f("conv_in", LayerMut::Conv2d(&mut self.conv_in))?;
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            let prefix = format!("down_blocks.{i}");
            let downsampler = match block {
                DownBlock::Plain(b) => {
                    resnets(&mut b.resnets, &prefix, f)?;
                    &mut b.downsampler
                }
                DownBlock::CrossAttn(b) => {
                    resnets(&mut b.resnets, &prefix, f)?;
                    &mut b.downsampler
                }
            };
            if let Some(d) = downsampler {
                d.visit_layers_mut(&format!("{prefix}.downsamplers.0"), f)?;
            }
        }
        resnets(&mut self.mid_block.resnets, "mid_block", f)?;
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            let prefix = format!("up_blocks.{i}");
            let upsampler = match block {
                UpBlock::Plain(b) => {
                    resnets(&mut b.resnets, &prefix, f)?;
                    &mut b.upsampler
                }
                UpBlock::CrossAttn(b) => {
                    resnets(&mut b.resnets, &prefix, f)?;
                    &mut b.upsampler
                }
            };
            if let Some(u) = upsampler {
                u.visit_layers_mut(&format!("{prefix}.upsamplers.0"), f)?;
            }
        }
        f("conv_out", LayerMut::Conv2d(&mut self.conv_out))?;
        self.visit_linears_mut(&mut |name, linear| f(name, LayerMut::Linear(linear)))
    }

    /// The timestep embedding `[batch, time_embed_dim]` (`time_proj` → `time_embedding`) of
    /// `timestep`, repeated over the batch, in the model dtype.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn timestep_embedding(&self, timestep: f64, batch: usize) -> Result<Tensor> {
        let device = &self.conv_in.device();
        let t = Tensor::full(timestep as f32, batch, device)?;
        let t_emb = self.time_proj.forward(&t)?.to_dtype(self.dtype())?;
        self.time_embedding.forward(&t_emb)
    }

    /// Predicts the noise (or whatever the model was trained on) for `sample`
    /// `[B, in_channels, H, W]` at `timestep` (the same for the whole batch).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `H` or `W` is not a multiple of `2^n` for the model's `n`
    /// downsamplers (4 for the SDXL base, 8 for the refiner; diffusers would instead resize the
    /// upsampled maps to the skip connections, this crate requires exact multiples), or when the
    /// conditioning's shapes do not fit the sample or the model; tensor failures.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
    ) -> Result<Tensor> {
        self.forward_with_hook(sample, timestep, cond, &mut |_, _| Ok(()))
    }

    /// [`forward`](Self::forward), calling `hook(name, output)` after each top-level module
    /// with diffusers' module name: `time_embedding`, `add_embedding`, `conv_in`,
    /// `down_blocks.i`, `mid_block`, `up_blocks.i`, `conv_norm_out` and `conv_out` (like torch
    /// forward hooks; for debugging and previews). Like every model pass, it runs on a thread of
    /// rayon's global pool while the caller waits, so the hook is called there and must be
    /// `Send`.
    ///
    /// # Errors
    /// Those of [`forward`](Self::forward), and any error the hook returns.
    pub fn forward_with_hook(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
        hook: &mut (dyn FnMut(&str, &Tensor) -> Result<()> + Send),
    ) -> Result<Tensor> {
        on_pool(|| self.run(sample, timestep, cond, hook))
    }

    /// The pass of [`forward_with_hook`](Self::forward_with_hook), on the current thread.
    fn run(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
        hook: &mut (dyn FnMut(&str, &Tensor) -> Result<()> + Send),
    ) -> Result<Tensor> {
        let batch = self.check_inputs(sample, cond)?;
        let dtype = self.dtype();
        let context = cond.encoder_hidden_states.to_dtype(dtype)?;
        let t_emb = self.timestep_embedding(timestep, batch)?;
        hook("time_embedding", &t_emb)?;
        let add_emb = self
            .add_embedding
            .forward(&cond.text_embeds, &cond.time_ids)?;
        hook("add_embedding", &add_emb)?;
        let emb = (t_emb + add_emb)?;

        let mut h = self.conv_in.forward(&sample.to_dtype(dtype)?)?;
        hook("conv_in", &h)?;
        let mut skips = vec![h.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            h = match block {
                DownBlock::Plain(b) => b.forward(&h, &emb, &mut skips)?,
                DownBlock::CrossAttn(b) => b.forward(&h, &emb, &context, &mut skips)?,
            };
            hook(&format!("down_blocks.{i}"), &h)?;
        }
        h = self.mid_block.forward(&h, &emb, &context)?;
        hook("mid_block", &h)?;
        for (i, block) in self.up_blocks.iter().enumerate() {
            h = match block {
                UpBlock::Plain(b) => b.forward(&h, &emb, &mut skips)?,
                UpBlock::CrossAttn(b) => b.forward(&h, &emb, &context, &mut skips)?,
            };
            hook(&format!("up_blocks.{i}"), &h)?;
        }
        let h = self.conv_norm_out.forward(&h)?;
        hook("conv_norm_out", &h)?;
        let out = self.conv_out.forward(&h.silu()?)?;
        hook("conv_out", &out)?;
        Ok(out)
    }

    /// Validates shapes before running; returns the batch size.
    fn check_inputs(&self, sample: &Tensor, cond: &UNetConditioning) -> Result<usize> {
        let cfg = &self.config;
        let (b, c, h, w) = match *sample.dims() {
            [b, c, h, w] => (b, c, h, w),
            _ => {
                return Err(Error::invalid(format!(
                    "UNet sample must be [batch, channels, height, width], got {:?}",
                    sample.dims()
                )))
            }
        };
        if c != cfg.in_channels {
            return Err(Error::invalid(format!(
                "UNet sample has {c} channels, the model takes {}",
                cfg.in_channels
            )));
        }
        let factor = 1usize << cfg.num_downsamplers();
        if h == 0 || w == 0 || h % factor != 0 || w % factor != 0 {
            return Err(Error::invalid(format!(
                "latent size {h}x{w} (height x width): both sides must be positive multiples of \
                 {factor} for this UNet's {} downsamplers (with SDXL's VAE, image sides multiples \
                 of {} pixels)",
                cfg.num_downsamplers(),
                factor * 8
            )));
        }
        let ehs = &cond.encoder_hidden_states;
        let cross_dims = cfg
            .cross_attention_dim
            .expand(cfg.down_block_types.len(), "cross_attention_dim")?;
        match *ehs.dims() {
            [eb, _, width] if eb == b && cross_dims.iter().all(|d| *d == width) => {}
            _ => {
                return Err(Error::invalid(format!(
                    "encoder_hidden_states must be [{b}, tokens, {}] for a sample of batch {b}, \
                     got {:?}",
                    cross_dims.first().copied().unwrap_or(0),
                    ehs.dims()
                )))
            }
        }
        for (name, t) in [
            ("text_embeds", &cond.text_embeds),
            ("time_ids", &cond.time_ids),
        ] {
            if t.rank() != 2 || t.dim(0)? != b {
                return Err(Error::invalid(format!(
                    "{name} must be [{b}, width] for a sample of batch {b}, got {:?}",
                    t.dims()
                )));
            }
        }
        Ok(b)
    }
}
