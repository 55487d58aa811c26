//! The UNet's levels: [`DownBlock2D`], [`CrossAttnDownBlock2D`], [`UNetMidBlock2DCrossAttn`],
//! [`UpBlock2D`] and [`CrossAttnUpBlock2D`], each a stack of resnets (with transformers in the
//! cross-attention variants) and an optional resampler.

use candle_core::Tensor;

use super::attention::{LinearVisitor, Transformer2DModel};
use super::config::{DownBlockSpec, TransformerSpec, UpBlockSpec};
use crate::error::{Error, Result};
use crate::layers::resnet::ResnetConfig;
use crate::layers::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::loading::Weights;

/// What every resnet of the UNet shares: timestep-embedding width and group-norm settings.
#[derive(Debug, Clone, Copy)]
pub struct BlockContext {
    /// Width of the timestep embedding.
    pub temb_channels: usize,
    /// `norm_num_groups`.
    pub groups: usize,
    /// `norm_eps`.
    pub eps: f64,
}

impl BlockContext {
    fn resnet(
        &self,
        w: &Weights,
        in_channels: usize,
        out_channels: usize,
    ) -> Result<ResnetBlock2D> {
        ResnetBlock2D::new(
            w,
            &ResnetConfig {
                in_channels,
                out_channels,
                temb_channels: Some(self.temb_channels),
                groups: self.groups,
                eps: self.eps,
            },
        )
    }
}

fn transformers(
    w: &Weights,
    specs: &[TransformerSpec],
    groups: usize,
) -> Result<Vec<Transformer2DModel>> {
    let w = w.pp("attentions");
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| Transformer2DModel::new(&w.pp(i), spec, groups))
        .collect()
}

fn visit_transformers(
    attentions: &mut [Transformer2DModel],
    prefix: &str,
    f: &mut LinearVisitor<'_>,
) -> Result<()> {
    for (i, t) in attentions.iter_mut().enumerate() {
        t.visit_linears_mut(&format!("{prefix}.attentions.{i}"), f)?;
    }
    Ok(())
}

fn down_resnets(
    w: &Weights,
    spec: &DownBlockSpec,
    ctx: &BlockContext,
) -> Result<Vec<ResnetBlock2D>> {
    let w = w.pp("resnets");
    (0..spec.num_layers)
        .map(|i| {
            let cin = if i == 0 {
                spec.in_channels
            } else {
                spec.out_channels
            };
            ctx.resnet(&w.pp(i), cin, spec.out_channels)
        })
        .collect()
}

fn downsampler(w: &Weights, spec: &DownBlockSpec, padding: usize) -> Result<Option<Downsample2D>> {
    if !spec.add_downsample {
        return Ok(None);
    }
    let c = spec.out_channels;
    Ok(Some(Downsample2D::new(
        &w.pp("downsamplers").pp(0),
        c,
        c,
        padding,
    )?))
}

/// Resnets, each followed by its skip output, then an optional stride-2 downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock2D {
    /// `resnets.i`.
    pub resnets: Vec<ResnetBlock2D>,
    /// `downsamplers.0`.
    pub downsampler: Option<Downsample2D>,
}

impl DownBlock2D {
    /// Loads the block from `w` (e.g. `down_blocks.0`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(
        w: &Weights,
        spec: &DownBlockSpec,
        ctx: &BlockContext,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            resnets: down_resnets(w, spec, ctx)?,
            downsampler: downsampler(w, spec, padding)?,
        })
    }

    /// Applies the block; appends every resnet output (and the downsampled output) to `skips`.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, Some(temb))?;
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// Like [`DownBlock2D`], with a [`Transformer2DModel`] after each resnet.
#[derive(Debug, Clone)]
pub struct CrossAttnDownBlock2D {
    /// `resnets.i`.
    pub resnets: Vec<ResnetBlock2D>,
    /// `attentions.i`.
    pub attentions: Vec<Transformer2DModel>,
    /// `downsamplers.0`.
    pub downsampler: Option<Downsample2D>,
}

impl CrossAttnDownBlock2D {
    /// Loads the block from `w` (e.g. `down_blocks.1`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(
        w: &Weights,
        spec: &DownBlockSpec,
        specs: &[TransformerSpec],
        ctx: &BlockContext,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            resnets: down_resnets(w, spec, ctx)?,
            attentions: transformers(w, specs, ctx.groups)?,
            downsampler: downsampler(w, spec, padding)?,
        })
    }

    /// Calls `f` on every transformer linear layer, named under `prefix` (e.g.
    /// `{prefix}.attentions.0.proj_in`).
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_linears_mut(&mut self, prefix: &str, f: &mut LinearVisitor<'_>) -> Result<()> {
        visit_transformers(&mut self.attentions, prefix, f)
    }

    /// Applies the block; appends every transformer output (and the downsampled output) to
    /// `skips`.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            h = resnet.forward(&h, Some(temb))?;
            h = attn.forward(&h, context)?;
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `resnets.0 → attentions.0 → resnets.1` at the lowest resolution.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2DCrossAttn {
    /// `resnets.0` and `resnets.1`.
    pub resnets: [ResnetBlock2D; 2],
    /// `attentions.0`.
    pub attention: Transformer2DModel,
}

impl UNetMidBlock2DCrossAttn {
    /// Loads the block from `w` (`mid_block`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(w: &Weights, spec: &TransformerSpec, ctx: &BlockContext) -> Result<Self> {
        let c = spec.channels;
        let r = w.pp("resnets");
        Ok(Self {
            resnets: [ctx.resnet(&r.pp(0), c, c)?, ctx.resnet(&r.pp(1), c, c)?],
            attention: Transformer2DModel::new(&w.pp("attentions").pp(0), spec, ctx.groups)?,
        })
    }

    /// Calls `f` on every transformer linear layer, named under `prefix`.
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_linears_mut(&mut self, prefix: &str, f: &mut LinearVisitor<'_>) -> Result<()> {
        self.attention
            .visit_linears_mut(&format!("{prefix}.attentions.0"), f)
    }

    /// Applies the block.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let [first, second] = &self.resnets;
        let h = first.forward(x, Some(temb))?;
        let h = self.attention.forward(&h, context)?;
        second.forward(&h, Some(temb))
    }
}

fn up_resnets(w: &Weights, spec: &UpBlockSpec, ctx: &BlockContext) -> Result<Vec<ResnetBlock2D>> {
    let w = w.pp("resnets");
    (0..spec.num_layers)
        .map(|i| {
            let skip = if i + 1 == spec.num_layers {
                spec.in_channels
            } else {
                spec.out_channels
            };
            let cin = if i == 0 {
                spec.prev_output_channels
            } else {
                spec.out_channels
            };
            ctx.resnet(&w.pp(i), cin + skip, spec.out_channels)
        })
        .collect()
}

fn upsampler(w: &Weights, spec: &UpBlockSpec) -> Result<Option<Upsample2D>> {
    if !spec.add_upsample {
        return Ok(None);
    }
    let c = spec.out_channels;
    Ok(Some(Upsample2D::new(&w.pp("upsamplers").pp(0), c, c)?))
}

/// Takes the deepest remaining skip connection, concatenated on the channels.
fn with_skip(h: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
    let skip = skips.pop().ok_or_else(|| {
        Error::invalid("UNet up block: no skip connection left (down and up blocks do not match)")
    })?;
    Ok(Tensor::cat(&[h, &skip], 1)?)
}

/// Resnets over the input concatenated with the skip connections, then an optional ×2
/// upsampler.
#[derive(Debug, Clone)]
pub struct UpBlock2D {
    /// `resnets.i`.
    pub resnets: Vec<ResnetBlock2D>,
    /// `upsamplers.0`.
    pub upsampler: Option<Upsample2D>,
}

impl UpBlock2D {
    /// Loads the block from `w` (e.g. `up_blocks.2`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(w: &Weights, spec: &UpBlockSpec, ctx: &BlockContext) -> Result<Self> {
        Ok(Self {
            resnets: up_resnets(w, spec, ctx)?,
            upsampler: upsampler(w, spec)?,
        })
    }

    /// Applies the block, consuming one skip connection per resnet from the end of `skips`.
    ///
    /// # Errors
    /// Tensor failures; [`Error::InvalidArgument`] when `skips` runs out.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&with_skip(&h, skips)?, Some(temb))?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&h, None),
            None => Ok(h),
        }
    }
}

/// Like [`UpBlock2D`], with a [`Transformer2DModel`] after each resnet.
#[derive(Debug, Clone)]
pub struct CrossAttnUpBlock2D {
    /// `resnets.i`.
    pub resnets: Vec<ResnetBlock2D>,
    /// `attentions.i`.
    pub attentions: Vec<Transformer2DModel>,
    /// `upsamplers.0`.
    pub upsampler: Option<Upsample2D>,
}

impl CrossAttnUpBlock2D {
    /// Loads the block from `w` (e.g. `up_blocks.0`).
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn new(
        w: &Weights,
        spec: &UpBlockSpec,
        specs: &[TransformerSpec],
        ctx: &BlockContext,
    ) -> Result<Self> {
        Ok(Self {
            resnets: up_resnets(w, spec, ctx)?,
            attentions: transformers(w, specs, ctx.groups)?,
            upsampler: upsampler(w, spec)?,
        })
    }

    /// Calls `f` on every transformer linear layer, named under `prefix` (e.g.
    /// `{prefix}.attentions.0.proj_in`).
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn visit_linears_mut(&mut self, prefix: &str, f: &mut LinearVisitor<'_>) -> Result<()> {
        visit_transformers(&mut self.attentions, prefix, f)
    }

    /// Applies the block, consuming one skip connection per resnet from the end of `skips`.
    ///
    /// # Errors
    /// Tensor failures; [`Error::InvalidArgument`] when `skips` runs out.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            h = resnet.forward(&with_skip(&h, skips)?, Some(temb))?;
            h = attn.forward(&h, context)?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&h, None),
            None => Ok(h),
        }
    }
}
