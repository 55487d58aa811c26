//! Tiled VAE decoding and encoding, batch slicing, and the memory estimate that chooses between
//! them.
//!
//! The tiling follows diffusers' `AutoencoderKL.tiled_decode` / `_tiled_encode` exactly, so a
//! tiled result matches diffusers' tiled result (`vae.enable_tiling()`):
//!
//! - the tile side in pixels is `tile_sample_min_size` = the config's `sample_size` (1024 for
//!   SDXL; the first entry when it is a `[h, w]` pair), and in latent cells
//!   `tile_latent_min_size` = `sample_size / f` (128 for SDXL, `f` =
//!   [`VaeConfig::downscale_factor`]);
//! - tiles start every `int(tile * (1 - overlap))` input cells (overlap factor 0.25: every 96
//!   latent cells when decoding SDXL, every 768 pixels when encoding), so neighbours share a
//!   quarter of a tile;
//! - each tile is blended into the tile above and the tile to its left over
//!   `int(output_tile * overlap)` rows/columns with the linear ramp of `blend_v` / `blend_h`
//!   (weight `y / extent` for the new tile, in place, in row-major order), and the first
//!   `output_tile - extent` rows and columns of every blended tile are stitched together.
//!
//! Tiles see less context than the whole image (the mid-block attention and the group norms are
//! global), so tiled output differs from untiled output, as it does in diffusers; the blending
//! hides the seams.
//!
//! Memory, SDXL VAE in float32 on CPU: an untiled 1024×1024 decode peaks at about 6 GiB
//! ([`decode_pass_bytes`]; a 256×256 decode measured 364 MiB against an estimate of 384 MiB), an
//! untiled 2048×2048 decode at about 24 GiB. Tiled with the default 1024-pixel tiles, 2048×2048
//! peaks at one tile's 6 GiB; with `tile_sample_size: Some(512)`, at about 1.5 GiB.
//!
//! [`decode`] and [`encode_moments`] choose a [`Strategy`] from [`TilingOptions`]: tiling
//! [`TilingMode::On`] tiles every input larger than one tile (diffusers' `enable_tiling()`),
//! [`TilingMode::Off`] never tiles (diffusers' default), and [`TilingMode::Auto`] (the default)
//! tiles only when the estimated peak memory of an untiled pass ([`decode_pass_bytes`],
//! [`encode_pass_bytes`]) exceeds [`TilingOptions::memory_budget`]. Batches whose estimate
//! exceeds the budget run one sample at a time (diffusers' `enable_slicing()`, identical results).
//! A pass whose estimate exceeds [`TilingOptions::max_pass_bytes`] is refused with
//! [`Error::InvalidArgument`] before anything is computed.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};

use super::config::{SampleSize, VaeConfig};
use super::distribution::DiagonalGaussian;
use super::model::AutoencoderKL;
use crate::error::{Error, Result};

/// diffusers' `tile_overlap_factor`: neighbouring tiles share a quarter of a tile.
pub const DEFAULT_OVERLAP_FACTOR: f64 = 0.25;

/// One GiB.
const GIB: u64 = 1 << 30;

/// Default [`TilingOptions::memory_budget`]: 8 GiB. An untiled float32 decode of one SDXL image of
/// about one megapixel (every SDXL resolution bucket) is estimated below it, so the default
/// output is diffusers' untiled output; 2048×2048 is estimated far above it and is tiled.
pub const DEFAULT_MEMORY_BUDGET: u64 = 8 * GIB;

/// Default [`TilingOptions::max_pass_bytes`]: 32 GiB.
pub const DEFAULT_MAX_PASS_BYTES: u64 = 32 * GIB;

/// Live tensors of the size of the largest decoder activation, counted in float32 because the
/// group norms compute in float32 whatever the dtype (a resnet holds its input, the group
/// norm's centred and normalised copies, the affine products, the SiLU output and the
/// convolution's NHWC copy). Measured on CPU with the fixture VAE: 5.1 in f32 and f16.
const DECODE_LIVE_ACTIVATIONS: u128 = 6;

/// As [`DECODE_LIVE_ACTIVATIONS`] for the encoder, whose whole first level runs at the largest
/// size. Measured on CPU: 7.0 in f32, 6 in f16.
const ENCODE_LIVE_ACTIVATIONS: u128 = 8;

/// The VAE attention materialises at most this many scores at a time
/// ([`VaeAttention`](super::VaeAttention) processes larger inputs in query chunks).
const MAX_ATTENTION_SCORES: u128 = 1 << 24;

/// When to tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TilingMode {
    /// Tile a sample larger than one tile when its untiled pass is estimated above
    /// [`TilingOptions::memory_budget`]; otherwise decode it whole (diffusers' default output).
    #[default]
    Auto,
    /// Tile every sample larger than one tile (diffusers' `enable_tiling()`).
    On,
    /// Never tile (diffusers' default); a pass estimated above [`TilingOptions::max_pass_bytes`]
    /// is refused.
    Off,
}

impl FromStr for TilingMode {
    type Err = Error;

    /// Parses `auto`, `on` or `off` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(Error::invalid(format!(
                "VAE tiling `{s}` (expected auto, on or off)"
            ))),
        }
    }
}

impl fmt::Display for TilingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

/// How the VAE splits large inputs. [`Default`] gives diffusers' tile geometry in
/// [`TilingMode::Auto`].
#[derive(Debug, Clone, PartialEq)]
pub struct TilingOptions {
    /// When to tile.
    pub mode: TilingMode,
    /// Tile side in image pixels; `None` takes the config's `sample_size` as diffusers does
    /// (1024 for SDXL). With the default overlap it must be a multiple of `4 * f` (32 for SDXL).
    pub tile_sample_size: Option<usize>,
    /// Fraction of a tile shared with each neighbour, in `[0, 1)` (diffusers: 0.25).
    pub overlap_factor: f64,
    /// Estimated bytes a pass should stay under: a batch above it runs one sample at a time, and
    /// in [`TilingMode::Auto`] a sample above it is tiled.
    pub memory_budget: u64,
    /// Estimated bytes above which a pass (a whole sample, a batch or one tile) is refused with
    /// [`Error::InvalidArgument`] before it starts.
    pub max_pass_bytes: u64,
}

impl Default for TilingOptions {
    fn default() -> Self {
        Self {
            mode: TilingMode::Auto,
            tile_sample_size: None,
            overlap_factor: DEFAULT_OVERLAP_FACTOR,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_pass_bytes: DEFAULT_MAX_PASS_BYTES,
        }
    }
}

impl TilingOptions {
    /// The default options with another mode.
    pub fn with_mode(mode: TilingMode) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }

    /// The tile geometry these options give for `cfg`.
    ///
    /// # Errors
    /// As [`TileGeometry::new`].
    pub fn geometry(&self, cfg: &VaeConfig) -> Result<TileGeometry> {
        let sample = match (self.tile_sample_size, &cfg.sample_size) {
            (Some(s), _) => s,
            (None, SampleSize::Square(s)) => *s,
            (None, SampleSize::Rect(v)) => v.first().copied().unwrap_or_default(),
        };
        TileGeometry::new(sample, cfg.downscale_factor(), self.overlap_factor)
    }
}

/// The sizes of a tiling, in diffusers' terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileGeometry {
    /// Tile side in image pixels (`tile_sample_min_size`).
    pub sample: usize,
    /// Tile side in latent cells (`tile_latent_min_size` = `sample / f`).
    pub latent: usize,
    /// `tile_overlap_factor`.
    pub overlap_factor: f64,
    /// The VAE's downscale factor `f`.
    pub factor: usize,
}

/// One direction of a tiling: input tiles of `input` cells every `stride` cells; each output
/// tile is blended over `blend` cells and its first `keep` cells are kept.
#[derive(Debug, Clone, Copy)]
struct TilePlan {
    input: usize,
    stride: usize,
    blend: usize,
    keep: usize,
}

impl TileGeometry {
    /// The geometry of `sample`-pixel tiles for a VAE with downscale factor `factor`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the overlap is outside `[0, 1)`, the tile is smaller than
    /// `factor` pixels, or the tiles do not stitch back to the input's size (the kept part of each
    /// tile must equal the tile stride: with overlap 0.25, any multiple of `4 * factor` works).
    pub fn new(sample: usize, factor: usize, overlap_factor: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&overlap_factor) {
            return Err(Error::invalid(format!(
                "VAE tile overlap factor must be in [0, 1), got {overlap_factor}"
            )));
        }
        let factor = factor.max(1);
        let geometry = Self {
            sample,
            latent: sample / factor,
            overlap_factor,
            factor,
        };
        let (dec, enc) = (geometry.decode_plan(), geometry.encode_plan());
        if geometry.latent == 0
            || dec.stride == 0
            || enc.stride == 0
            || dec.keep != dec.stride * factor
            || enc.keep * factor != enc.stride
        {
            return Err(Error::invalid(format!(
                "VAE tile size {sample} px with overlap {overlap_factor} does not split an image \
                 into evenly stitched tiles for downscale factor {factor} (with overlap 0.25, use \
                 a multiple of {})",
                4 * factor
            )));
        }
        Ok(geometry)
    }

    /// Latent tiles → image tiles: diffusers' `tiled_decode` sizes.
    fn decode_plan(&self) -> TilePlan {
        let blend = scaled(self.sample, self.overlap_factor);
        TilePlan {
            input: self.latent,
            stride: scaled(self.latent, 1.0 - self.overlap_factor),
            blend,
            keep: self.sample.saturating_sub(blend),
        }
    }

    /// Image tiles → latent tiles: diffusers' `_tiled_encode` sizes.
    fn encode_plan(&self) -> TilePlan {
        let blend = scaled(self.latent, self.overlap_factor);
        TilePlan {
            input: self.sample,
            stride: scaled(self.sample, 1.0 - self.overlap_factor),
            blend,
            keep: self.latent.saturating_sub(blend),
        }
    }
}

/// Python's `int(n * x)` for non-negative `x`.
fn scaled(n: usize, x: f64) -> usize {
    (n as f64 * x) as usize
}

/// How one VAE call runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// The whole batch in one pass.
    Whole,
    /// One sample at a time, each in one pass (same result as [`Strategy::Whole`]).
    PerSample,
    /// One sample at a time, each in overlapping tiles of this geometry.
    Tiled(TileGeometry),
}

/// Which VAE half a pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Decode,
    Encode,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Self::Decode => "decoding",
            Self::Encode => "encoding",
        }
    }
}

/// The estimate from the largest activation's element count per sample (with `live` copies)
/// and the attention's token count per sample: the larger of the activations' and the
/// attention's peaks, which come at different times.
fn pass_bytes(live: u128, batch: usize, largest: u128, tokens: u128, dtype: DType) -> u64 {
    let size = dtype.size_in_bytes() as u128;
    let b = batch as u128;
    let activations = (live * size.max(4))
        .saturating_mul(b)
        .saturating_mul(largest);
    let scores = b
        .saturating_mul(tokens)
        .saturating_mul(tokens)
        .min(MAX_ATTENTION_SCORES);
    // The scores and their softmax, in float32 for half precision plus the half result.
    let per_score = 2 * size.max(4) + if size < 4 { size } else { 0 };
    u64::try_from(activations.max(scores * per_score)).unwrap_or(u64::MAX)
}

/// Estimated peak memory in bytes of one untiled decoder pass over latents
/// `[batch, latent_channels, latent_h, latent_w]` in `dtype`, weights excluded.
///
/// The estimate is six float32 copies of the largest activation (for SDXL: 256 channels at full
/// image resolution, 1 GiB for a 1024×1024 image, so 6 GiB) or the attention's scores, whichever
/// is larger; it was calibrated on CPU, where a measured pass stays 10-20% below it. Half
/// precision saves little because the group norms compute in float32. It saturates at
/// `u64::MAX` instead of overflowing.
pub fn decode_pass_bytes(
    cfg: &VaeConfig,
    batch: usize,
    latent_h: usize,
    latent_w: usize,
    dtype: DType,
) -> u64 {
    let tokens = (latent_h as u128).saturating_mul(latent_w as u128);
    let last = cfg.block_out_channels.last().copied().unwrap_or_default() as u128;
    let mut largest = tokens.saturating_mul(last.max(cfg.latent_channels as u128));
    let mut cells = tokens;
    let mut in_channels = last;
    let levels = cfg.block_out_channels.len();
    for (i, &c) in cfg.block_out_channels.iter().rev().enumerate() {
        let c = c as u128;
        largest = largest.max(cells.saturating_mul(in_channels.max(c)));
        if i + 1 < levels {
            cells = cells.saturating_mul(4);
            largest = largest.max(cells.saturating_mul(c));
        }
        in_channels = c;
    }
    largest = largest.max(cells.saturating_mul(cfg.out_channels as u128));
    pass_bytes(DECODE_LIVE_ACTIVATIONS, batch, largest, tokens, dtype)
}

/// Estimated peak memory in bytes of one untiled encoder pass over images
/// `[batch, in_channels, height, width]` in `dtype`, weights excluded (see
/// [`decode_pass_bytes`]).
pub fn encode_pass_bytes(
    cfg: &VaeConfig,
    batch: usize,
    height: usize,
    width: usize,
    dtype: DType,
) -> u64 {
    let mut cells = (height as u128).saturating_mul(width as u128);
    let first = cfg.block_out_channels.first().copied().unwrap_or_default() as u128;
    let mut largest = cells.saturating_mul(first.max(cfg.in_channels as u128));
    let mut in_channels = first;
    let levels = cfg.block_out_channels.len();
    for (i, &c) in cfg.block_out_channels.iter().enumerate() {
        let c = c as u128;
        largest = largest.max(cells.saturating_mul(in_channels.max(c)));
        if i + 1 < levels {
            cells /= 4;
        }
        in_channels = c;
    }
    largest = largest.max(cells.saturating_mul(2 * cfg.latent_channels as u128));
    // `cells` is now the latent size: the mid-block attention's token count.
    pass_bytes(ENCODE_LIVE_ACTIVATIONS, batch, largest, cells, dtype)
}

/// `n` bytes in GiB for messages.
fn gib(n: u64) -> String {
    format!("{:.2} GiB", n as f64 / GIB as f64)
}

/// Chooses how to run a pass over `batch` samples of `h`×`w` input cells.
fn choose(
    vae: &AutoencoderKL,
    direction: Direction,
    (batch, h, w): (usize, usize, usize),
    options: &TilingOptions,
) -> Result<Strategy> {
    let cfg = vae.config();
    let dtype = vae.dtype();
    let estimate = |b: usize, h: usize, w: usize| match direction {
        Direction::Decode => decode_pass_bytes(cfg, b, h, w, dtype),
        Direction::Encode => encode_pass_bytes(cfg, b, h, w, dtype),
    };
    let per_sample = estimate(1, h, w);
    let geometry = match options.mode {
        TilingMode::Off => None,
        TilingMode::On | TilingMode::Auto => {
            let g = options.geometry(cfg)?;
            let tile = match direction {
                Direction::Decode => g.latent,
                Direction::Encode => g.sample,
            };
            let larger = h > tile || w > tile;
            let wanted = options.mode == TilingMode::On || per_sample > options.memory_budget;
            (larger && wanted).then_some((g, tile))
        }
    };
    let what = direction.name();
    if let Some((g, tile)) = geometry {
        let one_tile = estimate(1, tile.min(h), tile.min(w));
        if one_tile > options.max_pass_bytes {
            return Err(Error::invalid(format!(
                "VAE {what} with {} px tiles needs about {} per tile, above the limit of {}; use \
                 smaller tiles",
                g.sample,
                gib(one_tile),
                gib(options.max_pass_bytes)
            )));
        }
        return Ok(Strategy::Tiled(g));
    }
    let whole = estimate(batch, h, w);
    let (strategy, pass) = if batch > 1 && whole > options.memory_budget {
        (Strategy::PerSample, per_sample)
    } else {
        (Strategy::Whole, whole)
    };
    if pass > options.max_pass_bytes {
        return Err(Error::invalid(format!(
            "VAE {what} of a {h}x{w} input without tiling needs about {}, above the limit of {}; \
             enable VAE tiling (TilingMode::Auto or On; CLI `--vae-tiling auto`)",
            gib(pass),
            gib(options.max_pass_bytes)
        )));
    }
    Ok(strategy)
}

/// `(batch, h, w)` of a 4-D input, or an [`Error::InvalidArgument`] naming `what`.
fn dims(x: &Tensor, what: &str) -> Result<(usize, usize, usize)> {
    match x.dims() {
        &[b, _, h, w] => Ok((b, h, w)),
        d => Err(Error::invalid(format!(
            "{what} must be [B, C, H, W], got {d:?}"
        ))),
    }
}

/// How [`decode`] would run `z` `[B, latent_channels, h, w]` under `options`.
///
/// # Errors
/// [`Error::InvalidArgument`] for a non 4-D `z`, bad tile options, or a pass estimated above
/// [`TilingOptions::max_pass_bytes`].
pub fn decode_strategy(
    vae: &AutoencoderKL,
    z: &Tensor,
    options: &TilingOptions,
) -> Result<Strategy> {
    choose(
        vae,
        Direction::Decode,
        dims(z, "VAE decode input")?,
        options,
    )
}

/// How [`encode_moments`] would run `x` `[B, in_channels, H, W]` under `options`.
///
/// # Errors
/// As [`decode_strategy`], and for `H`, `W` not multiples of the downscale factor.
pub fn encode_strategy(
    vae: &AutoencoderKL,
    x: &Tensor,
    options: &TilingOptions,
) -> Result<Strategy> {
    let (b, h, w) = dims(x, "VAE encode input")?;
    let f = vae.config().downscale_factor();
    if h == 0 || w == 0 || h % f != 0 || w % f != 0 {
        return Err(Error::invalid(format!(
            "VAE encode input is {h}x{w}; height and width must be positive multiples of {f}"
        )));
    }
    choose(vae, Direction::Encode, (b, h, w), options)
}

/// Runs `pass` on each sample of `x` and concatenates the results along the batch.
fn per_sample(x: &Tensor, pass: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let outputs = (0..x.dim(0)?)
        .map(|i| pass(&x.narrow(0, i, 1)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&outputs, 0)?)
}

/// Decodes RAW latents `z` `[B, latent_channels, h, w]` like [`AutoencoderKL::decode`], tiled or
/// sliced as [`decode_strategy`] decides.
///
/// # Errors
/// Those of [`decode_strategy`] and [`AutoencoderKL::decode`].
pub fn decode(vae: &AutoencoderKL, z: &Tensor, options: &TilingOptions) -> Result<Tensor> {
    match decode_strategy(vae, z, options)? {
        Strategy::Whole => vae.decode(z),
        Strategy::PerSample => per_sample(z, |s| vae.decode(s)),
        Strategy::Tiled(g) => per_sample(z, |s| tiled_decode(vae, s, &g)),
    }
}

/// The encoder's raw moments like [`AutoencoderKL::encode_moments`], tiled or sliced as
/// [`encode_strategy`] decides.
///
/// # Errors
/// Those of [`encode_strategy`] and [`AutoencoderKL::encode_moments`].
pub fn encode_moments(vae: &AutoencoderKL, x: &Tensor, options: &TilingOptions) -> Result<Tensor> {
    match encode_strategy(vae, x, options)? {
        Strategy::Whole => vae.encode_moments(x),
        Strategy::PerSample => per_sample(x, |s| vae.encode_moments(s)),
        Strategy::Tiled(g) => per_sample(x, |s| tiled_encode_moments(vae, s, &g)),
    }
}

/// The latent posterior like [`AutoencoderKL::encode`], from [`encode_moments`].
///
/// # Errors
/// As [`encode_moments`].
pub fn encode(
    vae: &AutoencoderKL,
    x: &Tensor,
    options: &TilingOptions,
) -> Result<DiagonalGaussian> {
    DiagonalGaussian::from_moments(&encode_moments(vae, x, options)?)
}

/// diffusers' `tiled_decode`: decodes `z` in overlapping latent tiles of `geometry` and blends
/// them, whatever its size. As in diffusers, tiles start every stride (3/4 of a tile by
/// default), so a latent of exactly one tile is still split in two; [`decode`] tiles only
/// latents larger than a tile.
///
/// # Errors
/// Those of [`AutoencoderKL::decode`] on each tile.
pub fn tiled_decode(vae: &AutoencoderKL, z: &Tensor, geometry: &TileGeometry) -> Result<Tensor> {
    run_tiled(z, geometry.decode_plan(), |tile| vae.decode(tile))
}

/// diffusers' `_tiled_encode`: the raw moments of `x` from overlapping image tiles of
/// `geometry`, blended.
///
/// # Errors
/// [`Error::InvalidArgument`] for an input whose sides are not multiples of the downscale factor,
/// and those of [`AutoencoderKL::encode_moments`] on each tile.
pub fn tiled_encode_moments(
    vae: &AutoencoderKL,
    x: &Tensor,
    geometry: &TileGeometry,
) -> Result<Tensor> {
    let (_, h, w) = dims(x, "VAE encode input")?;
    let f = geometry.factor;
    if h % f != 0 || w % f != 0 {
        return Err(Error::invalid(format!(
            "VAE encode input is {h}x{w}; height and width must be positive multiples of {f}"
        )));
    }
    run_tiled(x, geometry.encode_plan(), |tile| vae.encode_moments(tile))
}

/// Applies `pass` to overlapping tiles of `x` (dims 2 and 3) and stitches the blended results,
/// as diffusers' tiled loops do. Only the previous row of blended tiles is kept.
fn run_tiled(
    x: &Tensor,
    plan: TilePlan,
    pass: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let stride = plan.stride.max(1);
    let mut above: Vec<Tensor> = Vec::new();
    let mut rows = Vec::with_capacity(h.div_ceil(stride));
    for i in (0..h).step_by(stride) {
        let band = x.narrow(2, i, plan.input.min(h - i))?;
        let mut current: Vec<Tensor> = Vec::with_capacity(w.div_ceil(stride));
        let mut kept = Vec::with_capacity(w.div_ceil(stride));
        for (col, j) in (0..w).step_by(stride).enumerate() {
            let mut tile = pass(&band.narrow(3, j, plan.input.min(w - j))?)?;
            if let Some(a) = above.get(col) {
                tile = blend(a, &tile, plan.blend, 2)?;
            }
            if let Some(left) = current.last() {
                tile = blend(left, &tile, plan.blend, 3)?;
            }
            let (_, _, th, tw) = tile.dims4()?;
            kept.push(
                tile.narrow(2, 0, plan.keep.min(th))?
                    .narrow(3, 0, plan.keep.min(tw))?,
            );
            current.push(tile);
        }
        rows.push(Tensor::cat(&kept, 3)?);
        above = current;
    }
    Ok(Tensor::cat(&rows, 2)?)
}

/// diffusers' `blend_v` (`dim` 2) / `blend_h` (`dim` 3): the first `extent` rows (columns) of
/// `b` become `a[-extent + y] * (1 - y/extent) + b[y] * (y/extent)`, with `extent` capped by both
/// tiles' sizes.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let (a_len, b_len) = (a.dim(dim)?, b.dim(dim)?);
    let extent = extent.min(a_len).min(b_len);
    if extent == 0 {
        return Ok(b.clone());
    }
    let ramp = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
        let values: Vec<f32> = (0..extent)
            .map(|y| f(y as f64 / extent as f64) as f32)
            .collect();
        let mut shape = [1usize; 4];
        if let Some(s) = shape.get_mut(dim) {
            *s = extent;
        }
        Ok(Tensor::from_vec(values, &shape, b.device())?.to_dtype(b.dtype())?)
    };
    let old = a
        .narrow(dim, a_len - extent, extent)?
        .broadcast_mul(&ramp(&|t| 1.0 - t)?)?;
    let new = b.narrow(dim, 0, extent)?.broadcast_mul(&ramp(&|t| t)?)?;
    let head = (old + new)?;
    if extent == b_len {
        return Ok(head);
    }
    Ok(Tensor::cat(
        &[head, b.narrow(dim, extent, b_len - extent)?],
        dim,
    )?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::test_support::max_abs_diff;

    fn sdxl_like(channels: &[usize], sample_size: usize) -> VaeConfig {
        VaeConfig {
            block_out_channels: channels.to_vec(),
            down_block_types: vec![super::super::config::DOWN_ENCODER_BLOCK.into(); 4],
            up_block_types: vec![super::super::config::UP_DECODER_BLOCK.into(); 4],
            sample_size: SampleSize::Square(sample_size),
            ..VaeConfig::default()
        }
    }

    #[test]
    fn diffusers_geometry_for_sdxl() {
        let cfg = sdxl_like(&[128, 256, 512, 512], 1024);
        let g = TilingOptions::default().geometry(&cfg).unwrap();
        assert_eq!((g.sample, g.latent), (1024, 128));
        let dec = g.decode_plan();
        assert_eq!(
            (dec.input, dec.stride, dec.blend, dec.keep),
            (128, 96, 256, 768)
        );
        let enc = g.encode_plan();
        assert_eq!(
            (enc.input, enc.stride, enc.blend, enc.keep),
            (1024, 768, 32, 96)
        );
    }

    #[test]
    fn uneven_tiles_and_bad_overlaps_are_rejected() {
        assert!(TileGeometry::new(1000, 8, 0.25).is_err());
        assert!(TileGeometry::new(4, 8, 0.25).is_err());
        assert!(TileGeometry::new(1024, 8, 1.0).is_err());
        assert!(TileGeometry::new(1024, 8, -0.1).is_err());
        assert!(TileGeometry::new(512, 8, 0.25).is_ok());
        assert!(TileGeometry::new(512, 8, 0.0).is_ok());
    }

    #[test]
    fn sdxl_estimates_put_one_megapixel_under_the_budget_and_2048_over_it() {
        let cfg = sdxl_like(&[128, 256, 512, 512], 1024);
        // 256 channels at full resolution is the largest decoder activation.
        let one = decode_pass_bytes(&cfg, 1, 128, 128, DType::F32);
        assert!((6 * GIB..DEFAULT_MEMORY_BUDGET).contains(&one), "{one}");
        let wide = decode_pass_bytes(&cfg, 1, 1536 / 8, 640 / 8, DType::F32);
        assert!(wide < DEFAULT_MEMORY_BUDGET, "{wide}");
        let big = decode_pass_bytes(&cfg, 1, 256, 256, DType::F32);
        assert!(
            big > DEFAULT_MEMORY_BUDGET && big < DEFAULT_MAX_PASS_BYTES,
            "{big}"
        );
        assert!(decode_pass_bytes(&cfg, 1, 128, 128, DType::F16) <= one);
        assert_eq!(
            decode_pass_bytes(&cfg, usize::MAX, usize::MAX, usize::MAX, DType::F32),
            u64::MAX
        );
        let enc = encode_pass_bytes(&cfg, 1, 1024, 1024, DType::F32);
        assert!(enc > GIB && enc < one, "{enc}");
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [TilingMode::Auto, TilingMode::On, TilingMode::Off] {
            assert_eq!(m.to_string().parse::<TilingMode>().unwrap(), m);
        }
        assert_eq!("ON".parse::<TilingMode>().unwrap(), TilingMode::On);
        assert!(matches!(
            "sometimes".parse::<TilingMode>(),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn blend_is_diffusers_linear_ramp() {
        let dev = Device::Cpu;
        let a = Tensor::full(10f32, (1, 1, 4, 2), &dev).unwrap();
        let b = Tensor::full(2f32, (1, 1, 3, 2), &dev).unwrap();
        let out = blend(&a, &b, 2, 2).unwrap();
        let rows: Vec<f32> = out
            .narrow(3, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // y = 0: all a; y = 1: half and half; then b untouched.
        assert_eq!(rows, [10.0, 6.0, 2.0]);
        // The extent is capped by the smaller tile.
        let a = Tensor::full(10f32, (1, 1, 2, 4), &dev).unwrap();
        let b = Tensor::full(2f32, (1, 1, 2, 2), &dev).unwrap();
        let out = blend(&a, &b, 8, 3).unwrap();
        let cols: Vec<f32> = out
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(cols, [10.0, 6.0]);
    }

    /// Stitching a pointwise "model" (nearest ×`k` upsampling, or ÷`k` subsampling) reproduces
    /// the untiled result exactly: the blend weights sum to one and the kept parts cover the
    /// output once.
    #[test]
    fn stitching_a_pointwise_pass_is_exact() {
        let dev = Device::Cpu;
        let g = TileGeometry::new(64, 8, DEFAULT_OVERLAP_FACTOR).unwrap();
        for (h, w) in [(8, 12), (20, 9), (7, 30), (8, 8), (1, 17)] {
            let z = Tensor::arange(0f32, (2 * h * w) as f32, &dev)
                .unwrap()
                .reshape((1, 2, h, w))
                .unwrap();
            let up = |t: &Tensor| -> Result<Tensor> {
                let (_, _, th, tw) = t.dims4()?;
                Ok(t.upsample_nearest2d(th * 8, tw * 8)?)
            };
            let tiled = run_tiled(&z, g.decode_plan(), up).unwrap();
            let whole = up(&z).unwrap();
            assert_eq!(tiled.dims(), whole.dims(), "{h}x{w}");
            let diff: f32 = max_abs_diff(&tiled, &whole);
            assert!(diff < 1e-3, "{h}x{w}: {diff}");
        }
        for (h, w) in [(128, 72), (64, 64), (200, 8)] {
            let x = Tensor::arange(0f32, (h * w) as f32, &dev)
                .unwrap()
                .reshape((1, 1, h, w))
                .unwrap();
            let down = |t: &Tensor| -> Result<Tensor> { Ok(t.avg_pool2d(8)?) };
            let tiled = run_tiled(&x, g.encode_plan(), down).unwrap();
            let whole = down(&x).unwrap();
            assert_eq!(tiled.dims(), whole.dims(), "{h}x{w}");
            let diff: f32 = max_abs_diff(&tiled, &whole);
            assert!(diff < 1e-2, "{h}x{w}: {diff}");
        }
    }
}
