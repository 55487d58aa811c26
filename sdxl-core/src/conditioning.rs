//! SDXL micro-conditioning: sinusoidal (Fourier) features, the time ids built from image sizes,
//! crops and aesthetic scores, and the UNet's text-time add-embedding.
//!
//! The SDXL UNet adds to its timestep embedding an embedding of the pooled text embedding and a
//! few scalars, the *time ids*. How those ids are built differs between diffusers pipelines;
//! [`TimeIdsLayout`] names the three rules and [`MicroConditioning`] holds the values with
//! diffusers' defaults:
//!
//! ```
//! use sdxl_core::conditioning::{MicroConditioning, TimeIdsLayout};
//!
//! let micro = MicroConditioning::new(1024, 1024);
//! let (pos, neg) = micro.rows(TimeIdsLayout::Text2Image);
//! assert_eq!(pos, vec![1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]);
//! assert_eq!(neg, pos);
//! let (pos, neg) = micro.rows(TimeIdsLayout::AestheticScore);
//! assert_eq!((pos[4], neg[4]), (6.0, 2.5));
//! ```

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::loading::Weights;
use crate::unet::embeddings::TimestepEmbedding;
use crate::unet::UNetConfig;

/// Sinusoidal features of the scalars `x` `[N]`, as diffusers' `get_timestep_embedding`.
///
/// With `half = dim / 2`, frequency `i` is `exp(-ln(max_period) * i / (half -
/// downscale_freq_shift))`; the result `[N, dim]` is `[sin(s·x·f), cos(s·x·f)]` (`s` =
/// `scale`), swapped to `[cos, sin]` when `flip_sin_to_cos`, with a zero column appended when
/// `dim` is odd. It is computed in f32 whatever the dtype of `x`, in the same operation order
/// as diffusers (frequencies rounded to f32 exactly as torch rounds them), and returned as f32.
///
/// The SDXL UNet uses it for the timestep (`dim` = `block_out_channels[0]`) and for each time
/// id (`dim` = `addition_time_embed_dim`), with `scale` 1 and `max_period` 10000.
///
/// # Errors
/// [`Error::InvalidArgument`] when `x` is not 1-D or when `dim` leaves no frequencies
/// (`dim / 2 <= downscale_freq_shift`).
pub fn sinusoidal_embedding(
    x: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    scale: f64,
    max_period: f64,
) -> Result<Tensor> {
    if x.rank() != 1 {
        return Err(Error::invalid(format!(
            "sinusoidal embedding: expected a 1-D tensor of scalars, got shape {:?}",
            x.dims()
        )));
    }
    let half = dim / 2;
    let denominator = half as f64 - downscale_freq_shift;
    if half == 0 || denominator <= 0.0 {
        return Err(Error::invalid(format!(
            "sinusoidal embedding: dim {dim} with downscale_freq_shift {downscale_freq_shift} \
             leaves no frequencies"
        )));
    }
    // torch: (f32(-ln P) * arange_f32) / f32(half - shift), then exp, all in f32.
    let neg_log = -(max_period.ln()) as f32;
    let denominator = denominator as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (neg_log * i as f32 / denominator).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), x.device())?;
    let mut args = x
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    if scale != 1.0 {
        args = args.affine(scale, 0.0)?;
    }
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[&cos, &sin], 1)?
    } else {
        Tensor::cat(&[&sin, &cos], 1)?
    };
    if dim % 2 == 1 {
        Ok(emb.pad_with_zeros(1, 0, 1)?)
    } else {
        Ok(emb)
    }
}

/// diffusers' `Timesteps` module: [`sinusoidal_embedding`] with fixed settings (`time_proj`,
/// `add_time_proj`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SinusoidalProjection {
    /// Output width.
    pub dim: usize,
    /// `cos, sin` order when true.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift`.
    pub freq_shift: f64,
}

impl SinusoidalProjection {
    /// Features `[N, dim]` (f32) of the scalars `x` `[N]`, with scale 1 and max period 10000.
    ///
    /// # Errors
    /// See [`sinusoidal_embedding`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        sinusoidal_embedding(
            x,
            self.dim,
            self.flip_sin_to_cos,
            self.freq_shift,
            1.0,
            10000.0,
        )
    }
}

/// Which diffusers pipeline's rules turn a [`MicroConditioning`] into time ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeIdsLayout {
    /// `StableDiffusionXLPipeline` (text-to-image): 6 ids `[orig_h, orig_w, crop_top,
    /// crop_left, target_h, target_w]`. The negative row repeats the positive one unless *both*
    /// negative sizes are set; then it is built from the negative sizes and the negative crop.
    Text2Image,
    /// `StableDiffusionXLImg2ImgPipeline` / inpainting with `requires_aesthetics_score = false`:
    /// 6 ids. The negative row uses the negative sizes (each defaulting to its positive one) and,
    /// a diffusers quirk, the *positive* crop.
    Image2Image,
    /// `requires_aesthetics_score = true` (the refiner): 5 ids `[orig_h, orig_w, crop_top,
    /// crop_left, aesthetic_score]`; the negative row is `[negative original size (default: the
    /// original size), negative crop, negative_aesthetic_score]`.
    AestheticScore,
}

impl TimeIdsLayout {
    /// Number of time ids per row: 6, or 5 with the aesthetic score.
    pub fn num_ids(self) -> usize {
        match self {
            TimeIdsLayout::Text2Image | TimeIdsLayout::Image2Image => 6,
            TimeIdsLayout::AestheticScore => 5,
        }
    }
}

/// SDXL's micro-conditioning values, sizes as `(height, width)` and crops as `(top, left)`, in
/// pixels. Fields left at [`MicroConditioning::new`]'s values give diffusers' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroConditioning {
    /// Size the training image had before resizing (`original_size`).
    pub original_size: (usize, usize),
    /// Top-left corner of the crop (`crops_coords_top_left`); `(0, 0)` gives centred images.
    pub crops_coords_top_left: (usize, usize),
    /// Size of the generated image (`target_size`).
    pub target_size: (usize, usize),
    /// `negative_original_size`; `None` follows the layout's default.
    pub negative_original_size: Option<(usize, usize)>,
    /// `negative_crops_coords_top_left` (diffusers' default `(0, 0)`).
    pub negative_crops_coords_top_left: (usize, usize),
    /// `negative_target_size`; `None` follows the layout's default.
    pub negative_target_size: Option<(usize, usize)>,
    /// `aesthetic_score` of the refiner (default 6.0).
    pub aesthetic_score: f64,
    /// `negative_aesthetic_score` of the refiner (default 2.5).
    pub negative_aesthetic_score: f64,
}

impl MicroConditioning {
    /// diffusers' defaults for an image of `height × width` pixels: original and target size
    /// `(height, width)`, crops `(0, 0)`, no negative sizes, aesthetic scores 6.0 / 2.5.
    pub fn new(height: usize, width: usize) -> Self {
        Self {
            original_size: (height, width),
            crops_coords_top_left: (0, 0),
            target_size: (height, width),
            negative_original_size: None,
            negative_crops_coords_top_left: (0, 0),
            negative_target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }

    /// The positive and negative time-id rows under `layout`'s rules, as f32 values.
    pub fn rows(&self, layout: TimeIdsLayout) -> (Vec<f32>, Vec<f32>) {
        fn sizes(a: (usize, usize), b: (usize, usize), c: (usize, usize)) -> Vec<f32> {
            [a.0, a.1, b.0, b.1, c.0, c.1]
                .iter()
                .map(|v| *v as f32)
                .collect()
        }
        fn aesthetic(a: (usize, usize), b: (usize, usize), score: f64) -> Vec<f32> {
            vec![a.0 as f32, a.1 as f32, b.0 as f32, b.1 as f32, score as f32]
        }
        let (orig, crop, target) = (
            self.original_size,
            self.crops_coords_top_left,
            self.target_size,
        );
        let neg_orig = self.negative_original_size.unwrap_or(orig);
        let neg_target = self.negative_target_size.unwrap_or(target);
        let neg_crop = self.negative_crops_coords_top_left;
        match layout {
            TimeIdsLayout::Text2Image => {
                let pos = sizes(orig, crop, target);
                let neg = match (self.negative_original_size, self.negative_target_size) {
                    (Some(o), Some(t)) => sizes(o, neg_crop, t),
                    _ => pos.clone(),
                };
                (pos, neg)
            }
            TimeIdsLayout::Image2Image => {
                (sizes(orig, crop, target), sizes(neg_orig, crop, neg_target))
            }
            TimeIdsLayout::AestheticScore => (
                aesthetic(orig, crop, self.aesthetic_score),
                aesthetic(neg_orig, neg_crop, self.negative_aesthetic_score),
            ),
        }
    }

    /// The positive and negative time ids, each `[1, n]` f32 on `device`, after checking that
    /// `n` ids and a pooled text embedding of width `pooled_dim` fit the UNet's add-embedding.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the widths do not match (see
    /// [`check_add_embedding_width`]); [`Error::Unsupported`] for a UNet without `text_time`.
    pub fn time_ids(
        &self,
        layout: TimeIdsLayout,
        unet: &UNetConfig,
        pooled_dim: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (d, expected) = unet.text_time_dims()?;
        check_add_embedding_width(layout.num_ids(), pooled_dim, d, expected)?;
        let (pos, neg) = self.rows(layout);
        let n = pos.len();
        Ok((
            Tensor::from_vec(pos, (1, n), device)?,
            Tensor::from_vec(neg, (1, n), device)?,
        ))
    }
}

/// Checks `n_ids * addition_time_embed_dim + pooled_dim == projection_class_embeddings_input_dim`
/// (`expected`), the width the UNet's `add_embedding.linear_1` takes.
///
/// # Errors
/// [`Error::InvalidArgument`] explaining the mismatch: one time id too many or too few means
/// the time ids were built for the other model (the base takes 6, the refiner 5 with the
/// aesthetic score); anything else points at the pooled width or the UNet config.
pub fn check_add_embedding_width(
    n_ids: usize,
    pooled_dim: usize,
    addition_time_embed_dim: usize,
    expected: usize,
) -> Result<()> {
    let passed = n_ids * addition_time_embed_dim + pooled_dim;
    if passed == expected {
        return Ok(());
    }
    let hint = if expected == passed + addition_time_embed_dim {
        "this UNet takes one time id more: it is a base-style UNet (6 ids: original size, crop, \
         target size); build the time ids with TimeIdsLayout::Text2Image or Image2Image, not \
         AestheticScore (the refiner's layout)"
    } else if passed == expected + addition_time_embed_dim {
        "this UNet takes one time id fewer: it is a refiner-style UNet (requires_aesthetics_score, \
         5 ids: original size, crop, aesthetic score); build the time ids with \
         TimeIdsLayout::AestheticScore"
    } else {
        "check the pooled text embedding width (text_encoder_2 projection_dim) and the UNet's \
         addition_time_embed_dim / projection_class_embeddings_input_dim"
    };
    Err(Error::invalid(format!(
        "the UNet's add-embedding takes {expected} inputs (projection_class_embeddings_input_dim), \
         but {n_ids} time ids x addition_time_embed_dim {addition_time_embed_dim} + pooled text \
         embedding width {pooled_dim} = {passed}; {hint}"
    )))
}

/// The UNet's text-time add-embedding (`addition_embed_type = "text_time"`): sinusoidal
/// features of each time id (`add_time_proj`), concatenated after the pooled text embedding,
/// through the `add_embedding` MLP. The result is added to the timestep embedding.
#[derive(Debug, Clone)]
pub struct TextTimeEmbedding {
    add_time_proj: SinusoidalProjection,
    /// The `add_embedding` MLP (`linear_1`, SiLU, `linear_2`).
    pub add_embedding: TimestepEmbedding,
    input_dim: usize,
}

impl TextTimeEmbedding {
    /// Loads `add_embedding.linear_1` / `linear_2` from `w`, the UNet's root prefix.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a config without `text_time`; missing or misshapen tensors.
    pub fn new(w: &Weights, cfg: &UNetConfig) -> Result<Self> {
        let (d, input_dim) = cfg.text_time_dims()?;
        Ok(Self {
            add_time_proj: SinusoidalProjection {
                dim: d,
                flip_sin_to_cos: cfg.flip_sin_to_cos,
                freq_shift: cfg.freq_shift,
            },
            add_embedding: TimestepEmbedding::new(
                &w.pp("add_embedding"),
                input_dim,
                cfg.time_embed_dim(),
            )?,
            input_dim,
        })
    }

    /// `add_time_proj`: features `[B * n, addition_time_embed_dim]` (f32) of the flattened
    /// time ids `[B, n]`.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn fourier_features(&self, time_ids: &Tensor) -> Result<Tensor> {
        self.add_time_proj.forward(&time_ids.flatten_all()?)
    }

    /// The add-embedding `[B, time_embed_dim]` of `text_embeds` `[B, pooled]` and `time_ids`
    /// `[B, n]`, in the dtype of the weights.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for mismatched batch sizes or widths (see
    /// [`check_add_embedding_width`]).
    pub fn forward(&self, text_embeds: &Tensor, time_ids: &Tensor) -> Result<Tensor> {
        let (b, pooled) = dims2(text_embeds, "text_embeds")?;
        let (b_ids, n) = dims2(time_ids, "time_ids")?;
        if b != b_ids {
            return Err(Error::invalid(format!(
                "text_embeds has batch {b} but time_ids has batch {b_ids}"
            )));
        }
        check_add_embedding_width(n, pooled, self.add_time_proj.dim, self.input_dim)?;
        let dtype = self.add_embedding.linear_1.dtype();
        let time_embeds = self
            .fourier_features(time_ids)?
            .reshape((b, n * self.add_time_proj.dim))?
            .to_dtype(dtype)?;
        let add_embeds = Tensor::cat(&[&text_embeds.to_dtype(dtype)?, &time_embeds], 1)?;
        self.add_embedding.forward(&add_embeds)
    }
}

fn dims2(t: &Tensor, name: &str) -> Result<(usize, usize)> {
    match *t.dims() {
        [a, b] => Ok((a, b)),
        _ => Err(Error::invalid(format!(
            "{name} must be 2-D [batch, width], got shape {:?}",
            t.dims()
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sinusoidal_matches_hand_computation() {
        let x = Tensor::new(&[0f32, 2.0], &Device::Cpu).unwrap();
        let e = sinusoidal_embedding(&x, 5, false, 1.0, 1.0, 10000.0).unwrap();
        assert_eq!(e.dims(), &[2, 5]);
        let rows = e.to_vec2::<f32>().unwrap();
        // half = 2, frequencies exp(0) = 1 and exp(-ln(1e4) / 1) = 1e-4.
        assert_eq!(rows[0], vec![0.0, 0.0, 1.0, 1.0, 0.0]);
        let expect = [
            2f32.sin(),
            (2e-4f32).sin(),
            2f32.cos(),
            (2e-4f32).cos(),
            0.0,
        ];
        for (a, b) in rows[1].iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let flipped = sinusoidal_embedding(&x, 4, true, 1.0, 1.0, 10000.0).unwrap();
        let flipped = flipped.to_vec2::<f32>().unwrap();
        assert_eq!(flipped[1][0], 2f32.cos());
        assert_eq!(flipped[1][2], 2f32.sin());
    }

    #[test]
    fn sinusoidal_rejects_bad_input() {
        let x = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            sinusoidal_embedding(&x, 4, true, 0.0, 1.0, 1e4),
            Err(Error::InvalidArgument(_))
        ));
        let x = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            sinusoidal_embedding(&x, 2, true, 1.0, 1.0, 1e4),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn negative_rows_follow_each_pipeline() {
        let mut m = MicroConditioning::new(64, 96);
        m.crops_coords_top_left = (8, 4);
        m.negative_original_size = Some((32, 32));
        // Text-to-image needs both negative sizes; one alone is ignored.
        let (pos, neg) = m.rows(TimeIdsLayout::Text2Image);
        assert_eq!(pos, vec![64.0, 96.0, 8.0, 4.0, 64.0, 96.0]);
        assert_eq!(neg, pos);
        m.negative_target_size = Some((16, 16));
        let (_, neg) = m.rows(TimeIdsLayout::Text2Image);
        assert_eq!(neg, vec![32.0, 32.0, 0.0, 0.0, 16.0, 16.0]);
        // Image-to-image keeps the positive crop in the negative row.
        let (_, neg) = m.rows(TimeIdsLayout::Image2Image);
        assert_eq!(neg, vec![32.0, 32.0, 8.0, 4.0, 16.0, 16.0]);
        let (pos, neg) = m.rows(TimeIdsLayout::AestheticScore);
        assert_eq!(pos, vec![64.0, 96.0, 8.0, 4.0, 6.0]);
        assert_eq!(neg, vec![32.0, 32.0, 0.0, 0.0, 2.5]);
    }

    #[test]
    fn width_mismatch_names_the_likely_mixup() {
        let base = check_add_embedding_width(5, 1280, 256, 2816).unwrap_err();
        assert!(base.to_string().contains("base-style"), "{base}");
        let refiner = check_add_embedding_width(6, 1280, 256, 2560).unwrap_err();
        assert!(refiner.to_string().contains("refiner-style"), "{refiner}");
        assert!(check_add_embedding_width(6, 1280, 256, 2816).is_ok());
    }
}
