//! LoRA runs, in one place: the `[lora]` settings, the adapters attached to the language model,
//! their learning rate, and what `final/` gets (the merged model, plus the adapters on their own).
//!
//! With `lora.r > 0` every targeted projection of the language model gets an adapter
//! (`fila_model::lora`); the language model's own weights are frozen and its adapters train,
//! while everything else follows `trainable.modules` as before (stage 2: the ViT, ConvNeXt, CVFM
//! and projector stay fully trainable, as LLaVA's `non_lora_trainables`). Step checkpoints then
//! hold the adapters and the other trainable tensors only; `final/` holds the merged model under
//! the usual names, so every command loads it as a full run's, and `adapter.safetensors` with
//! `adapter_config.json` for those who keep the base model apart.
//!
//! With `lora.base_bits = 4` (QLoRA) the seven projections of every decoder layer are stored as
//! NF4 from the load on ([`fila_model::fila::Fila::load_quantized`]) and de-quantised for each
//! product. The de-quantised weight of a product is kept by autodiff for its input's gradient, so
//! QLoRA requires `train.activation_checkpointing`: the decoder layers then run without a graph
//! and are recomputed one at a time in the backward pass, and only one layer's de-quantised
//! weights exist at once. `final/` holds the NF4-rounded base plus the adapters, merged.

use crate::config::LoadedConfig;
use crate::trainable::TrainableSet;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use fila_model::fila::Fila;
use fila_model::lora::{self, is_adapter_param, peft_name, LoraSpec, LLAMA_TARGETS};
use fila_model::weights::write_safetensors_from;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Adapters written beside the merged model in `final/`.
pub const ADAPTER_FILE: &str = "adapter.safetensors";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// `[lora]`: low-rank adapters on the language model (off unless `r` is set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank of every adapter; 0 (the default) trains without adapters. `--set lora.r=8` turns
    /// LoRA on for any config.
    pub r: usize,
    /// Adapters add `alpha / r · B·A` to their weight. Default `2·r` (LLaVA: r 128, alpha 256).
    pub alpha: Option<f64>,
    /// Dropout on each adapter's input while training (LLaVA and PEFT: 0.05).
    pub dropout: f64,
    /// The adapted projections of every decoder layer: default all seven linear layers of the
    /// language model (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
    pub targets: Vec<String>,
    /// Peak learning rate of the adapters (the schedule scales it like the others); default
    /// `optimizer.lr`. LLaVA's LoRA recipe: 2e-4 for the adapters, 2e-5 for the projector.
    pub lr: Option<f64>,
    /// Storage of the language model's frozen weights: 16 (as loaded) or 4 (QLoRA's NF4).
    pub base_bits: u32,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { r: 0, alpha: None, dropout: 0.05, targets: LLAMA_TARGETS.iter().map(|t| t.to_string()).collect(), lr: None, base_bits: 16 }
    }
}

impl LoraConfig {
    pub fn enabled(&self) -> bool {
        self.r > 0
    }

    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.r as f64)
    }

    pub fn spec(&self) -> LoraSpec {
        LoraSpec { r: self.r, alpha: self.alpha(), dropout: self.dropout, targets: self.targets.clone() }
    }

    /// Checks the settings whether or not LoRA is on (a typo in an unused table is still a typo);
    /// part of the config's validation.
    pub fn validate(&self) -> Result<()> {
        if let Some(bad) = self.targets.iter().find(|t| !LLAMA_TARGETS.contains(&t.as_str())) {
            bail!("`lora.targets`: unknown projection `{bad}`; the language model's linear layers are {LLAMA_TARGETS:?}");
        }
        if self.enabled() && self.targets.is_empty() {
            bail!("`lora.targets` is empty; name some of {LLAMA_TARGETS:?} or set `lora.r = 0`");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("`lora.dropout` = {} must be in [0, 1)", self.dropout);
        }
        if let Some(lr) = self.lr {
            if !(lr > 0.0 && lr.is_finite()) {
                bail!("`lora.lr` = {lr} must be a positive number");
            }
        }
        match self.base_bits {
            16 => Ok(()),
            4 if !self.enabled() => {
                bail!("`lora.base_bits = 4` (QLoRA) stores the frozen language model in NF4 and trains it through adapters: set `lora.r` (e.g. 64) too")
            }
            4 => Ok(()),
            other => bail!("`lora.base_bits` = {other}: use 16 (the weights as loaded) or 4 (NF4)"),
        }
    }

    /// QLoRA: the language model's projection weights stored as NF4 (`base_bits = 4`).
    pub fn quantized(&self) -> bool {
        self.enabled() && self.base_bits == 4
    }
}

/// `model` with fresh adapters on its language model (drawn from the backend's generator, so a
/// seeded run draws the same ones), or unchanged when LoRA is off.
pub fn attach<B: Backend>(mut model: Fila<B>, config: &LoraConfig, device: &B::Device) -> Result<Fila<B>> {
    if config.enabled() {
        model.llm = lora::attach(model.llm, &config.spec(), device).map_err(|e| anyhow::anyhow!("`[lora]`: {e}"))?;
    }
    Ok(model)
}

/// Gives the adapters their learning rate: `lora.lr / optimizer.lr` as their multiplier (times any
/// `trainable.lr_multipliers` entry that matched them).
pub fn set_adapter_lr(set: &mut TrainableSet, config: &LoraConfig, base_lr: f64) {
    if let Some(lr) = config.lr {
        for (_, param) in set.params.iter_mut().filter(|(path, _)| is_adapter_param(path)) {
            param.lr_multiplier *= lr / base_lr;
        }
    }
}

/// The model `final/` holds: every adapter merged into its weight (a clone; `model` keeps its
/// adapters).
pub fn merged<B: Backend>(model: &Fila<B>) -> Fila<B> {
    let mut out = model.clone();
    out.llm = lora::merge(out.llm);
    out
}

/// Writes `adapter.safetensors` and `adapter_config.json` (PEFT's keys) into `dir`: the adapters
/// under PEFT's names and layout for a Llama (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
/// `[r, in]`, `lora_B` `[out, r]`, f32), and the language model's own tensors that trained in full
/// (`trainable.modules` entries inside it, PEFT's `modules_to_save`) as
/// `base_model.model.<name>` (`base_model.model.lm_head.weight`): with the base model, everything
/// the run changed in the language model. Nothing is written when `model` has no adapters.
pub fn write_adapters<B: Backend>(dir: &Path, model: &Fila<B>, config: &LoraConfig, set: &TrainableSet) -> Result<()> {
    let full = |path: &str| path.starts_with("llm.") && !is_adapter_param(path) && set.contains(path);
    let mut sources = model.named_sources(&|path| is_adapter_param(path) || full(path));
    if !sources.iter().any(|s| s.name.contains(".lora_")) {
        return Ok(());
    }
    let mut saved_in_full = Vec::new();
    for source in &mut sources {
        let name = match peft_name(&source.name) {
            Some(name) => name,
            None => {
                let module = source.name.rsplit_once('.').map_or(source.name.as_str(), |(m, _)| m).to_string();
                if !saved_in_full.contains(&module) {
                    saved_in_full.push(module);
                }
                source.name.clone()
            }
        };
        source.name = format!("base_model.model.{name}");
    }
    write_safetensors_from(&dir.join(ADAPTER_FILE), sources, None)?;
    let adapter_config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.alpha(),
        "lora_dropout": config.dropout,
        "target_modules": config.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "base_model_name_or_path": null,
        "modules_to_save": saved_in_full,
    });
    std::fs::write(dir.join(ADAPTER_CONFIG_FILE), serde_json::to_string_pretty(&adapter_config)?)?;
    Ok(())
}

/// `fila merge-lora`: the model of a LoRA run's step checkpoint (`step-N/`: its `config.toml`,
/// the base model that config names, the adapters and other trainable tensors) merged and
/// written as a model folder at `dest`, loadable by every command as a `final/`, with the
/// adapters beside it.
pub fn merge_step_checkpoint(step_dir: &Path, dest: &Path) -> Result<PathBuf> {
    type B = burn::backend::Autodiff<burn::backend::Flex>;
    let config_file = step_dir.join(crate::checkpoint::CONFIG_FILE);
    if !step_dir.join(crate::checkpoint::WEIGHTS_FILE).is_file() || !config_file.is_file() {
        bail!(
            "{}: not a step checkpoint (no {} and {}); pass a run's `step-N` folder",
            step_dir.display(),
            crate::checkpoint::WEIGHTS_FILE,
            crate::checkpoint::CONFIG_FILE
        );
    }
    let loaded = LoadedConfig::load(&config_file, &[])?;
    if !loaded.config.lora.enabled() {
        bail!("{}: the run has no LoRA adapters (`lora.r` = 0); its `final/` or the model it names is already the whole model", config_file.display());
    }
    let device = Default::default();
    let (model, fila_config, set) =
        crate::trainer::build_model::<B>(&loaded, &device).with_context(|| format!("building the model of {}", config_file.display()))?;
    let model = crate::checkpoint::load_trainable(model, &set, step_dir)?;
    let adapters = |dir: &Path| write_adapters(dir, &model, &loaded.config.lora, &set);
    crate::checkpoint::export_model_to(dest, &model, &fila_config, &loaded.data.tokenizer, &loaded.to_toml(), &adapters)
}
