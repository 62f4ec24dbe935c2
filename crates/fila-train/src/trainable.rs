//! Which parameters train, in one function: [`apply_trainable`].
//!
//! Stage 1 trains CVFM and the projector by default, stage 2 everything; `trainable.modules`
//! overrides either. Frozen parameters get `require_grad = false`, so autodiff computes no
//! gradient for them (backward still flows *through* them to trainable parameters upstream), and
//! the optimizer never sees them: they stay bit-identical. A LoRA run (adapters attached,
//! [`crate::lora`]) trains the language model through its adapters only.

use anyhow::{bail, Result};
use burn::module::{Module, Param};
use burn::prelude::*;
use fila_model::fila::Fila;
use fila_model::lora::is_adapter_param;
use fila_model::weights::{map_params, visit_params, ParamPath, PathMapper, PathVisitor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which parameters train, and their learning-rate multipliers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrainableConfig {
    /// Names: `all`, `vit`, `convnext`, `cvfm`, `projector`, `llm`, or a parameter-path prefix
    /// such as `llm.model.layers.0`. Default: stage 1 `["cvfm", "projector"]` (the recipe: towers
    /// and LLM frozen), stage 2 `["all"]`.
    pub modules: Option<Vec<String>>,
    /// Module name (as in `modules`) → LR multiplier; the longest matching prefix wins.
    pub lr_multipliers: std::collections::BTreeMap<String, f64>,
}

/// Module names usable in `trainable.modules` and `trainable.lr_multipliers`, and the model
/// parameter-path prefix each stands for.
pub const MODULES: [(&str, &str); 6] =
    [("all", ""), ("vit", "encoder.vit."), ("convnext", "encoder.convnext."), ("cvfm", "encoder.cvfm."), ("projector", "projector."), ("llm", "llm.")];

/// Stage 1's trainable modules unless `trainable.modules` says otherwise.
pub const STAGE1_MODULES: [&str; 2] = ["cvfm", "projector"];

/// The module names that train in `stage`: `trainable.modules` when given, else the stage's default
/// (stage 1: [`STAGE1_MODULES`]; later stages: `all`).
pub fn stage_modules(stage: u8, config: &TrainableConfig) -> Vec<String> {
    match (stage, &config.modules) {
        (_, Some(list)) => list.clone(),
        (1, None) => STAGE1_MODULES.iter().map(|s| s.to_string()).collect(),
        (_, None) => vec!["all".to_string()],
    }
}

/// Whether the `trainable.modules` entry `name` trains all or part of `component` (a name in
/// [`MODULES`]): `all`, the component itself, or a parameter-path prefix inside it.
pub fn trains_part_of(name: &str, component: &str) -> bool {
    let (m, c) = (prefix_of(name), prefix_of(component));
    c.starts_with(&m) || m.starts_with(&c)
}

/// One trainable parameter as the optimizer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainableParam {
    pub shape: Vec<usize>,
    pub lr_multiplier: f64,
    /// AdamW weight decay applies: rank ≥ 2 and not an embedding (norms and biases are rank 1).
    pub decay: bool,
}

/// The trainable parameters by model path (`encoder.cvfm.0.fc_in.weight`), sorted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainableSet {
    pub params: BTreeMap<String, TrainableParam>,
    /// Parameters in the model, trainable or not.
    pub total_params: usize,
}

impl TrainableSet {
    pub fn contains(&self, path: &str) -> bool {
        self.params.contains_key(path)
    }

    pub fn num_elements(&self) -> usize {
        self.params.values().map(|p| p.shape.iter().product::<usize>()).sum()
    }

    /// Distinct LR multipliers, for per-group `train/lr` logging.
    pub fn lr_groups(&self) -> Vec<f64> {
        let mut m: Vec<f64> = self.params.values().map(|p| p.lr_multiplier).collect();
        m.sort_by(f64::total_cmp);
        m.dedup();
        m
    }
}

/// A module name or a raw path prefix → the prefix it matches.
fn prefix_of(name: &str) -> String {
    MODULES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| p.to_string())
        .unwrap_or_else(|| if name.ends_with('.') { name.to_string() } else { format!("{name}.") })
}

fn matches(path: &str, prefix: &str) -> bool {
    prefix.is_empty() || path.starts_with(prefix) || format!("{path}.") == prefix
}

fn is_embedding(path: &str) -> bool {
    path.contains("embed")
}

/// Applies the stage's trainable set to `model` and returns what trains. Every parameter is
/// initialised here (in visiting order, so seeded random initialisation is reproducible).
pub fn apply_trainable<B: Backend>(model: Fila<B>, stage: u8, config: &TrainableConfig) -> Result<(Fila<B>, TrainableSet)> {
    let shapes = param_shapes(&model);
    let names = stage_modules(stage, config);
    // With the ConvNeXt branch off (`model.hybrid.use_convnext = false`) the model has no
    // `convnext` or `cvfm`: stage 1 then trains the projector alone, and a stage-2 config written
    // for the full model still applies to the ablation.
    let branch_off = !shapes.keys().any(|p| p.starts_with("encoder.convnext."));
    let absent_branch = |name: &str| branch_off && matches!(name, "convnext" | "cvfm");
    let names: Vec<String> = names.into_iter().filter(|n| !absent_branch(n)).collect();
    for name in names.iter().chain(config.lr_multipliers.keys().filter(|n| !absent_branch(n))) {
        let prefix = prefix_of(name);
        if !shapes.keys().any(|p| matches(p, &prefix)) {
            let known: Vec<&str> = MODULES.iter().map(|(n, _)| *n).collect();
            bail!("`trainable`: `{name}` matches no parameter; use one of {known:?} or a parameter-path prefix such as `llm.model.layers.0`");
        }
    }
    let prefixes: Vec<String> = names.iter().map(|n| prefix_of(n)).collect();
    let multipliers: Vec<(String, f64)> = config.lr_multipliers.iter().map(|(n, m)| (prefix_of(n), *m)).collect();
    let mut set = TrainableSet { params: BTreeMap::new(), total_params: shapes.len() };
    // With LoRA adapters attached the language model trains through them: its adapters always
    // train, and of its own weights only those a `trainable.modules` entry names inside it (a path
    // prefix such as `llm.lm_head`, PEFT's `modules_to_save`); `llm` or `all` do not unfreeze them.
    let lora_run = shapes.keys().any(|p| is_adapter_param(p));
    let inside_llm: Vec<&String> = prefixes.iter().filter(|p| p.starts_with("llm.") && p.as_str() != "llm.").collect();
    for (path, shape) in &shapes {
        let trains = if lora_run && path.starts_with("llm.") {
            is_adapter_param(path) || inside_llm.iter().any(|p| matches(path, p))
        } else {
            prefixes.iter().any(|p| matches(path, p))
        };
        if !trains {
            continue;
        }
        // The longest matching prefix decides the multiplier.
        let lr_multiplier = multipliers.iter().filter(|(p, _)| matches(path, p)).max_by_key(|(p, _)| p.len()).map(|(_, m)| *m).unwrap_or(1.0);
        let decay = shape.len() >= 2 && !is_embedding(path);
        set.params.insert(path.clone(), TrainableParam { shape: shape.clone(), lr_multiplier, decay });
    }
    if set.params.is_empty() {
        bail!("`trainable`: no parameter is trainable");
    }
    let model = map_params(model, &mut Freezer { set: &set });
    Ok((model, set))
}

/// Parameter shapes by path, initialising lazy parameters in visiting order.
pub fn param_shapes<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Vec<usize>> {
    struct Shapes(BTreeMap<String, Vec<usize>>);
    impl<B: Backend> PathVisitor<B> for Shapes {
        fn visit<const D: usize>(&mut self, at: &ParamPath, param: &Param<Tensor<B, D>>) {
            self.0.insert(at.path(), param.val().dims().to_vec());
        }
    }
    let mut v = Shapes(BTreeMap::new());
    visit_params(module, &mut v);
    v.0
}

struct Freezer<'a> {
    set: &'a TrainableSet,
}

impl<B: Backend> PathMapper<B> for Freezer<'_> {
    fn map<const D: usize>(&mut self, at: &ParamPath, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(self.set.contains(&at.path()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(matches("encoder.cvfm.0.fc_in.weight", &prefix_of("cvfm")));
        assert!(!matches("encoder.vit.x", &prefix_of("cvfm")));
        assert!(matches("llm.model.layers.1.mlp.weight", &prefix_of("llm.model.layers.1")));
        assert!(!matches("llm.model.layers.10.mlp.weight", &prefix_of("llm.model.layers.1")));
        assert!(matches("anything", &prefix_of("all")));
    }

    #[test]
    fn a_module_trains_part_of_the_components_it_overlaps() {
        assert!(trains_part_of("all", "vit") && trains_part_of("llm", "llm"));
        assert!(trains_part_of("llm.model.layers.0", "llm") && trains_part_of("encoder.vit.encoder.layers.3", "vit"));
        assert!(!trains_part_of("cvfm", "projector") && !trains_part_of("llm.model", "vit"));
        assert!(!trains_part_of("encoder.vit", "convnext"));
    }
}
