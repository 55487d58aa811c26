//! Merging LoRAs into a loaded [`SdxlModel`] and taking them out again.
//!
//! Everything is checked before the first weight changes (every module must name a layer of the
//! model, with matching shapes), and a failure while merging puts the weights already changed
//! back, so an error never leaves a half-merged model. The original layers (sharing their weights' storage) are kept in
//! the returned [`AppliedLoras`], so [`SdxlModel::remove_loras`] restores them bit for bit.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{DType, Tensor, TensorId};

use super::file::{LoraComponent, LoraFormat, LoraModule, LoraWeights};
use super::kohya::{kohya_module_name, SgmUnetLayout};
use crate::error::{Error, Result};
use crate::layers::{LayerMut, LayerVisitor, SavedLayer};
use crate::pipeline::SdxlModel;

/// Unknown modules listed by name in an error; the rest are counted.
const LISTED_UNKNOWN: usize = 20;

/// The text encoders' module prefix in checkpoints and LoRA files.
const TEXT_MODEL_PREFIX: &str = "text_model.";

/// One LoRA and the strength it is merged with.
///
/// `scale` multiplies every module's `alpha / rank` in every component, like diffusers'
/// `cross_attention_kwargs={"scale": s}` (which also reaches the text encoders through
/// `encode_prompt`'s `lora_scale`) or `set_adapters([...], adapter_weights=[s, ...])`.
#[derive(Debug, Clone, Copy)]
pub struct LoraSpec<'a> {
    /// The LoRA.
    pub lora: &'a LoraWeights,
    /// Its strength (1 = as trained).
    pub scale: f64,
}

/// Options of [`SdxlModel::apply_loras_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LoraOptions {
    /// Skip modules and keys that match no layer of the model instead of failing; they are
    /// listed in [`AppliedLoras::skipped`]. Shape mismatches are errors either way.
    pub skip_unknown: bool,
}

/// A layer changed by a merge: the layer as it was and the identity of the merged weight.
#[derive(Debug, Clone)]
struct MergedLayer {
    component: LoraComponent,
    module: String,
    original: SavedLayer,
    merged: TensorId,
}

/// What [`SdxlModel::apply_loras`] changed: the original weight of every merged layer, so that
/// [`SdxlModel::remove_loras`] can restore them exactly.
#[derive(Debug, Clone, Default)]
#[must_use = "without it the LoRAs cannot be removed from the model"]
pub struct AppliedLoras {
    layers: Vec<MergedLayer>,
    skipped: Vec<String>,
}

impl AppliedLoras {
    /// The layers whose weights were changed, as (component, module path).
    pub fn layers(&self) -> impl Iterator<Item = (LoraComponent, &str)> + '_ {
        self.layers.iter().map(|l| (l.component, l.module.as_str()))
    }

    /// How many layers were changed.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Module names and keys that matched nothing and were skipped
    /// ([`LoraOptions::skip_unknown`]), as `<file>: <name>`.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }
}

/// Calls `f` on every layer of one component: all linear and convolution layers of the UNet,
/// the linear layers of a text encoder. Returns `false` when the model lacks the component
/// (the refiner has no `text_encoder`).
fn visit_component(
    model: &mut SdxlModel,
    component: LoraComponent,
    f: &mut LayerVisitor<'_>,
) -> Result<bool> {
    let encoder = match component {
        LoraComponent::Unet => {
            model.unet.visit_layers_mut(f)?;
            return Ok(true);
        }
        LoraComponent::TextEncoder => model.text.encoder_1.as_mut().map(|(_, e)| e),
        LoraComponent::TextEncoder2 => Some(&mut model.text.encoder_2.1),
    };
    match encoder {
        Some(e) => {
            e.visit_linears_mut(&mut |name, linear| f(name, LayerMut::Linear(linear)))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Every layer of the model by component and path, with its weight shape, and the kohya name
/// of each.
struct LayerIndex {
    shapes: HashMap<(LoraComponent, String), Vec<usize>>,
    kohya: HashMap<String, (LoraComponent, String)>,
}

impl LayerIndex {
    fn build(model: &mut SdxlModel) -> Result<Self> {
        let layout = SgmUnetLayout::of(&model.unet);
        let mut shapes = HashMap::new();
        let mut kohya = HashMap::new();
        for component in LoraComponent::ALL {
            visit_component(model, component, &mut |name, layer| {
                let id = (component, name.to_string());
                // kohya UNet names are SGM names; names derived from diffusers paths (as SD 1.x
                // kohya files and some converters write them) are accepted too.
                let mut names = vec![format!(
                    "{}{}",
                    component.kohya_prefix(),
                    name.replace('.', "_")
                )];
                names.extend(kohya_module_name(component, name, &layout));
                for n in names {
                    kohya.insert(n, id.clone());
                }
                shapes.insert(id, layer.weight_dims());
                Ok(())
            })?;
        }
        Ok(Self { shapes, kohya })
    }

    /// The layer a module targets, when the model has it.
    fn resolve(&self, module: &LoraModule) -> Option<(LoraComponent, String)> {
        match module.format() {
            LoraFormat::Kohya => self.kohya.get(module.name()).cloned(),
            LoraFormat::Diffusers => {
                let c = module.component();
                let path = module.path();
                let direct = (c, path.to_string());
                if self.shapes.contains_key(&direct) {
                    return Some(direct);
                }
                // transformers 5 drops the `text_model.` level of `CLIPTextModel`.
                let nested = (c, format!("{TEXT_MODEL_PREFIX}{path}"));
                (c != LoraComponent::Unet && self.shapes.contains_key(&nested)).then_some(nested)
            }
        }
    }
}

/// One module's share of a layer's update.
struct Contribution<'a> {
    module: &'a LoraModule,
    multiplier: f64,
}

type Plan<'a> = BTreeMap<(LoraComponent, String), Vec<Contribution<'a>>>;

/// `dims` without trailing 1s (so `[in, 1, 1]` and `[in]` compare equal).
fn trim_ones(dims: &[usize]) -> &[usize] {
    let end = dims.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    dims.get(..end).unwrap_or(dims)
}

/// Checks that `module` fits a layer whose weight has shape `weight`.
fn check_shapes(module: &LoraModule, weight: &[usize]) -> Result<()> {
    let (up, down) = (module.up().dims(), module.down().dims());
    let rank = module.rank();
    let out = weight.first().copied().unwrap_or(0);
    let up_ok = up.len() >= 2
        && up.first() == Some(&out)
        && up.get(1) == Some(&rank)
        && up.iter().skip(2).all(|&d| d == 1);
    if !up_ok {
        let mut expected = vec![out, rank];
        expected.resize(up.len().max(2), 1);
        return Err(Error::ShapeMismatch {
            key: module.tensor_key(false),
            expected,
            found: up.to_vec(),
        });
    }
    let (down_tail, weight_tail) = (down.get(1..), weight.get(1..));
    if down_tail.map(trim_ones) != weight_tail.map(trim_ones) {
        let mut expected = vec![rank];
        expected.extend_from_slice(weight_tail.unwrap_or_default());
        return Err(Error::ShapeMismatch {
            key: module.tensor_key(true),
            expected,
            found: down.to_vec(),
        });
    }
    Ok(())
}

/// Resolves and checks every module of every LoRA; collects what matches nothing.
fn plan<'a>(
    index: &LayerIndex,
    loras: &[LoraSpec<'a>],
    options: LoraOptions,
) -> Result<(Plan<'a>, Vec<String>)> {
    let mut plan: Plan<'a> = BTreeMap::new();
    let mut skipped = Vec::new();
    for spec in loras {
        let lora = spec.lora;
        if !spec.scale.is_finite() {
            return Err(Error::invalid(format!(
                "LoRA {}: scale {} is not a finite number",
                lora.source().display(),
                spec.scale
            )));
        }
        let mut unknown: Vec<&str> = lora
            .unrecognized_keys()
            .iter()
            .map(String::as_str)
            .collect();
        let mut seen: HashMap<(LoraComponent, String), &str> = HashMap::new();
        for module in lora.modules() {
            let Some(target) = index.resolve(module) else {
                unknown.push(module.name());
                continue;
            };
            if let Some(first) = seen.insert(target.clone(), module.name()) {
                return Err(Error::InvalidCheckpoint {
                    path: lora.source().to_path_buf(),
                    reason: format!(
                        "`{first}` and `{}` both target {}.{}",
                        module.name(),
                        target.0,
                        target.1
                    ),
                });
            }
            let shape = index.shapes.get(&target).map_or(&[][..], Vec::as_slice);
            check_shapes(module, shape)?;
            plan.entry(target).or_default().push(Contribution {
                module,
                multiplier: module.scaling() * spec.scale,
            });
        }
        if unknown.is_empty() {
            continue;
        }
        if !options.skip_unknown {
            let listed: Vec<&str> = unknown.iter().take(LISTED_UNKNOWN).copied().collect();
            let more = unknown.len().saturating_sub(LISTED_UNKNOWN);
            return Err(Error::InvalidCheckpoint {
                path: lora.source().to_path_buf(),
                reason: format!(
                    "{} LoRA modules or keys match no layer of this model (a LoRA for another \
                     model?): {}{}",
                    unknown.len(),
                    listed.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
            });
        }
        let source = lora.source().display().to_string();
        skipped.extend(unknown.iter().map(|u| format!("{source}: {u}")));
    }
    Ok((plan, skipped))
}

/// `weight + Σ multiplier · up @ down`, computed in f32 on the weight's device and returned in
/// the weight's dtype.
fn merged_weight(weight: &Tensor, contributions: &[Contribution<'_>]) -> Result<Tensor> {
    let device = weight.device();
    let out = weight.dim(0)?;
    let mut merged = weight.to_dtype(DType::F32)?;
    for c in contributions {
        let rank = c.module.rank();
        let up = c
            .module
            .up()
            .to_device(device)?
            .to_dtype(DType::F32)?
            .reshape((out, rank))?;
        let down = c
            .module
            .down()
            .to_device(device)?
            .to_dtype(DType::F32)?
            .reshape((rank, ()))?;
        let delta = (up.matmul(&down)? * c.multiplier)?.reshape(weight.dims())?;
        merged = (merged + delta)?;
    }
    Ok(merged.to_dtype(weight.dtype())?)
}

/// Puts the original weights of `layers` back, without checking what is there now.
fn restore(model: &mut SdxlModel, layers: &[MergedLayer]) -> Result<()> {
    let mut originals: HashMap<(LoraComponent, String), &SavedLayer> = layers
        .iter()
        .map(|l| ((l.component, l.module.clone()), &l.original))
        .collect();
    for component in LoraComponent::ALL {
        visit_component(model, component, &mut |name, mut layer| match originals
            .remove(&(component, name.to_string()))
        {
            Some(original) => layer.restore(name, original.clone()),
            None => Ok(()),
        })?;
    }
    Ok(())
}

/// Merges the planned updates; on failure, restores what was merged and returns the error.
fn merge(model: &mut SdxlModel, plan: &Plan<'_>) -> Result<Vec<MergedLayer>> {
    let mut merged = Vec::with_capacity(plan.len());
    let mut result = Ok(());
    for component in LoraComponent::ALL {
        result = visit_component(model, component, &mut |name, mut layer| {
            let Some(contributions) = plan.get(&(component, name.to_string())) else {
                return Ok(());
            };
            let original = layer.save();
            let new = merged_weight(&layer.weight()?, contributions)?;
            layer.set_weight(name, new)?;
            // The layer may store the weight in another layout: remember what it holds now.
            let id = layer.weight_id();
            merged.push(MergedLayer {
                component,
                module: name.to_string(),
                original,
                merged: id,
            });
            Ok(())
        })
        .map(|_| ());
        if result.is_err() {
            break;
        }
    }
    match result {
        Ok(()) => Ok(merged),
        Err(e) => {
            restore(model, &merged)?;
            Err(e)
        }
    }
}

impl SdxlModel {
    /// Merges LoRAs into the weights of the UNet and the text encoders: for every module,
    /// `W ← W + scale · alpha / rank · up @ down` (in f32, stored back in the model dtype), the
    /// LoRAs one after the other in the order given. Returns the original weights, for
    /// [`remove_loras`](Self::remove_loras).
    ///
    /// Linear layers and convolutions (1×1 and 3×3: `down` `[r, in, k, k]`, `up`
    /// `[out, r, 1, 1]`) are covered; see [`crate::lora`] for the file layouts.
    ///
    /// To switch LoRAs without reloading, remove the applied ones and apply others.
    ///
    /// # Errors
    /// Nothing is changed when any of these fails: [`Error::InvalidCheckpoint`] listing the
    /// modules and keys that match no layer of the model (a LoRA for another model, or a text
    /// encoder the model lacks) or naming two modules that target the same layer;
    /// [`Error::ShapeMismatch`] naming the LoRA tensor that does not fit its layer;
    /// [`Error::InvalidArgument`] for a non-finite scale; tensor failures while merging.
    pub fn apply_loras(&mut self, loras: &[LoraSpec<'_>]) -> Result<AppliedLoras> {
        self.apply_loras_with(loras, LoraOptions::default())
    }

    /// [`apply_loras`](Self::apply_loras) with options.
    ///
    /// # Errors
    /// As [`apply_loras`](Self::apply_loras); with [`LoraOptions::skip_unknown`], unknown
    /// modules are listed in [`AppliedLoras::skipped`] instead.
    pub fn apply_loras_with(
        &mut self,
        loras: &[LoraSpec<'_>],
        options: LoraOptions,
    ) -> Result<AppliedLoras> {
        let index = LayerIndex::build(self)?;
        let (plan, skipped) = plan(&index, loras, options)?;
        let layers = merge(self, &plan)?;
        Ok(AppliedLoras { layers, skipped })
    }

    /// Takes merged LoRAs out again: restores the original weights kept in `applied`, bit for
    /// bit.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`], with nothing changed, when a layer of `applied` no longer holds
    /// the weight that merge produced: LoRAs applied later must be removed first, and `applied`
    /// must come from this model and not have been removed already.
    pub fn remove_loras(&mut self, applied: &AppliedLoras) -> Result<()> {
        let mut expected: HashMap<(LoraComponent, String), TensorId> = applied
            .layers
            .iter()
            .map(|l| ((l.component, l.module.clone()), l.merged))
            .collect();
        let mut changed = HashSet::new();
        for component in LoraComponent::ALL {
            visit_component(self, component, &mut |name, layer| {
                if let Some(id) = expected.remove(&(component, name.to_string())) {
                    if layer.weight_id() != id {
                        changed.insert(format!("{component}.{name}"));
                    }
                }
                Ok(())
            })?;
        }
        changed.extend(expected.keys().map(|(c, n)| format!("{c}.{n}")));
        if !changed.is_empty() {
            let mut changed: Vec<String> = changed.into_iter().collect();
            changed.sort();
            return Err(Error::invalid(format!(
                "cannot remove these LoRAs: {} of their layers no longer hold the merged weight \
                 (remove LoRAs applied later first; each set can be removed once, from the \
                 model it was applied to), e.g. {}",
                changed.len(),
                changed.first().map_or("", String::as_str)
            )));
        }
        restore(self, &applied.layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_ones_are_ignored() {
        assert_eq!(trim_ones(&[8, 1, 1]), &[8]);
        assert_eq!(trim_ones(&[8, 3, 3]), &[8, 3, 3]);
        assert_eq!(trim_ones(&[1, 1]), &[] as &[usize]);
    }
}
