//! Visiting a model's weight-bearing layers by checkpoint name, to edit their weights in place
//! (fusing a LoRA, for example).

use super::{Conv2d, Linear};
use candle_core::Tensor;

use crate::error::{Error, Result};

/// A layer whose weight can be read and replaced, as handed to a [`LayerVisitor`].
#[derive(Debug)]
pub enum LayerMut<'a> {
    /// A linear layer, weight `[out, in]`.
    Linear(&'a mut Linear),
    /// A 2-D convolution, weight `[out, in, kh, kw]`.
    Conv2d(&'a mut Conv2d),
}

impl LayerMut<'_> {
    /// The layer's weight.
    pub fn weight(&self) -> &Tensor {
        match self {
            LayerMut::Linear(l) => l.weight(),
            LayerMut::Conv2d(c) => c.weight(),
        }
    }

    /// Replaces the weight, keeping the bias and the convolution settings.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (naming `name`) when `weight` has another shape than the current
    /// weight.
    pub fn set_weight(&mut self, name: &str, weight: Tensor) -> Result<()> {
        if weight.dims() != self.weight().dims() {
            return Err(Error::ShapeMismatch {
                key: format!("{name}.weight"),
                expected: self.weight().dims().to_vec(),
                found: weight.dims().to_vec(),
            });
        }
        match self {
            LayerMut::Linear(l) => **l = Linear::new(weight, l.bias().cloned())?,
            LayerMut::Conv2d(c) => {
                **c = Conv2d::new(candle_nn::Conv2d::new(
                    weight,
                    c.bias().cloned(),
                    *c.config(),
                ))
            }
        }
        Ok(())
    }
}

/// Receives each layer with its full checkpoint name (without `.weight`), e.g.
/// `down_blocks.0.resnets.1.conv1`.
pub type LayerVisitor<'a> = dyn FnMut(&str, LayerMut<'_>) -> Result<()> + 'a;
