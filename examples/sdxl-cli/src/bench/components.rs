//! The model rows: UNets, VAE, text encoders and a whole generation, each loaded from a
//! diffusers folder in one dtype, timed on seeded inputs shaped as `torch_baseline.py`'s, and
//! dropped. Also the configs-only FLOP table (`--flops-only`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdxl_core::conditioning::{MicroConditioning, TimeIdsLayout};
use sdxl_core::loading::{read_json, ModelIndex};
use sdxl_core::pipeline::{generate, GenerateParams, LoadOptions, RunControl, SdxlModel};
use sdxl_core::rng::TorchRng;
use sdxl_core::text::clip::{ClipTextConfig, ClipTextModel};
use sdxl_core::text::tokenizer::ClipTokenizer;
use sdxl_core::unet::{OneOrMany, UNet2DConditionModel, UNetConditioning, UNetConfig};
use sdxl_core::vae::{AutoencoderKL, VaeConfig};
use serde_json::{json, Map, Value};

use super::args::{BenchArgs, Component};
use super::flops::{self, Flops};
use super::report::Reporter;
use super::{dtype_names, Bench, Row};

/// Text tokens of the UNet's conditioning (one CLIP context), as the pipelines pass them.
const PROMPT_TOKENS: usize = 77;
/// The UNet timestep of the forward rows.
const TIMESTEP: f64 = 500.0;
/// Content tokens of the text-encoder rows (then end-of-text and padding), as torch's rows.
const CONTENT_TOKENS: usize = 11;
/// The prompt of the whole-generation rows.
const PIPELINE_PROMPT: &str = "a photo of a cat";

/// Seeds of the inputs (those of `torch_baseline.py`).
const UNET_SEED: u64 = 123;
const VAE_DECODE_SEED: u64 = 7;
const VAE_ENCODE_SEED: u64 = 8;
const TOKENS_SEED: u64 = 9;

/// An error as the message `run` prints.
fn msg<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn extra(fields: &[(&str, usize)]) -> Map<String, Value> {
    fields
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect()
}

/// The VAE's image/latent factor, from `<dir>/vae/config.json`.
fn vae_factor(dir: &Path) -> Result<usize, String> {
    let cfg: VaeConfig =
        read_json(&dir.join("vae").join("config.json"), "VAE config").map_err(msg)?;
    Ok(cfg.downscale_factor())
}

/// The time-id layout of a folder: the refiner's (aesthetic score) or the base's.
fn time_ids_layout(dir: &Path) -> Result<TimeIdsLayout, String> {
    Ok(
        if ModelIndex::read(dir)
            .map_err(msg)?
            .requires_aesthetics_score
        {
            TimeIdsLayout::AestheticScore
        } else {
            TimeIdsLayout::Text2Image
        },
    )
}

/// The width of `encoder_hidden_states`.
fn context_width(cfg: &UNetConfig) -> usize {
    match &cfg.cross_attention_dim {
        OneOrMany::One(d) => *d,
        OneOrMany::Many(d) => d.first().copied().unwrap_or(0),
    }
}

/// Seeded UNet inputs as `torch_baseline.py` draws them: the sample, then the text context,
/// then the pooled embedding; time ids for a `px`-pixel square image.
fn unet_inputs(
    unet: &UNet2DConditionModel,
    layout: TimeIdsLayout,
    (batch, side, px): (usize, usize, usize),
    device: &Device,
) -> sdxl_core::Result<(Tensor, UNetConditioning)> {
    let cfg = unet.config();
    let dtype = unet.dtype();
    let (d, add_in) = cfg.text_time_dims()?;
    let pooled = add_in.checked_sub(layout.num_ids() * d).ok_or_else(|| {
        sdxl_core::Error::InvalidArgument(format!(
            "projection_class_embeddings_input_dim {add_in} is smaller than {} time ids × {d}",
            layout.num_ids()
        ))
    })?;
    let mut rng = TorchRng::new(UNET_SEED);
    let sample = rng.randn(&[batch, cfg.in_channels, side, side], dtype, device)?;
    let context = rng.randn(&[batch, PROMPT_TOKENS, context_width(cfg)], dtype, device)?;
    let text_embeds = rng.randn(&[batch, pooled], dtype, device)?;
    let (ids, _) = MicroConditioning::new(px, px).rows(layout);
    let n = ids.len();
    let time_ids = Tensor::from_vec(ids, (1, n), device)?
        .repeat((batch, 1))?
        .to_dtype(dtype)?;
    let cond = UNetConditioning {
        encoder_hidden_states: context,
        text_embeds,
        time_ids,
    };
    Ok((sample, cond))
}

/// `[batch, seq]` ids: start token, random content, end token, padding (torch's rows use the
/// same positions).
fn token_ids(
    tok: &ClipTokenizer,
    vocab: usize,
    batch: usize,
    device: &Device,
) -> Result<Tensor, String> {
    let seq = tok.max_length();
    // Content ids below the special tokens (which sit at the end of CLIP's vocabulary).
    let limit = u64::from(tok.bos_id().min(tok.eos_id())).min(vocab as u64);
    let mut state = TOKENS_SEED;
    let mut ids = Vec::with_capacity(batch * seq);
    for _ in 0..batch {
        let mut row = vec![tok.bos_id()];
        for _ in 0..CONTENT_TOKENS.min(seq.saturating_sub(2)) {
            // Knuth's MMIX LCG: reproducible without a dependency.
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let id = 1 + (state >> 33) % limit.saturating_sub(1).max(1);
            row.push(u32::try_from(id).map_err(msg)?);
        }
        row.push(tok.eos_id());
        row.resize(seq, tok.pad_id());
        ids.extend(row);
    }
    Tensor::from_vec(ids, (batch, seq), device).map_err(msg)
}

/// The fraction of the schedule at which the base hands off to the refiner (the CLI's
/// `--refiner-start` default and diffusers' documented `denoising_end=0.8`).
const REFINER_START: f64 = 0.8;

/// FLOPs of one stage of a generation run by `model`: its text encoders on the prompt (and on
/// the negative prompt when that is encoded too) and `unet_steps` UNet evaluations.
fn stage_flops(
    model: &SdxlModel,
    params: &GenerateParams,
    unet_steps: usize,
) -> Result<Flops, String> {
    let text = model.text().map_err(msg)?;
    let encoders = text
        .encoder_1
        .iter()
        .chain(std::iter::once(&text.encoder_2));
    let clip = encoders.fold(Flops::default(), |sum, (tok, te)| {
        sum.plus(flops::clip_forward(
            te.config(),
            1,
            tok.max_length(),
            te.has_projection(),
        ))
    });
    let negatives_encoded =
        !(model.index.force_zeros_for_empty_prompt && params.prompts.negative_prompt.is_none());
    let f = model.vae_config().downscale_factor();
    let latent = (params.height / f, params.width / f);
    let cfg_batch = if params.guidance_scale > 1.0 { 2 } else { 1 } * params.num_images;
    let context = text.encoder_2.0.max_length();
    let unet = flops::unet_forward(model.unet_config(), cfg_batch, latent, context)?;
    Ok(clip
        .times(if negatives_encoded { 2 } else { 1 })
        .plus(unet.times(unet_steps as u64)))
}

/// How many of the schedule's steps the base runs before handing off at `start`: diffusers'
/// `denoising_end` keeps the timesteps at or above `round(T − start·T)`. The refiner runs the
/// rest (the first-order Euler scheduler of SDXL evaluates the UNet once per step).
fn base_steps(model: &SdxlModel, params: &GenerateParams, start: f64) -> Result<usize, String> {
    let (kind, config) = params
        .scheduler
        .resolve(&model.scheduler_config)
        .map_err(msg)?;
    let mut scheduler = kind.build(&config).map_err(msg)?;
    scheduler.set_timesteps(params.steps).map_err(msg)?;
    let train = config
        .values()
        .get("num_train_timesteps")
        .and_then(Value::as_f64)
        .unwrap_or(1000.0);
    let cutoff = (train - start * train).round_ties_even();
    Ok(scheduler
        .timesteps()
        .iter()
        .filter(|&&t| t >= cutoff)
        .count())
}

/// FLOPs of one whole text-to-image run, with the refiner hand-off when `refiner` is given:
/// each stage's text encoders and UNet steps, then one decode by the model that finishes.
fn pipeline_flops(
    base: &SdxlModel,
    refiner: Option<&SdxlModel>,
    params: &GenerateParams,
) -> Result<Flops, String> {
    let (total, last) = match refiner {
        None => (stage_flops(base, params, params.steps)?, base),
        Some(refiner) => {
            let steps = base_steps(base, params, REFINER_START)?;
            let flops = stage_flops(base, params, steps)?.plus(stage_flops(
                refiner,
                params,
                params.steps.saturating_sub(steps),
            )?);
            (flops, refiner)
        }
    };
    let f = last.vae_config().downscale_factor();
    let latent = (params.height / f, params.width / f);
    let decode = flops::vae_decode(last.vae_config(), latent).times(params.num_images as u64);
    Ok(total.plus(decode))
}

impl Bench<'_> {
    /// The base or refiner UNet forward at each latent side.
    pub(super) fn unet(
        &mut self,
        c: Component,
        dir: &Path,
        dtypes: &[crate::args::DTypeName],
        sizes: &[usize],
    ) -> Result<(), String> {
        let layout = time_ids_layout(dir)?;
        let factor = vae_factor(dir)?;
        let (batch, device) = (self.args.batch, self.device.clone());
        for &d in dtypes {
            let (dtype, name) = dtype_names(d);
            let unet = self.load(c.name(), name, || {
                UNet2DConditionModel::load(&dir.join("unet"), dtype, &device, None)
            })?;
            for &side in sizes {
                let (sample, cond) =
                    unet_inputs(&unet, layout, (batch, side, side * factor), &device)
                        .map_err(msg)?;
                let row = Row {
                    component: c.name(),
                    op: "forward",
                    dtype: name,
                    shape: format!("{batch}x{}x{side}x{side}", unet.config().in_channels),
                    flops: flops::unet_forward(unet.config(), batch, (side, side), PROMPT_TOKENS)?,
                    extra: extra(&[("px", side * factor), ("batch", batch)]),
                };
                self.run_row(row, self.runs(), &mut || {
                    unet.forward(&sample, TIMESTEP, &cond)
                        .map(drop)
                        .map_err(msg)
                });
            }
        }
        Ok(())
    }

    /// VAE decode at each `--vae-sizes` latent side, encode at each `--vae-encode-px`.
    pub(super) fn vae(&mut self, dir: &Path) -> Result<(), String> {
        let (args, device) = (self.args, self.device.clone());
        for &d in &args.dtypes {
            let (dtype, name) = dtype_names(d);
            let vae = self.load("vae", name, || {
                AutoencoderKL::load(&dir.join("vae"), dtype, &device, None)
            })?;
            let cfg = vae.config().clone();
            let factor = cfg.downscale_factor();
            for &side in &args.vae_sizes {
                let shape = [1, cfg.latent_channels, side, side];
                let z = TorchRng::new(VAE_DECODE_SEED)
                    .randn(&shape, dtype, &device)
                    .map_err(msg)?;
                let row = Row {
                    component: "vae",
                    op: "decode",
                    dtype: name,
                    shape: format!("1x{}x{side}x{side}", cfg.latent_channels),
                    flops: flops::vae_decode(&cfg, (side, side)),
                    extra: extra(&[("px", side * factor), ("batch", 1)]),
                };
                self.run_row(row, self.runs(), &mut || {
                    vae.decode(&z).map(drop).map_err(msg)
                });
            }
            for &px in &args.vae_encode_px {
                let shape = [1, cfg.in_channels, px, px];
                // Image-like values in [-1, 1].
                let x = TorchRng::new(VAE_ENCODE_SEED)
                    .randn(&shape, DType::F32, &device)
                    .map_err(msg)?
                    .affine(0.5, 0.0)
                    .and_then(|x| x.clamp(-1f32, 1f32))
                    .and_then(|x| x.to_dtype(dtype))
                    .map_err(msg)?;
                let row = Row {
                    component: "vae",
                    op: "encode",
                    dtype: name,
                    shape: format!("1x{}x{px}x{px}", cfg.in_channels),
                    flops: flops::vae_encode(&cfg, (px, px)),
                    extra: extra(&[("px", px), ("batch", 1)]),
                };
                self.run_row(row, self.runs(), &mut || {
                    vae.encode(&x).map(drop).map_err(msg)
                });
            }
        }
        Ok(())
    }

    /// One text encoder on `--batch` × 77 ids, twice: `forward` keeps every hidden state as
    /// diffusers' `output_hidden_states=True` call does (the same work as torch's row);
    /// `prompt` computes only what SDXL reads, as our pipelines do
    /// (`ClipTextModel::prompt_embeddings`).
    pub(super) fn text_encoder(&mut self, c: Component, dir: &Path) -> Result<(), String> {
        let (sub, tok_sub) = match c {
            Component::TextEncoder => ("text_encoder", "tokenizer"),
            _ => ("text_encoder_2", "tokenizer_2"),
        };
        let tok = ClipTokenizer::from_dir(&dir.join(tok_sub)).map_err(msg)?;
        let (args, device) = (self.args, self.device.clone());
        let batch = args.batch;
        for &d in &args.dtypes {
            let (dtype, name) = dtype_names(d);
            let te = self.load(c.name(), name, || {
                ClipTextModel::load(&dir.join(sub), dtype, &device, None)
            })?;
            let ids = token_ids(&tok, te.config().vocab_size, batch, &device)?;
            let seq = tok.max_length();
            let (cfg, projection) = (te.config(), te.has_projection());
            let row = |op, flops| Row {
                component: c.name(),
                op,
                dtype: name,
                shape: format!("{batch}x{seq}"),
                flops,
                extra: extra(&[("batch", batch)]),
            };
            let forward = row("forward", flops::clip_forward(cfg, batch, seq, projection));
            self.run_row(forward, self.runs(), &mut || {
                te.forward_with_hidden_states(&ids).map(drop).map_err(msg)
            });
            let prompt = row("prompt", flops::clip_prompt(cfg, batch, seq, projection));
            self.run_row(prompt, self.runs(), &mut || {
                te.prompt_embeddings(&ids).map(drop).map_err(msg)
            });
        }
        Ok(())
    }

    /// One whole text-to-image generation (encode, `--pipeline-steps` steps, decode) per
    /// dtype, with the model's own scheduler and diffusers' defaults otherwise (guidance 5, so
    /// the UNet runs at batch 2; in f16 the VAE is upcast to f32 as diffusers does); with
    /// `--refiner`, then the same generation handed to the refiner at 0.8 of the schedule
    /// (`txt2img+refiner`, the base still loaded). `--low-memory` loads every component on
    /// demand.
    pub(super) fn pipeline(&mut self, dir: &Path) -> Result<(), String> {
        let (args, device) = (self.args, self.device.clone());
        let (px, steps) = (args.pipeline_px, args.pipeline_steps);
        let mut params = GenerateParams::new(PIPELINE_PROMPT);
        params.width = px;
        params.height = px;
        params.steps = steps;
        params.validate().map_err(msg)?;
        let mut row_extra = extra(&[("px", px), ("steps", steps)]);
        row_extra.insert("low_memory".into(), json!(args.low_memory));
        for &d in &args.dtypes {
            let (dtype, name) = dtype_names(d);
            let options = LoadOptions {
                device: device.clone(),
                dtype,
                ..LoadOptions::default()
            };
            let options = if args.low_memory {
                options.low_memory()
            } else {
                options
            };
            let model = self.load("pipeline", name, || SdxlModel::load(dir, &options))?;
            let shape = format!("1x{}x{px}x{px}", model.vae_config().out_channels);
            let row = Row {
                component: "pipeline",
                op: "txt2img",
                dtype: name,
                shape: shape.clone(),
                flops: pipeline_flops(&model, None, &params)?,
                extra: row_extra.clone(),
            };
            self.run_row(row, self.runs(), &mut || {
                generate(&model, None, &params, RunControl::none())
                    .map(drop)
                    .map_err(msg)
            });
            let Some(refiner_dir) = args.refiner.as_deref() else {
                continue;
            };
            let refiner = self.load("pipeline refiner", name, || {
                SdxlModel::load(refiner_dir, &options)
            })?;
            let row = Row {
                component: "pipeline",
                op: "txt2img+refiner",
                dtype: name,
                shape,
                flops: pipeline_flops(&model, Some(&refiner), &params)?,
                extra: row_extra.clone(),
            };
            let pair = Some((&refiner, REFINER_START));
            self.run_row(row, self.runs(), &mut || {
                generate(&model, pair, &params, RunControl::none())
                    .map(drop)
                    .map_err(msg)
            });
        }
        Ok(())
    }
}

/// `--flops-only`: the analytic counts from the configs alone, one `flops` line per row of
/// `torch_baseline.py --flops-only`.
///
/// # Errors
/// Configs that cannot be read or describe an unsupported model.
pub fn flops_only(args: &BenchArgs, out: &mut Reporter) -> Result<(), String> {
    let components = super::selected_components(args)?;
    let mut emit = |component: &str, op: &str, shape: String, px: Option<usize>, f: Flops| {
        out.emit(&json!({
            "kind": "flops",
            "component": component,
            "op": op,
            "shape": shape,
            "px": px,
            "gflop": (f.gflop() * 100.0).round() / 100.0,
            "flop": f.total(),
        }));
    };
    for c in components {
        let dir = match c {
            Component::RefinerUnet => args.refiner.as_deref(),
            _ => args.model.as_deref(),
        };
        let Some(dir) = dir else { continue };
        match c {
            Component::Unet | Component::RefinerUnet => {
                let cfg = UNetConfig::load(&dir.join("unet")).map_err(msg)?;
                let factor = vae_factor(dir)?;
                let b = args.batch;
                for &side in &args.flops_sizes {
                    let f = flops::unet_forward(&cfg, b, (side, side), PROMPT_TOKENS)?;
                    let shape = format!("{b}x{}x{side}x{side}", cfg.in_channels);
                    emit(c.name(), "forward", shape, Some(side * factor), f);
                }
            }
            Component::Vae => {
                let cfg: VaeConfig =
                    read_json(&dir.join("vae").join("config.json"), "VAE config").map_err(msg)?;
                let factor = cfg.downscale_factor();
                for &side in &args.flops_sizes {
                    let (lat, px) = (cfg.latent_channels, side * factor);
                    let shape = format!("1x{lat}x{side}x{side}");
                    emit(
                        "vae",
                        "decode",
                        shape,
                        Some(px),
                        flops::vae_decode(&cfg, (side, side)),
                    );
                    let shape = format!("1x{}x{px}x{px}", cfg.in_channels);
                    emit(
                        "vae",
                        "encode",
                        shape,
                        Some(px),
                        flops::vae_encode(&cfg, (px, px)),
                    );
                }
            }
            Component::TextEncoder | Component::TextEncoder2 => {
                let sub = c.name();
                let cfg: ClipTextConfig =
                    read_json(&dir.join(sub).join("config.json"), "CLIP config").map_err(msg)?;
                let (b, seq) = (args.batch, cfg.max_position_embeddings);
                let proj = cfg.declares_projection().unwrap_or(false);
                let f = flops::clip_forward(&cfg, b, seq, proj);
                emit(sub, "forward", format!("{b}x{seq}"), None, f);
            }
            Component::Matmul | Component::Pipeline => {}
        }
    }
    Ok(())
}
