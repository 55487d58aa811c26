//! VAE tiling (diffusers' `enable_tiling`), batch slicing, the memory estimate and its limits,
//! the VAE options of `LoadOptions` (separate fp16-fix folder, dtype, tiling) and the
//! non-finite decode errors.
//!
//! Sizes derive from the fixture VAE's config (its tile size is its `sample_size`); decode and
//! encode cases come from `index.json`. The peak-memory test re-runs two tests of this binary
//! in child processes and reads their `VmHWM` from `/proc/self/status`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{golden, Parity};
use sdxl_core::pipeline::{
    decode_images, decode_latents, encode_latents, GenerateParams, LoadOptions, SdxlModel,
};
use sdxl_core::rng::TorchRng;
use sdxl_core::vae::tiling::{
    self, decode_pass_bytes, decode_strategy, encode_pass_bytes, encode_strategy, Strategy,
    DEFAULT_MAX_PASS_BYTES,
};
use sdxl_core::vae::{AutoencoderKL, TileGeometry, TilingMode, TilingOptions, VaeConfig};
use sdxl_core::Error;

const FILE: &str = "goldens/vae.safetensors";

/// Half-precision tolerance, as in the VAE parity test: relative to max(1, max|golden|).
const F16_TOLERANCE: f64 = 2e-2;

/// Tiles of a large input per side in the agreement and strategy tests.
const TILES_PER_SIDE: usize = 4;

/// The untiled decode of the peak-memory test is sized so that its estimate reaches this
/// (about 135 MiB measured on the fixture VAE, 10 s on one core).
const MEMORY_TEST_ESTIMATE: u64 = 128 << 20;

fn vae_dir() -> PathBuf {
    common::base_dir().join("vae")
}

fn load_vae(dtype: DType) -> AutoencoderKL {
    AutoencoderKL::load(&vae_dir(), dtype, &Device::Cpu, None).expect("fixture VAE loads")
}

fn load_model(options: &LoadOptions) -> SdxlModel {
    SdxlModel::load(&common::base_dir(), options).expect("fixture model loads")
}

/// Case prefixes (`decode0`, `encode`, …) of the VAE goldens that start with `kind`.
fn cases(kind: &str) -> Vec<String> {
    let found: BTreeSet<String> = common::index_entries(FILE)
        .iter()
        .filter_map(|e| e["name"].as_str())
        .filter_map(|n| n.split_once('.').map(|(p, _)| p.to_string()))
        .filter(|p| p.starts_with(kind))
        .collect();
    assert!(!found.is_empty(), "no `{kind}*` case in {FILE}");
    found.into_iter().collect()
}

/// The default (diffusers) tile geometry of the fixture VAE.
fn default_geometry(vae: &AutoencoderKL) -> TileGeometry {
    TilingOptions::default().geometry(vae.config()).unwrap()
}

/// Seeded standard-normal values.
fn randn(seed: u64, shape: &[usize]) -> Tensor {
    TorchRng::new(seed)
        .randn(shape, DType::F32, &Device::Cpu)
        .unwrap()
}

/// A latent `TILES_PER_SIDE` default tiles wide and high.
fn large_latent(vae: &AutoencoderKL) -> Tensor {
    let n = TILES_PER_SIDE * default_geometry(vae).latent;
    randn(20, &[1, vae.config().latent_channels, n, n])
}

/// `x` repeated along height and width until both are at least `TILES_PER_SIDE` default tiles.
fn large_image(vae: &AutoencoderKL, x: &Tensor) -> Tensor {
    let (_, _, h, w) = x.dims4().unwrap();
    let want = TILES_PER_SIDE * default_geometry(vae).sample;
    x.repeat((1, 1, want.div_ceil(h), want.div_ceil(w)))
        .unwrap()
}

/// (mean |a - b|, root mean square of `b` around its mean).
fn mean_abs_and_spread(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let (a, b) = (common::flat_f64(a), common::flat_f64(b));
    let n = b.len() as f64;
    let mean_abs = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f64>() / n;
    let mean = b.iter().sum::<f64>() / n;
    let spread = (b.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / n).sqrt();
    (mean_abs, spread)
}

/// The smallest valid tile size (a multiple of 4·f) whose stride, 3/4 of a tile, covers
/// `pixels`: diffusers' loops then make exactly one tile. (A tile merely as large as the input
/// still gets a second, partial tile one stride further.)
fn covering_tile(vae: &AutoencoderKL, pixels: usize) -> TileGeometry {
    let f = vae.config().downscale_factor();
    let sample = (4 * pixels).div_ceil(3).div_ceil(4 * f) * 4 * f;
    TileGeometry::new(sample, f, tiling::DEFAULT_OVERLAP_FACTOR).unwrap()
}

#[test]
fn one_tile_covering_the_input_reproduces_diffusers_untiled_output() {
    let vae = load_vae(DType::F32);
    let g = common::goldens(FILE);
    let f = vae.config().downscale_factor();
    let mut parity = Parity::new();
    for case in cases("decode") {
        let z = golden(&g, &format!("{case}.z"));
        let (_, _, h, w) = z.dims4().unwrap();
        let geometry = covering_tile(&vae, h.max(w) * f);
        let out = tiling::tiled_decode(&vae, z, &geometry).unwrap();
        parity.check(
            &format!("{case}.sample, one {} px tile", geometry.sample),
            &out,
            golden(&g, &format!("{case}.sample")),
        );
    }
    for case in cases("encode") {
        let x = golden(&g, &format!("{case}.x"));
        let (_, _, h, w) = x.dims4().unwrap();
        let geometry = covering_tile(&vae, h.max(w));
        let out = tiling::tiled_encode_moments(&vae, x, &geometry).unwrap();
        parity.check(
            &format!("{case}.moments, one {} px tile", geometry.sample),
            &out,
            golden(&g, &format!("{case}.moments")),
        );
    }
    parity.finish();
}

/// Tiles see less of the image than the whole (the mid-block attention and the group norms are
/// global, and the fixture's random weights make every pixel depend on all others), so tiled
/// output differs from untiled output as it does in diffusers (about half the image's spread with
/// diffusers' 64-px fixture tiles, in diffusers too). The difference must shrink as the tiles
/// grow, vanish when one tile covers the input, and stay below the image's own spread.
fn check_convergence(
    label: &str,
    whole: &Tensor,
    tiled_with: impl Fn(&TileGeometry) -> Tensor,
    input_pixels: usize,
    vae: &AutoencoderKL,
) {
    let base = default_geometry(vae);
    let f = vae.config().downscale_factor();
    let mut errors = Vec::new();
    for k in 1..TILES_PER_SIDE {
        let g = TileGeometry::new(k * base.sample, f, base.overlap_factor).unwrap();
        let (err, spread) = mean_abs_and_spread(&tiled_with(&g), whole);
        println!(
            "{label}: {} px tiles: mean |tiled - untiled| {err:.4e} (untiled spread {spread:.4e}, \
             ratio {:.3})",
            g.sample,
            err / spread
        );
        errors.push((err, spread));
    }
    let (first, spread) = errors[0];
    assert!(
        first < 0.75 * spread,
        "{label}: default tiles differ by {first:.3e}, too close to the spread {spread:.3e}"
    );
    assert!(
        errors.windows(2).all(|w| w[1].0 < w[0].0),
        "{label}: larger tiles should agree better: {errors:?}"
    );
    let covering = covering_tile(vae, input_pixels);
    let mut parity = Parity::new();
    parity.check(
        &format!("{label}: one {} px tile", covering.sample),
        &tiled_with(&covering),
        whole,
    );
    parity.finish();
}

#[test]
fn tiled_decode_converges_to_untiled() {
    let vae = load_vae(DType::F32);
    let z = large_latent(&vae);
    let whole = vae.decode(&z).unwrap();
    let f = vae.config().downscale_factor();
    let side = z.dim(2).unwrap() * f;
    check_convergence(
        "decode",
        &whole,
        |g| tiling::tiled_decode(&vae, &z, g).unwrap(),
        side,
        &vae,
    );
}

#[test]
fn tiled_encode_converges_to_untiled() {
    let vae = load_vae(DType::F32);
    let g = common::goldens(FILE);
    let case = &cases("encode")[0];
    let x = large_image(&vae, golden(&g, &format!("{case}.x")));
    let whole = vae.encode_moments(&x).unwrap();
    let (_, _, h, w) = x.dims4().unwrap();
    check_convergence(
        "encode",
        &whole,
        |g| tiling::tiled_encode_moments(&vae, &x, g).unwrap(),
        h.max(w),
        &vae,
    );
}

#[test]
fn batches_decode_and_encode_like_single_samples() {
    let vae = load_vae(DType::F32);
    let first = large_latent(&vae);
    let second = randn(21, first.dims());
    let z = Tensor::cat(&[&first, &second], 0).unwrap();
    let batched = vae.decode(&z).unwrap();
    let mut parity = Parity::new();
    for i in 0..2 {
        let single = vae.decode(&z.narrow(0, i, 1).unwrap()).unwrap();
        parity.check(
            &format!("batched decode, sample {i}"),
            &batched.narrow(0, i, 1).unwrap(),
            &single,
        );
    }
    let sliced = tiling::decode(
        &vae,
        &z,
        &TilingOptions {
            mode: TilingMode::Off,
            memory_budget: 0,
            ..TilingOptions::default()
        },
    )
    .unwrap();
    parity.check("per-sample decode", &sliced, &batched);
    let g = common::goldens(FILE);
    let x = golden(&g, &format!("{}.x", cases("encode")[0]));
    let x2 = Tensor::cat(&[x, &x.flip(&[3]).unwrap()], 0).unwrap();
    let moments = vae.encode_moments(&x2).unwrap();
    let single = vae.encode_moments(&x2.narrow(0, 1, 1).unwrap()).unwrap();
    parity.check(
        "batched encode, sample 1",
        &moments.narrow(0, 1, 1).unwrap(),
        &single,
    );
    parity.finish();
}

#[test]
fn modes_and_budget_choose_the_strategy() {
    let vae = load_vae(DType::F32);
    let cfg = vae.config().clone();
    let z = large_latent(&vae);
    let (_, _, n, _) = z.dims4().unwrap();
    let estimate = decode_pass_bytes(&cfg, 1, n, n, DType::F32);
    let geometry = default_geometry(&vae);
    let with = |mode, memory_budget| TilingOptions {
        mode,
        memory_budget,
        ..TilingOptions::default()
    };
    let strategy = |z: &Tensor, o: &TilingOptions| decode_strategy(&vae, z, o).unwrap();
    assert_eq!(
        strategy(&z, &with(TilingMode::Auto, estimate - 1)),
        Strategy::Tiled(geometry)
    );
    assert_eq!(
        strategy(&z, &with(TilingMode::Auto, estimate)),
        Strategy::Whole
    );
    assert_eq!(
        strategy(&z, &with(TilingMode::On, u64::MAX)),
        Strategy::Tiled(geometry)
    );
    assert_eq!(strategy(&z, &with(TilingMode::Off, 0)), Strategy::Whole);
    // Like diffusers, a latent no larger than one tile is never tiled.
    let small = z
        .narrow(2, 0, geometry.latent)
        .unwrap()
        .narrow(3, 0, geometry.latent)
        .unwrap();
    assert_eq!(strategy(&small, &with(TilingMode::On, 0)), Strategy::Whole);
    // A batch above the budget runs one sample at a time.
    let pair = Tensor::cat(&[&z, &z], 0).unwrap();
    assert_eq!(
        strategy(&pair, &with(TilingMode::Off, estimate)),
        Strategy::PerSample
    );
    assert_eq!(
        strategy(&pair, &with(TilingMode::Off, 2 * estimate)),
        Strategy::Whole
    );

    // The strategy is what runs: Auto above the budget gives diffusers' tiled output.
    let mut parity = Parity::new();
    parity.check(
        "auto over budget = tiled_decode",
        &tiling::decode(&vae, &z, &with(TilingMode::Auto, estimate - 1)).unwrap(),
        &tiling::tiled_decode(&vae, &z, &geometry).unwrap(),
    );
    parity.finish();

    let g = common::goldens(FILE);
    let x = large_image(&vae, golden(&g, &format!("{}.x", cases("encode")[0])));
    let (_, _, h, w) = x.dims4().unwrap();
    let estimate = encode_pass_bytes(&cfg, 1, h, w, DType::F32);
    let e = |o: &TilingOptions| encode_strategy(&vae, &x, o).unwrap();
    assert_eq!(
        e(&with(TilingMode::Auto, estimate - 1)),
        Strategy::Tiled(geometry)
    );
    assert_eq!(e(&with(TilingMode::Auto, estimate)), Strategy::Whole);
    assert!(matches!(
        encode_strategy(
            &vae,
            &x.narrow(2, 0, h - 1).unwrap(),
            &TilingOptions::default()
        ),
        Err(Error::InvalidArgument(_))
    ));
}

/// The smallest latent side (doubling from one tile) whose untiled decode is estimated above
/// `limit`.
fn side_above(cfg: &VaeConfig, start: usize, limit: u64) -> usize {
    let mut n = start.max(1);
    while decode_pass_bytes(cfg, 1, n, n, DType::F32) <= limit {
        n *= 2;
    }
    n
}

#[test]
fn huge_inputs_are_refused_before_anything_runs() {
    let vae = load_vae(DType::F32);
    let cfg = vae.config().clone();
    let c = cfg.latent_channels;
    let n = side_above(&cfg, default_geometry(&vae).latent, DEFAULT_MAX_PASS_BYTES);
    // A broadcast view: nothing of n×n is allocated, and nothing may be computed either.
    let z = Tensor::zeros((1, c, 1, 1), DType::F32, &Device::Cpu)
        .unwrap()
        .broadcast_as((1, c, n, n))
        .unwrap();
    let off = TilingOptions::with_mode(TilingMode::Off);
    let start = std::time::Instant::now();
    match tiling::decode(&vae, &z, &off) {
        Err(Error::InvalidArgument(m)) => {
            println!("{n}x{n} latent, tiling off: {m}");
            assert!(m.contains("tiling"), "{m}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert!(
        start.elapsed().as_secs() < 5,
        "the refusal must come before decoding"
    );
    // Tiles as large as the input are refused the same way.
    let huge_tiles = TilingOptions {
        mode: TilingMode::On,
        tile_sample_size: Some(n * cfg.downscale_factor()),
        ..TilingOptions::default()
    };
    let wider = Tensor::zeros((1, c, 1, 1), DType::F32, &Device::Cpu)
        .unwrap()
        .broadcast_as((1, c, n, 2 * n))
        .unwrap();
    assert!(matches!(
        tiling::decode_strategy(&vae, &wider, &huge_tiles),
        Err(Error::InvalidArgument(m)) if m.contains("smaller tiles")
    ));
    // The pipeline entry point honours the model's options.
    let model = load_model(&LoadOptions {
        vae_tiling: off,
        ..LoadOptions::default()
    });
    assert!(matches!(
        decode_latents(&model, &z),
        Err(Error::InvalidArgument(m)) if m.contains("tiling")
    ));
    // Absurd image sizes never reach the VAE.
    let mut params = GenerateParams::new("x");
    (params.width, params.height) = (100_000, 8);
    assert!(matches!(params.validate(), Err(Error::InvalidArgument(m)) if m.contains("width")));
}

#[test]
fn pipeline_entry_points_honour_the_tiling_option() {
    let on = load_model(&LoadOptions {
        vae_tiling: TilingOptions::with_mode(TilingMode::On),
        ..LoadOptions::default()
    });
    let off = load_model(&LoadOptions {
        vae_tiling: TilingOptions::with_mode(TilingMode::Off),
        ..LoadOptions::default()
    });
    let (on_vae, off_vae) = (on.vae().unwrap(), off.vae().unwrap());
    let scale = off_vae.scaling_factor();
    let geometry = default_geometry(&on_vae);
    let g = common::goldens(FILE);
    let mut parity = Parity::new();
    let mut latents: Vec<Tensor> = cases("decode")
        .iter()
        .map(|case| golden(&g, &format!("{case}.z")).clone())
        .collect();
    latents.push(large_latent(&on_vae));
    for z in &latents {
        let scaled = (z * scale).unwrap();
        let (_, _, h, w) = z.dims4().unwrap();
        // Like diffusers, only latents larger than one tile are tiled.
        let expected = if h > geometry.latent || w > geometry.latent {
            tiling::tiled_decode(&on_vae, z, &geometry).unwrap()
        } else {
            on_vae.decode(z).unwrap()
        };
        let label = format!("{:?}", z.dims());
        parity.check(
            &format!("decode_latents {label}, tiling on"),
            &decode_latents(&on, &scaled).unwrap(),
            &expected,
        );
        parity.check(
            &format!("decode_latents {label}, tiling off"),
            &decode_latents(&off, &scaled).unwrap(),
            &off_vae.decode(z).unwrap(),
        );
    }
    let x = large_image(&on_vae, golden(&g, &format!("{}.x", cases("encode")[0])));
    let seed = 5;
    let ours = encode_latents(&on, &x, &mut TorchRng::new(seed)).unwrap();
    let dist = tiling::encode(&on_vae, &x, &TilingOptions::with_mode(TilingMode::On)).unwrap();
    let eps = TorchRng::new(seed)
        .randn(dist.mean.dims(), DType::F32, &Device::Cpu)
        .unwrap();
    let expected = (dist.sample(&eps).unwrap() * scale).unwrap();
    parity.check("encode_latents, tiling on", &ours, &expected);
    parity.finish();
}

#[test]
fn f16_loading_keeps_a_force_upcast_vae_in_f32() {
    let cfg: VaeConfig =
        sdxl_core::loading::read_json(&vae_dir().join("config.json"), "VAE config").unwrap();
    let model = load_model(&LoadOptions {
        dtype: DType::F16,
        ..LoadOptions::default()
    });
    let expected = if cfg.force_upcast {
        DType::F32
    } else {
        DType::F16
    };
    assert_eq!(
        model.vae().unwrap().dtype(),
        expected,
        "force_upcast = {}",
        cfg.force_upcast
    );
    assert_eq!(model.unet().unwrap().dtype(), DType::F16);
}

/// A scratch folder removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sdxl-vae-tiling-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a VAE folder: the fixture's config with `force_upcast` set as given, and its weights
/// with every tensor whose key contains `scale_key` multiplied by `scale`.
fn write_vae(dir: &Path, force_upcast: bool, scale_key: &str, scale: f64) {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir().join("config.json")).unwrap())
            .unwrap();
    cfg["force_upcast"] = serde_json::Value::Bool(force_upcast);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let weights = candle_core::safetensors::load(
        vae_dir().join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let scaled: std::collections::HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, t)| {
            let t = if k.contains(scale_key) {
                (t * scale).unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect();
    candle_core::safetensors::save(&scaled, dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
}

#[test]
fn a_separate_vae_folder_without_force_upcast_runs_in_f16() {
    let scratch = ScratchDir::new("fp16-fix");
    write_vae(&scratch.0, false, "", 1.0);
    let model = load_model(&LoadOptions {
        dtype: DType::F16,
        vae_path: Some(scratch.0.clone()),
        ..LoadOptions::default()
    });
    assert_eq!(model.vae().unwrap().dtype(), DType::F16);
    assert!(!model.vae().unwrap().force_upcast());
    let g = common::goldens(FILE);
    let mut parity = Parity::with_tolerance(F16_TOLERANCE);
    for case in cases("decode") {
        let z = golden(&g, &format!("{case}.z"));
        let scaled = (z * model.vae().unwrap().scaling_factor()).unwrap();
        parity.check(
            &format!("f16 VAE {case}.sample"),
            &decode_latents(&model, &scaled).unwrap(),
            golden(&g, &format!("{case}.sample")),
        );
        assert!(decode_images(&model, &scaled).is_ok());
    }
    parity.finish();

    let missing = scratch.0.join("no-such-vae");
    let err = SdxlModel::load(
        &common::base_dir(),
        &LoadOptions {
            vae_path: Some(missing.clone()),
            ..LoadOptions::default()
        },
    )
    .unwrap_err();
    println!("missing VAE folder: {err}");
    assert!(matches!(&err, Error::NotFound { path, .. } if path.starts_with(&missing)));
}

#[test]
fn an_overflowing_f16_vae_gives_an_actionable_error() {
    let scratch = ScratchDir::new("overflow");
    // 1e6 times the decoder's input convolution overflows float16 (max 65504).
    write_vae(&scratch.0, false, "decoder.conv_in", 1e6);
    let model = load_model(&LoadOptions {
        dtype: DType::F16,
        vae_path: Some(scratch.0.clone()),
        ..LoadOptions::default()
    });
    assert_eq!(model.vae().unwrap().dtype(), DType::F16);
    let g = common::goldens(FILE);
    let z = golden(&g, &format!("{}.z", cases("decode")[0]));
    let latents = (z * model.vae().unwrap().scaling_factor()).unwrap();
    let err = decode_images(&model, &latents).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, Error::NonFinite { .. }), "{err:?}");
    for needle in ["fp16-fix", "--vae", "f32"] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
}

#[test]
fn non_finite_latents_are_reported_before_decoding() {
    let model = load_model(&LoadOptions::default());
    let g = common::goldens(FILE);
    let z = golden(&g, &format!("{}.z", cases("decode")[0]));
    let (_, c, h, w) = z.dims4().unwrap();
    let mut values = common::flat_f64(z);
    let middle = values.len() / 2;
    values[middle] = f64::NAN;
    let bad = Tensor::from_vec(values, (1, c, h, w), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let err = decode_images(&model, &bad).unwrap_err();
    println!("{err}");
    assert!(
        matches!(&err, Error::NonFinite { what, hint } if what == "denoising" && hint.contains("latents"))
    );
}

/// `VmRSS` or `VmHWM` of this process in KiB.
#[cfg(target_os = "linux")]
fn vm_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// The latent side whose untiled decode is estimated at about [`MEMORY_TEST_ESTIMATE`].
#[cfg(target_os = "linux")]
fn memory_test_side(vae: &AutoencoderKL) -> usize {
    let start = default_geometry(vae).latent;
    let mut n = start;
    while decode_pass_bytes(vae.config(), 1, n, n, DType::F32) < MEMORY_TEST_ESTIMATE {
        n += start;
    }
    n
}

/// Decodes the memory test's latent with `mode` and prints the memory figures that
/// [`tiling_lowers_peak_memory`] reads when it runs this test alone in a child process.
#[cfg(target_os = "linux")]
fn decode_large_latent(mode: TilingMode) {
    let vae = load_vae(DType::F32);
    let n = memory_test_side(&vae);
    let z = randn(3, &[1, vae.config().latent_channels, n, n]);
    let before = vm_kib("VmRSS");
    let out = tiling::decode(&vae, &z, &TilingOptions::with_mode(mode)).unwrap();
    let peak = vm_kib("VmHWM");
    let f = vae.config().downscale_factor();
    assert_eq!(out.dims(), [1, vae.config().out_channels, n * f, n * f]);
    assert!(common::flat_f64(&out).iter().all(|v| v.is_finite()));
    let estimate = decode_pass_bytes(vae.config(), 1, n, n, DType::F32) >> 10;
    println!("VAE_MEMORY mode={mode} side={n} before_kib={before} peak_kib={peak} estimate_kib={estimate}");
}

#[cfg(target_os = "linux")]
#[test]
fn decode_large_latent_untiled() {
    decode_large_latent(TilingMode::Off);
}

#[cfg(target_os = "linux")]
#[test]
fn decode_large_latent_tiled() {
    decode_large_latent(TilingMode::On);
}

/// Runs one test of this binary alone in a child process and returns its
/// (growth of the peak RSS during the decode, estimate) in KiB.
#[cfg(target_os = "linux")]
fn child_growth(test: &str) -> (u64, u64) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{test} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.find("VAE_MEMORY").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("{test} printed no VAE_MEMORY line:\n{stdout}"));
    println!("{line}");
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in `{line}`"))
    };
    (
        field("peak_kib").saturating_sub(field("before_kib")),
        field("estimate_kib"),
    )
}

/// Peak memory falls with tiling. Each mode runs alone in a fresh process so that its peak RSS
/// is its own; the margins are wide because the allocator and the thread pool add noise.
#[cfg(target_os = "linux")]
#[test]
fn tiling_lowers_peak_memory() {
    let (untiled, estimate) = child_growth("decode_large_latent_untiled");
    let (tiled, _) = child_growth("decode_large_latent_tiled");
    println!(
        "peak RSS growth: untiled {untiled} KiB (estimate {estimate} KiB), tiled {tiled} KiB, \
         ratio {:.1}",
        untiled as f64 / tiled.max(1) as f64
    );
    assert!(
        tiled * 3 < untiled,
        "tiled decode grew the peak by {tiled} KiB, untiled by {untiled} KiB"
    );
    assert!(
        untiled * 3 > estimate && untiled < estimate * 3,
        "the estimate {estimate} KiB is off from the measured {untiled} KiB by more than 3x"
    );
}
