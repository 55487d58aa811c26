//! Visiting a model's weight-bearing layers by checkpoint name, to edit their weights in place
//! (fusing a LoRA, for example).

use super::{Conv2d, Linear};
use candle_core::{Tensor, TensorId};

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
    /// The layer's weight (a copy where the layer stores it packed).
    ///
    /// # Errors
    /// A tensor operation fails.
    pub fn weight(&self) -> Result<Tensor> {
        Ok(match self {
            LayerMut::Linear(l) => l.weight()?,
            LayerMut::Conv2d(c) => c.weight().clone(),
        })
    }

    /// The weight's shape.
    pub fn weight_dims(&self) -> Vec<usize> {
        match self {
            LayerMut::Linear(l) => {
                let (out, inp) = l.weight_dims();
                vec![out, inp]
            }
            LayerMut::Conv2d(c) => c.weight().dims().to_vec(),
        }
    }

    /// The id of the stored weight: it changes exactly when the layer gets another weight.
    pub fn weight_id(&self) -> TensorId {
        match self {
            LayerMut::Linear(l) => l.weight_id(),
            LayerMut::Conv2d(c) => c.weight().id(),
        }
    }

    /// Replaces the weight, keeping the bias and the convolution settings.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (naming `name`) when `weight` has another shape than the current
    /// weight.
    pub fn set_weight(&mut self, name: &str, weight: Tensor) -> Result<()> {
        if weight.dims() != self.weight_dims() {
            return Err(Error::ShapeMismatch {
                key: format!("{name}.weight"),
                expected: self.weight_dims(),
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
