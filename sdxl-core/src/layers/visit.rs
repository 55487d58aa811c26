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

/// A copy of a layer as it was (sharing its weight's storage), to put back later with
/// [`LayerMut::restore`] exactly: same values, same [`LayerMut::weight_id`].
#[derive(Debug, Clone)]
pub enum SavedLayer {
    /// A saved linear layer.
    Linear(Linear),
    /// A saved convolution.
    Conv2d(Conv2d),
}

impl LayerMut<'_> {
    /// The layer as it is now (cheap: the weight's storage is shared, not copied).
    pub fn save(&self) -> SavedLayer {
        match self {
            LayerMut::Linear(l) => SavedLayer::Linear((**l).clone()),
            LayerMut::Conv2d(c) => SavedLayer::Conv2d((**c).clone()),
        }
    }

    /// Puts back a layer [`save`](Self::save)d from this one.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (naming `name`) when `saved` is another kind of layer or has
    /// another weight shape.
    pub fn restore(&mut self, name: &str, saved: SavedLayer) -> Result<()> {
        let found = match &saved {
            SavedLayer::Linear(l) => {
                let (out, inp) = l.weight_dims();
                vec![out, inp]
            }
            SavedLayer::Conv2d(c) => c.weight_dims(),
        };
        let expected = self.weight_dims();
        match (self, saved) {
            (LayerMut::Linear(l), SavedLayer::Linear(saved)) if found == expected => **l = saved,
            (LayerMut::Conv2d(c), SavedLayer::Conv2d(saved)) if found == expected => **c = saved,
            _ => {
                return Err(Error::ShapeMismatch {
                    key: format!("{name}.weight"),
                    expected,
                    found,
                })
            }
        }
        Ok(())
    }

    /// The layer's weight (a copy where the layer stores it packed).
    ///
    /// # Errors
    /// A tensor operation fails.
    pub fn weight(&self) -> Result<Tensor> {
        Ok(match self {
            LayerMut::Linear(l) => l.weight()?,
            LayerMut::Conv2d(c) => c.weight()?,
        })
    }

    /// The weight's shape.
    pub fn weight_dims(&self) -> Vec<usize> {
        match self {
            LayerMut::Linear(l) => {
                let (out, inp) = l.weight_dims();
                vec![out, inp]
            }
            LayerMut::Conv2d(c) => c.weight_dims(),
        }
    }

    /// The id of the stored weight: it changes exactly when the layer gets another weight.
    pub fn weight_id(&self) -> TensorId {
        match self {
            LayerMut::Linear(l) => l.weight_id(),
            LayerMut::Conv2d(c) => c.weight_id(),
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
                ))?
            }
        }
        Ok(())
    }
}

/// Receives each layer with its full checkpoint name (without `.weight`), e.g.
/// `down_blocks.0.resnets.1.conv1`.
pub type LayerVisitor<'a> = dyn FnMut(&str, LayerMut<'_>) -> Result<()> + 'a;
