//! Replaying the noise draws diffusers made, in order, as a [`NoiseSource`].

use candle_core::{DType, Device, Tensor};
use sdxl_core::schedulers::NoiseSource;

/// Hands out recorded noise draws in order, noting the loop step (see
/// [`NoiseReplay::set_step`]) of each draw. Panics on a draw that was not recorded or has
/// another shape.
pub struct NoiseReplay {
    draws: Vec<Tensor>,
    step: i64,
    draw_steps: Vec<i64>,
}

impl NoiseReplay {
    /// Replays `draws` in order.
    pub fn new(draws: Vec<Tensor>) -> Self {
        Self {
            draws,
            step: 0,
            draw_steps: Vec::new(),
        }
    }

    /// Replays the `[k, ...]` slices of a stacked golden; `None` records no draw.
    pub fn stacked(draws: Option<&Tensor>) -> Self {
        let draws = draws.map_or_else(Vec::new, |t| {
            (0..t.dim(0).unwrap()).map(|i| t.get(i).unwrap()).collect()
        });
        Self::new(draws)
    }

    /// Sets the loop step that the following draws belong to.
    pub fn set_step(&mut self, step: usize) {
        self.step = step as i64;
    }

    /// How many draws were recorded.
    pub fn recorded(&self) -> usize {
        self.draws.len()
    }

    /// How many draws were made so far.
    pub fn used(&self) -> usize {
        self.draw_steps.len()
    }

    /// The loop step of each draw made so far.
    pub fn draw_steps(&self) -> &[i64] {
        &self.draw_steps
    }
}

impl NoiseSource for NoiseReplay {
    fn randn(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> sdxl_core::Result<Tensor> {
        let k = self.draw_steps.len();
        let t = self
            .draws
            .get(k)
            .unwrap_or_else(|| panic!("draw {k} requested, only {} recorded", self.draws.len()));
        assert_eq!(t.dims(), shape, "shape of noise draw {k}");
        self.draw_steps.push(self.step);
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}
