//! Merging LoRAs into a loaded [`SdxlModel`] and taking them out again.
//!
//! Everything is checked before the first weight changes (every module must name a layer of the
//! model, with matching shapes), and a failure while merging puts the weights already changed
//! back, so an error never leaves a half-merged model. The original layers (sharing their weights' storage) are kept in
//! the returned [`AppliedLoras`], so [`SdxlModel::remove_loras`] restores them bit for bit.
//!
//! Components loaded on demand ([`Residency::OnDemand`](crate::pipeline::Residency)) have no
//! weights to edit between uses: their updates are recorded and merged, in
//! the order they were applied and with the same arithmetic, each time the component is read,
//! so they compute exactly what the resident component would.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Tensor, TensorId};

use super::file::{LoraComponent, LoraFormat, LoraModule, LoraWeights};
use super::kohya::{kohya_module_name, SgmUnetLayout};
use crate::error::{Error, Result};
use crate::layers::{LayerMut, LayerVisitor, SavedLayer};
use crate::pipeline::{SdxlModel, TextStack};
use crate::unet::UNet2DConditionModel;

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

/// Identifies one [`SdxlModel::apply_loras`] call among the updates recorded for a layer that
/// is loaded on demand.
static NEXT_SET: AtomicU64 = AtomicU64::new(0);

/// How a merged layer is taken back.
#[derive(Debug, Clone)]
enum Undo {
    /// A resident layer: its weight before the merge, and the identity of the merged weight.
    Restore {
        original: SavedLayer,
        merged: TensorId,
    },
    /// A layer loaded on demand: the updates recorded under this set.
    Forget { set: u64 },
}

/// A layer changed by a merge.
#[derive(Debug, Clone)]
struct MergedLayer {
    component: LoraComponent,
    module: String,
    undo: Undo,
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

/// Calls `f` on the linear layers of one text encoder of `text`. Returns `false` when there is
/// no such encoder (the refiner has no `text_encoder`) or `component` is the UNet.
fn visit_text(
    text: &mut TextStack,
    component: LoraComponent,
    f: &mut LayerVisitor<'_>,
) -> Result<bool> {
    let encoder = match component {
        LoraComponent::Unet => None,
        LoraComponent::TextEncoder => text.encoder_1.as_mut().map(|(_, e)| e),
        LoraComponent::TextEncoder2 => Some(&mut text.encoder_2.1),
    };
    match encoder {
        Some(e) => {
            e.visit_linears_mut(&mut |name, linear| f(name, LayerMut::Linear(linear)))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Calls `f` on every layer of one resident component: all linear and convolution layers of
/// the UNet, the linear layers of a text encoder. Components loaded on demand, and those the
/// model lacks, are skipped.
fn visit_resident(
    model: &mut SdxlModel,
    component: LoraComponent,
    f: &mut LayerVisitor<'_>,
) -> Result<()> {
    match component {
        LoraComponent::Unet => match model.resident_unet_mut() {
            Some(unet) => unet.visit_layers_mut(f),
            None => Ok(()),
        },
        _ => match model.resident_text_mut() {
            Some(text) => visit_text(text, component, f).map(drop),
            None => Ok(()),
        },
    }
}

/// Every layer of the model by component and path, with its weight shape, and the kohya name
/// of each.
struct LayerIndex {
    shapes: HashMap<(LoraComponent, String), Vec<usize>>,
    kohya: HashMap<String, (LoraComponent, String)>,
}

impl LayerIndex {
    /// Indexes the layers of `components`. A component loaded on demand is read for this (one
    /// at a time) and dropped again.
    fn build(model: &SdxlModel, components: &BTreeSet<LoraComponent>) -> Result<Self> {
        let mut index = Self {
            shapes: HashMap::new(),
            kohya: HashMap::new(),
        };
        if components.contains(&LoraComponent::Unet) {
            let mut unet = model.unmerged_unet()?;
            let layout = SgmUnetLayout::of(&unet);
            unet.to_mut()
                .visit_layers_mut(&mut index.recorder(LoraComponent::Unet, Some(&layout)))?;
        }
        let text_components: Vec<LoraComponent> = components
            .iter()
            .copied()
            .filter(|&c| c != LoraComponent::Unet)
            .collect();
        if !text_components.is_empty() {
            let mut text = model.unmerged_text()?;
            for component in text_components {
                visit_text(
                    text.to_mut(),
                    component,
                    &mut index.recorder(component, None),
                )?;
            }
        }
        Ok(index)
    }

    /// A visitor adding the layers of `component` to the index; `unet_layout` names the UNet's
    /// layers in the SGM layout.
    fn recorder<'a>(
        &'a mut self,
        component: LoraComponent,
        unet_layout: Option<&'a SgmUnetLayout>,
    ) -> impl FnMut(&str, LayerMut<'_>) -> Result<()> + 'a {
        move |name, layer| {
            let id = (component, name.to_string());
            // kohya UNet names are SGM names; names derived from diffusers paths (as SD 1.x
            // kohya files and some converters write them) are accepted too.
            let mut names = vec![format!(
                "{}{}",
                component.kohya_prefix(),
                name.replace('.', "_")
            )];
            if let Some(layout) = unet_layout {
                names.extend(kohya_module_name(component, name, layout));
            }
            for n in names {
                self.kohya.insert(n, id.clone());
            }
            self.shapes.insert(id, layer.weight_dims());
            Ok(())
        }
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

/// One module's share of a layer's update: `multiplier · up @ down`.
#[derive(Debug, Clone)]
struct Contribution {
    up: Tensor,
    down: Tensor,
    multiplier: f64,
}

/// A layer by component and module path.
type LayerKey = (LoraComponent, String);

type Plan = BTreeMap<LayerKey, Vec<Contribution>>;

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
fn plan(
    index: &LayerIndex,
    loras: &[LoraSpec<'_>],
    options: LoraOptions,
) -> Result<(Plan, Vec<String>)> {
    let mut plan: Plan = BTreeMap::new();
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
                up: module.up().clone(),
                down: module.down().clone(),
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
fn merged_weight(weight: &Tensor, contributions: &[Contribution]) -> Result<Tensor> {
    let device = weight.device();
    let out = weight.dim(0)?;
    let mut merged = weight.to_dtype(DType::F32)?;
    for c in contributions {
        let rank = c.down.dim(0)?;
        let up =
            c.up.to_device(device)?
                .to_dtype(DType::F32)?
                .reshape((out, rank))?;
        let down = c
            .down
            .to_device(device)?
            .to_dtype(DType::F32)?
            .reshape((rank, ()))?;
        let delta = (up.matmul(&down)? * c.multiplier)?.reshape(weight.dims())?;
        merged = (merged + delta)?;
    }
    Ok(merged.to_dtype(weight.dtype())?)
}

/// Takes `layers` back without checking what they hold now: resident layers get their original
/// weights, the updates recorded for on-demand layers are dropped.
fn restore(model: &mut SdxlModel, layers: &[MergedLayer]) -> Result<()> {
    let mut originals: HashMap<LayerKey, &SavedLayer> = HashMap::new();
    for l in layers {
        let key = (l.component, l.module.clone());
        match &l.undo {
            Undo::Restore { original, .. } => {
                originals.insert(key, original);
            }
            Undo::Forget { .. } => model.loras.forget(&key),
        }
    }
    for component in LoraComponent::ALL {
        visit_resident(model, component, &mut |name, mut layer| match originals
            .remove(&(component, name.to_string()))
        {
            Some(original) => layer.restore(name, original.clone()),
            None => Ok(()),
        })?;
    }
    Ok(())
}

/// Merges the planned updates into the resident layers and records those of the on-demand
/// ones under `set`; on failure, restores what was merged and returns the error.
fn merge(model: &mut SdxlModel, plan: Plan, set: u64) -> Result<Vec<MergedLayer>> {
    let mut merged = Vec::with_capacity(plan.len());
    let mut result = Ok(());
    for component in LoraComponent::ALL {
        result = visit_resident(model, component, &mut |name, mut layer| {
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
                undo: Undo::Restore {
                    original,
                    merged: id,
                },
            });
            Ok(())
        });
        if result.is_err() {
            break;
        }
    }
    if let Err(e) = result {
        restore(model, &merged)?;
        return Err(e);
    }
    for ((component, module), contributions) in plan {
        if model.is_resident(component) {
            continue;
        }
        model
            .loras
            .record((component, module.clone()), set, contributions);
        merged.push(MergedLayer {
            component,
            module,
            undo: Undo::Forget { set },
        });
    }
    Ok(merged)
}

/// The LoRA updates of the layers that are loaded on demand, merged into them each time they
/// are read. Per layer, the `apply_loras` sets in the order they were applied.
#[derive(Debug, Clone, Default)]
pub(crate) struct PendingLoras {
    layers: HashMap<LayerKey, Vec<(u64, Vec<Contribution>)>>,
}

impl PendingLoras {
    fn record(&mut self, key: LayerKey, set: u64, contributions: Vec<Contribution>) {
        self.layers
            .entry(key)
            .or_default()
            .push((set, contributions));
    }

    /// The set recorded last for a layer.
    fn last_set(&self, key: &LayerKey) -> Option<u64> {
        self.layers.get(key)?.last().map(|(set, _)| *set)
    }

    /// Drops the set recorded last for a layer.
    fn forget(&mut self, key: &LayerKey) {
        if let Some(sets) = self.layers.get_mut(key) {
            sets.pop();
            if sets.is_empty() {
                self.layers.remove(key);
            }
        }
    }

    /// A visitor merging the recorded updates of `component` into the layers it is given, set
    /// after set, as [`merge`] merged them into resident layers.
    fn merger(
        &self,
        component: LoraComponent,
    ) -> impl FnMut(&str, LayerMut<'_>) -> Result<()> + '_ {
        move |name, mut layer| {
            for (_, contributions) in self
                .layers
                .get(&(component, name.to_string()))
                .into_iter()
                .flatten()
            {
                let new = merged_weight(&layer.weight()?, contributions)?;
                layer.set_weight(name, new)?;
            }
            Ok(())
        }
    }

    fn has(&self, component: LoraComponent) -> bool {
        self.layers.keys().any(|(c, _)| *c == component)
    }

    /// Merges the recorded UNet updates into a UNet just read.
    pub(crate) fn merge_into_unet(&self, unet: &mut UNet2DConditionModel) -> Result<()> {
        if self.has(LoraComponent::Unet) {
            unet.visit_layers_mut(&mut self.merger(LoraComponent::Unet))?;
        }
        Ok(())
    }

    /// Merges the recorded text-encoder updates into text encoders just read.
    pub(crate) fn merge_into_text(&self, text: &mut TextStack) -> Result<()> {
        for component in [LoraComponent::TextEncoder, LoraComponent::TextEncoder2] {
            if self.has(component) {
                visit_text(text, component, &mut self.merger(component))?;
            }
        }
        Ok(())
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
    /// Components loaded on demand ([`Residency::OnDemand`](crate::pipeline::Residency)) get
    /// the same updates merged each time they are read, so they compute exactly what resident
    /// ones do. To check the LoRAs against their layers, such a component is read once here,
    /// one at a time, if a LoRA targets it.
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
        let components = loras
            .iter()
            .flat_map(|spec| spec.lora.modules())
            .map(LoraModule::component)
            .collect();
        let index = LayerIndex::build(self, &components)?;
        let (plan, skipped) = plan(&index, loras, options)?;
        let set = NEXT_SET.fetch_add(1, Ordering::Relaxed);
        let layers = merge(self, plan, set)?;
        Ok(AppliedLoras { layers, skipped })
    }

    /// Takes merged LoRAs out again: restores the original weights kept in `applied`, bit for
    /// bit (components loaded on demand stop merging them).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`], with nothing changed, when a layer of `applied` no longer holds
    /// the weight that merge produced: LoRAs applied later must be removed first, and `applied`
    /// must come from this model and not have been removed already.
    pub fn remove_loras(&mut self, applied: &AppliedLoras) -> Result<()> {
        let mut expected: HashMap<LayerKey, TensorId> = HashMap::new();
        let mut changed = HashSet::new();
        for l in &applied.layers {
            let key = (l.component, l.module.clone());
            match l.undo {
                Undo::Restore { merged, .. } => {
                    expected.insert(key, merged);
                }
                Undo::Forget { set } => {
                    if self.loras.last_set(&key) != Some(set) {
                        changed.insert(format!("{}.{}", l.component, l.module));
                    }
                }
            }
        }
        for component in LoraComponent::ALL {
            visit_resident(self, component, &mut |name, layer| {
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
