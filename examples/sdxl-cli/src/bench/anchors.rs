//! Peak-rate anchors, as `torch_baseline.py --components matmul` measures them: square
//! matmuls and one SDXL-typical 3×3 convolution. They show what the kernels reach on this
//! machine, apart from any model code.

use candle_core::Module;
use sdxl_core::layers::Conv2d;
use sdxl_core::rng::TorchRng;
use serde_json::Map;

use super::flops::Flops;
use super::{dtype_names, Bench, Row};

/// The convolution anchor: 3×3, 640 → 640 channels, on `[2, 640, 32, 32]` (the base UNet's
/// middle level at 512 px with CFG), as in `torch_baseline.py`.
const CONV_BATCH: usize = 2;
const CONV_CHANNELS: usize = 640;
const CONV_SIDE: usize = 32;

impl Bench<'_> {
    /// Times the anchors in every `--dtypes` precision (at least 2 warm-ups and 5 repeats, as
    /// torch's anchors).
    pub(super) fn anchors(&mut self) -> Result<(), String> {
        let (args, device) = (self.args, self.device.clone());
        let runs = (args.warmup.max(2), args.repeats.max(5));
        let err = |e: sdxl_core::Error| e.to_string();
        for &d in &args.dtypes {
            let (dtype, name) = dtype_names(d);
            let mut rng = TorchRng::new(0);
            for &n in &args.matmul_sizes {
                let a = rng.randn(&[n, n], dtype, &device).map_err(err)?;
                let b = rng.randn(&[n, n], dtype, &device).map_err(err)?;
                let row = Row {
                    component: "matmul",
                    op: &format!("mm {n}x{n}x{n}"),
                    dtype: name,
                    shape: format!("{n}x{n}"),
                    flops: Flops::matmul(n, n, n),
                    extra: Map::new(),
                };
                self.run_row(row, runs, &mut || {
                    // The matmul the models run (native bf16 where the CPU has it).
                    sdxl_core::kernels::matmul::matmul(&a, &b)
                        .map(drop)
                        .map_err(|e| e.to_string())
                });
            }
            let (b, c, s) = (CONV_BATCH, CONV_CHANNELS, CONV_SIDE);
            let x = rng.randn(&[b, c, s, s], dtype, &device).map_err(err)?;
            // PyTorch's default init scale, so that values stay O(1).
            let w = (rng.randn(&[c, c, 3, 3], dtype, &device).map_err(err)?
                * (1.0 / ((9 * c) as f64).sqrt()))
            .map_err(|e| e.to_string())?;
            let bias = rng.randn(&[c], dtype, &device).map_err(err)?;
            // The convolution layer the UNet and the VAE run.
            let config = candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let conv = Conv2d::new(candle_nn::Conv2d::new(w, Some(bias), config))
                .map_err(|e| e.to_string())?;
            let row = Row {
                component: "matmul",
                op: &format!("conv3x3 {c}->{c}"),
                dtype: name,
                shape: format!("{b}x{c}x{s}x{s}"),
                flops: Flops::conv2d(b, (s, s), c, c, 3),
                extra: Map::new(),
            };
            self.run_row(row, runs, &mut || {
                conv.forward(&x).map(drop).map_err(|e| e.to_string())
            });
        }
        Ok(())
    }
}
