//! The run config: one TOML file with `[model]` (fila-model's `ModelSpec`), `[data]` (fila-data's
//! `DataConfig`) and the training sections below. Unknown keys are rejected everywhere; every
//! default is written here, once: a section whose keys are all optional reads a left-out key, and
//! a left-out section, from its `Default` impl; a key beside a required one (`optimizer.lr`,
//! `checkpoint.output_dir`) from its `default_*` function. `--set a.b=value` overrides are applied
//! to the TOML tree before deserialising, so they are checked exactly like keys in the file.
//!
//! Relative paths are taken from the config file's folder and made absolute on load, so the
//! resolved config saved with a run (`config.toml`) reads the same from anywhere.

pub use crate::trainable::TrainableConfig;
use anyhow::{anyhow, bail, Context, Result};
use fila_data::DataConfig;
use fila_model::spec::ModelSpec;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// 1: CVFM + projector on untiled images; 2: the configured modules on tiled images.
    pub stage: u8,
    /// Seeds the initialisation of fresh (random) parameters.
    #[serde(default)]
    pub seed: u64,
    /// `cpu` or `cuda:N` (in a multi-process run each rank takes `cuda:<local rank>`).
    #[serde(default)]
    pub device: crate::backend::Device,
    #[serde(default)]
    pub precision: crate::precision::Precision,
    pub model: ModelSpec,
    /// Kept as TOML here; read by fila-data (`DataConfig`), which owns its keys.
    pub data: toml::Value,
    #[serde(default)]
    pub trainable: TrainableConfig,
    /// Low-rank adapters on the language model (`lora.r > 0`); off by default.
    #[serde(default)]
    pub lora: crate::lora::LoraConfig,
    /// Required, for its `lr` (see [`OptimizerConfig`]).
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub train: LoopConfig,
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub distributed: DistributedConfig,
}

/// How ranks share the work (`[distributed]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// Reduce-scatter a micro-batch's gradient buckets while the computation goes on (under
    /// activation checkpointing each bucket as soon as the backward pass has made it final) rather
    /// than after its backward pass. The result is the same bit for bit; off only to measure.
    pub overlap: bool,
    /// Elements per gradient bucket (f32), the unit of a reduce-scatter and an all-gather
    /// (DeepSpeed's `reduce_bucket_size`). Smaller buckets start sooner and hold less memory in
    /// flight; larger ones make fewer, more efficient collectives. Checkpoints do not depend on it.
    pub bucket_elements: usize,
    /// 2: the optimizer state, master values and gradient sums are sharded over the ranks and
    /// every rank holds the whole model; 3: the trainable weights too, each segment's gathered
    /// just before it runs ([`crate::zero3`]). Checkpoints are the same under both.
    pub zero_stage: u8,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self { overlap: true, bucket_elements: crate::shard::BUCKET_ELEMENTS, zero_stage: 2 }
    }
}

/// AdamW, with PyTorch's defaults for every key but the learning rate.
///
/// `lr` has no default, so `[optimizer]` with `lr` is required: the stages need learning rates 50×
/// apart (FILA / LLaVA-1.5: 1e-3 in stage 1, 2e-5 in stage 2), and a wrong one trains without an
/// error, only worse. A stage default would hide that choice; the error names both values instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Applied only to weights of rank ≥ 2 that are not embeddings (no norms, biases, embeddings).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Where the optimizer's state (f32 master values, both moments, the gradient slice) lives
    /// and the update runs: `"none"` (the training device) or `"cpu"` (host memory, the update on
    /// CPU threads: for one or two GPUs whose memory the state does not fit).
    #[serde(default)]
    pub offload: Offload,
}

/// `optimizer.offload`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    #[default]
    None,
    Cpu,
}

/// Linear warmup from 0, then cosine to `min_lr_ratio × lr` (Hugging Face's
/// `cosine_with_min_lr`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Fraction of the total steps spent warming up (rounded up); ignored if `warmup_steps` is set.
    pub warmup_ratio: f64,
    pub warmup_steps: Option<u64>,
    pub min_lr_ratio: f64,
}

impl Default for ScheduleConfig {
    /// FILA / LLaVA-1.5: 3 % warmup, cosine to 0.
    fn default() -> Self {
        Self { warmup_ratio: 0.03, warmup_steps: None, min_lr_ratio: 0.0 }
    }
}

/// Batch geometry. The global batch is `micro_batch_size × accumulation_steps` (one process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Samples per forward/backward; replaces `[data.loader] batch_size`.
    pub micro_batch_size: usize,
    pub accumulation_steps: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { micro_batch_size: 1, accumulation_steps: 1 }
    }
}

/// Length of the run and its guards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopConfig {
    pub epochs: u64,
    /// Stop after this many optimizer steps (also sets the schedule's length).
    pub max_steps: Option<u64>,
    /// Global-norm clipping as `torch.nn.utils.clip_grad_norm_`; 0 = off.
    pub max_grad_norm: f64,
    /// Stop (with a checkpoint) after this many non-finite steps in a row.
    pub max_nonfinite_steps: u64,
    /// Activation checkpointing: keep only each LLM decoder layer's input and recompute the layer
    /// in the backward pass; the loss runs in chunks of scored positions ([`crate::recompute`]).
    /// About one more forward pass of the LLM, for a fraction of its activation memory.
    pub activation_checkpointing: bool,
}

impl Default for LoopConfig {
    /// One epoch; clipping at 1.0, the Hugging Face Trainer's default that LLaVA-1.5 keeps.
    fn default() -> Self {
        Self { epochs: 1, max_steps: None, max_grad_norm: 1.0, max_nonfinite_steps: 5, activation_checkpointing: false }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Run folder: `step-<N>/`, `final/`, `config.toml`, `tensorboard/`.
    pub output_dir: PathBuf,
    /// Write `step-<N>/` every N optimizer steps (0: only at the end and on a signal).
    #[serde(default = "default_every")]
    pub every_steps: u64,
    /// Keep the newest K step checkpoints (0 keeps all).
    #[serde(default = "default_keep")]
    pub keep_last: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub every_steps: u64,
    /// Default `<output_dir>/tensorboard`.
    pub tensorboard_dir: Option<PathBuf>,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { every_steps: 1, tensorboard_dir: None }
    }
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    // torch.optim.AdamW's default.
    0.01
}
fn default_every() -> u64 {
    500
}
fn default_keep() -> usize {
    2
}

/// Applies `a.b.c=value` to a TOML tree. `value` is read as a TOML value (`1e-4`, `true`,
/// `[1, 2]`, `"text"`), or taken as a bare string when it does not parse as one. A number in the
/// path indexes an array (`data.sources.0.path=...`).
pub fn apply_override(root: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment.split_once('=').ok_or_else(|| anyhow!("--set `{assignment}`: expected KEY=VALUE, e.g. --set optimizer.lr=1e-4"))?;
    let key = key.trim();
    let raw = raw.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set `{assignment}`: empty key segment in `{key}`");
    }
    let mut root_value = toml::Value::Table(std::mem::take(root));
    let result = set_path(&mut root_value, &parts, 0, value, key);
    *root = match root_value {
        toml::Value::Table(t) => t,
        _ => unreachable!("the root stays a table"),
    };
    result
}

fn set_path(node: &mut toml::Value, parts: &[&str], i: usize, value: toml::Value, key: &str) -> Result<()> {
    let part = parts[i];
    let last = i + 1 == parts.len();
    let child = match node {
        toml::Value::Table(t) => {
            if last {
                t.insert(part.to_string(), value);
                return Ok(());
            }
            t.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()))
        }
        toml::Value::Array(a) => {
            let index: usize = part.parse().map_err(|_| anyhow!("--set `{key}`: `{part}` indexes an array, expected a number"))?;
            let len = a.len();
            let slot = a.get_mut(index).ok_or_else(|| anyhow!("--set `{key}`: index {index} out of range (array has {len} entries)"))?;
            if last {
                *slot = value;
                return Ok(());
            }
            slot
        }
        other => bail!("--set `{key}`: `{}` is a {}, not a table", parts[..i].join("."), other.type_str()),
    };
    set_path(child, parts, i + 1, value, key)
}

/// Deserialises `value` naming the path of any bad key (`optimizer.lr: invalid type ...`).
pub fn from_value<T: DeserializeOwned>(value: toml::Value, section: &str) -> Result<T> {
    let result: std::result::Result<T, serde_path_to_error::Error<toml::de::Error>> = serde_path_to_error::deserialize(value);
    result.map_err(|e| {
        let path = e.path().to_string();
        let key = match (section.is_empty(), path.as_str()) {
            (true, ".") => String::new(),
            (true, p) => p.to_string(),
            (false, ".") => section.to_string(),
            (false, p) => format!("{section}.{p}"),
        };
        let inner = e.into_inner();
        let message = inner.message().to_string();
        if key.is_empty() {
            anyhow!("{message}")
        } else {
            anyhow!("`{key}`: {message}")
        }
    })
}

/// A loaded config: the parsed sections, the data config and the TOML it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: TrainConfig,
    pub data: DataConfig,
    /// The resolved TOML (overrides applied, paths absolute): what `config.toml` holds.
    pub resolved: toml::Table,
    pub source: PathBuf,
}

impl LoadedConfig {
    /// Reads `path`, applies `overrides` in order, makes paths absolute, parses and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| anyhow!("config {}: {e}", path.display()))?;
        for o in overrides {
            apply_override(&mut table, o).with_context(|| format!("config {}", path.display()))?;
        }
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        let base = std::path::absolute(&base).unwrap_or(base);
        absolutize_paths(&mut table, &base);
        Self::from_table(table, path).with_context(|| format!("config {}", path.display()))
    }

    /// Parses an already resolved tree (a run's saved `config.toml`).
    pub fn from_table(table: toml::Table, source: &Path) -> Result<Self> {
        // Before serde's bare "missing field": the learning rate has no default (see OptimizerConfig).
        let lr_missing = match table.get("optimizer") {
            None => true,
            Some(toml::Value::Table(optimizer)) => !optimizer.contains_key("lr"),
            Some(_) => false,
        };
        if lr_missing {
            bail!(
                "`optimizer.lr` is not set, and it has no default: add `[optimizer]` with `lr = 1e-3` for stage 1 \
                 or `lr = 2e-5` for stage 2 (FILA / LLaVA-1.5), or pass `--set optimizer.lr=...`"
            );
        }
        let mut config: TrainConfig = from_value(toml::Value::Table(table.clone()), "")?;
        let data_value = config.data.clone();
        let mut data: DataConfig = from_value(data_value.clone(), "data")?;
        data.validate().map_err(|m| anyhow!("`data`: {m}"))?;
        // The trainer owns the micro-batch size; a different one in [data.loader] is a mistake.
        if let Some(b) = data_value.get("loader").and_then(|l| l.get("batch_size")).and_then(|v| v.as_integer()) {
            if b as usize != config.batch.micro_batch_size {
                bail!(
                    "`data.loader.batch_size` = {b} differs from `batch.micro_batch_size` = {}; set only `batch.micro_batch_size`",
                    config.batch.micro_batch_size
                );
            }
        }
        data.loader.batch_size = config.batch.micro_batch_size;
        config.validate()?;
        config.data = data_value;
        Ok(Self { config, data, resolved: table, source: source.to_path_buf() })
    }

    /// The resolved config as TOML text, with a header naming where it came from.
    pub fn to_toml(&self) -> String {
        format!(
            "# Resolved config of a fila-train run (overrides applied, paths absolute).\n# Source: {}\n{}",
            self.source.display(),
            toml::to_string(&self.resolved).expect("TOML tables serialise")
        )
    }

    pub fn tensorboard_dir(&self) -> PathBuf {
        self.config.logging.tensorboard_dir.clone().unwrap_or_else(|| self.config.checkpoint.output_dir.join("tensorboard"))
    }
}

impl TrainConfig {
    /// Checks values serde cannot; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.stage != 1 && self.stage != 2 {
            bail!("`stage` = {}: must be 1 or 2", self.stage);
        }
        self.lora.validate()?;
        if self.lora.quantized() && !self.train.activation_checkpointing {
            bail!(
                "`lora.base_bits = 4` (QLoRA) needs `train.activation_checkpointing = true`: each product keeps its de-quantised weight for the backward pass, \
                 which without checkpointing holds the whole language model de-quantised at once; with it one layer's at a time"
            );
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            bail!("`optimizer.lr` = {}: must be a positive number", o.lr);
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                bail!("`optimizer.betas[{i}]` = {b}: must be in [0, 1)");
            }
        }
        if o.eps.is_nan() || o.eps <= 0.0 {
            bail!("`optimizer.eps` = {}: must be positive", o.eps);
        }
        if o.weight_decay.is_nan() || o.weight_decay < 0.0 {
            bail!("`optimizer.weight_decay` = {}: must be ≥ 0", o.weight_decay);
        }
        let s = &self.schedule;
        if !(0.0..=1.0).contains(&s.warmup_ratio) {
            bail!("`schedule.warmup_ratio` = {}: must be in [0, 1]", s.warmup_ratio);
        }
        if !(0.0..=1.0).contains(&s.min_lr_ratio) {
            bail!("`schedule.min_lr_ratio` = {}: must be in [0, 1]", s.min_lr_ratio);
        }
        if self.batch.micro_batch_size == 0 {
            bail!("`batch.micro_batch_size` must be ≥ 1");
        }
        if self.batch.accumulation_steps == 0 {
            bail!("`batch.accumulation_steps` must be ≥ 1");
        }
        if self.train.epochs == 0 && self.train.max_steps.is_none() {
            bail!("`train.epochs` = 0 and no `train.max_steps`: nothing to train");
        }
        if self.train.max_grad_norm.is_nan() || self.train.max_grad_norm < 0.0 {
            bail!("`train.max_grad_norm` = {}: must be ≥ 0 (0 turns clipping off)", self.train.max_grad_norm);
        }
        if self.train.max_nonfinite_steps == 0 {
            bail!("`train.max_nonfinite_steps` must be ≥ 1");
        }
        if !matches!(self.distributed.zero_stage, 2 | 3) {
            bail!("`distributed.zero_stage` is {}: expected 2 (shard the optimizer) or 3 (shard the weights too)", self.distributed.zero_stage);
        }
        if self.distributed.bucket_elements == 0 {
            bail!("`distributed.bucket_elements` must be ≥ 1 (default {})", crate::shard::BUCKET_ELEMENTS);
        }
        if self.logging.every_steps == 0 {
            bail!("`logging.every_steps` must be ≥ 1");
        }
        for (name, m) in &self.trainable.lr_multipliers {
            if !(m.is_finite() && *m >= 0.0) {
                bail!("`trainable.lr_multipliers.{name}` = {m}: must be a finite number ≥ 0");
            }
        }
        let known: Vec<&str> = crate::trainable::MODULES.iter().map(|(n, _)| *n).collect();
        let listed = self.trainable.modules.iter().flatten().map(|n| ("trainable.modules", n));
        for (key, name) in listed.chain(self.trainable.lr_multipliers.keys().map(|n| ("trainable.lr_multipliers", n))) {
            if !known.contains(&name.as_str()) && !name.contains('.') {
                bail!("`{key}`: unknown module `{name}`; use one of {known:?} or a parameter-path prefix such as `llm.model.layers.0`");
            }
        }
        self.precision.check_device(self.device).map_err(|m| anyhow!("`precision`: {m}"))?;
        Ok(())
    }
}

/// Makes the known path keys absolute against `base` (the config's folder).
fn absolutize_paths(table: &mut toml::Table, base: &Path) {
    fn fix(value: Option<&mut toml::Value>, base: &Path) {
        if let Some(toml::Value::String(s)) = value {
            let p = Path::new(s.as_str());
            if p.is_relative() {
                *s = normalize(&base.join(p)).to_string_lossy().into_owned();
            }
        }
    }
    if let Some(toml::Value::Table(model)) = table.get_mut("model") {
        for key in ["checkpoint", "vision", "convnext", "llm"] {
            fix(model.get_mut(key), base);
        }
    }
    if let Some(toml::Value::Table(data)) = table.get_mut("data") {
        fix(data.get_mut("tokenizer"), base);
        if let Some(toml::Value::Array(sources)) = data.get_mut("sources") {
            for s in sources.iter_mut().filter_map(|s| s.as_table_mut()) {
                fix(s.get_mut("path"), base);
                fix(s.get_mut("image_folder"), base);
            }
        }
    }
    if let Some(toml::Value::Table(c)) = table.get_mut("checkpoint") {
        fix(c.get_mut("output_dir"), base);
    }
    if let Some(toml::Value::Table(l)) = table.get_mut("logging") {
        fix(l.get_mut("tensorboard_dir"), base);
    }
}

/// Removes `.` and `a/..` lexically (the paths may not exist yet).
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Keys whose change makes a checkpoint unusable: the model, the data and the batch geometry.
/// Loader threads and prefetch depth may change freely, and so may the world size as long as the
/// samples per step stay the same (`accumulation_steps × world size`: 4 ranks × 1 resume as 2 × 2).
pub fn geometry_difference(saved: &toml::Table, saved_world: usize, now: &toml::Table, now_world: usize) -> Option<String> {
    let strip = |t: &toml::Table, world: usize| {
        let mut out = toml::Table::new();
        for key in ["stage", "model", "data", "batch"] {
            if let Some(v) = t.get(key) {
                out.insert(key.to_string(), v.clone());
            }
        }
        if let Some(toml::Value::Table(batch)) = out.get_mut("batch") {
            let acc = batch.remove("accumulation_steps").and_then(|v| v.as_integer()).unwrap_or(1);
            batch.insert("accumulation_steps × world size".into(), toml::Value::Integer(acc * world as i64));
        }
        if let Some(toml::Value::Table(loader)) = out.get_mut("data").and_then(|d| d.get_mut("loader")) {
            loader.remove("workers");
            loader.remove("prefetch_batches");
        }
        out
    };
    fn diff(path: &str, a: Option<&toml::Value>, b: Option<&toml::Value>) -> Option<String> {
        match (a, b) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                keys.into_iter().find_map(|k| diff(&join(path, k), x.get(k), y.get(k)))
            }
            (Some(toml::Value::Array(x)), Some(toml::Value::Array(y))) if x.len() == y.len() => {
                (0..x.len()).find_map(|i| diff(&format!("{path}[{i}]"), Some(&x[i]), Some(&y[i])))
            }
            (x, y) if x == y => None,
            (x, y) => Some(format!("`{path}`: checkpoint has {}, this config has {}", show(x), show(y))),
        }
    }
    fn join(path: &str, key: &str) -> String {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    }
    fn show(v: Option<&toml::Value>) -> String {
        v.map(|v| v.to_string()).unwrap_or_else(|| "(not set)".into())
    }
    diff("", Some(&toml::Value::Table(strip(saved, saved_world))), Some(&toml::Value::Table(strip(now, now_world))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    fn read<T: DeserializeOwned>(text: &str, section: &str) -> T {
        from_value(toml::Value::Table(table(text)), section).unwrap()
    }

    /// The tiny stage-1 config with every optional section and key taken out.
    fn minimal_config() -> toml::Table {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny/stage1.toml");
        let mut t = table(&std::fs::read_to_string(&path).unwrap());
        for section in ["seed", "device", "precision", "trainable", "schedule", "batch", "train", "logging"] {
            t.remove(section);
        }
        t.insert("optimizer".into(), toml::Value::Table(table("lr = 0.5")));
        t.insert("checkpoint".into(), toml::Value::Table(table("output_dir = \"run\"")));
        t
    }

    /// A left-out key or section reads as the section's `Default` impl, so the file and the code
    /// cannot disagree about a default.
    #[test]
    fn left_out_keys_and_sections_read_as_the_defaults() {
        assert_eq!(read::<TrainableConfig>("", "trainable"), TrainableConfig::default());
        assert_eq!(read::<ScheduleConfig>("", "schedule"), ScheduleConfig::default());
        assert_eq!(read::<BatchConfig>("", "batch"), BatchConfig::default());
        assert_eq!(read::<LoopConfig>("", "train"), LoopConfig::default());
        assert_eq!(read::<LoggingConfig>("", "logging"), LoggingConfig::default());
        let c: TrainConfig = from_value(toml::Value::Table(minimal_config()), "").unwrap();
        assert_eq!(c.trainable, TrainableConfig::default());
        assert_eq!(c.schedule, ScheduleConfig::default());
        assert_eq!(c.batch, BatchConfig::default());
        assert_eq!(c.train, LoopConfig::default());
        assert_eq!(c.logging, LoggingConfig::default());
        assert_eq!((c.seed, c.device, c.precision), (0, Default::default(), Default::default()));
        // One key set, the others still from the section's default.
        assert_eq!(read::<LoopConfig>("max_steps = 7", "train"), LoopConfig { max_steps: Some(7), ..LoopConfig::default() });
        assert_eq!(read::<BatchConfig>("accumulation_steps = 3", "batch"), BatchConfig { accumulation_steps: 3, ..BatchConfig::default() });
    }

    /// The values themselves; the keys beside a required one (`lr`, `output_dir`) have only these.
    #[test]
    fn the_defaults_are_pytorch_and_the_recipe() {
        let c: TrainConfig = from_value(toml::Value::Table(minimal_config()), "").unwrap();
        assert_eq!(c.optimizer, OptimizerConfig { lr: 0.5, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.01, offload: Default::default() });
        assert_eq!((c.checkpoint.every_steps, c.checkpoint.keep_last), (500, 2));
        let s = &c.schedule;
        assert_eq!((s.warmup_ratio, s.warmup_steps, s.min_lr_ratio), (0.03, None, 0.0));
        assert_eq!((c.batch.micro_batch_size, c.batch.accumulation_steps), (1, 1));
        let l = &c.train;
        assert_eq!((l.epochs, l.max_steps, l.max_grad_norm, l.max_nonfinite_steps, l.activation_checkpointing), (1, None, 1.0, 5, false));
        assert_eq!((c.logging.every_steps, c.logging.tensorboard_dir.as_deref()), (1, None));
        assert_eq!((&c.trainable.modules, c.trainable.lr_multipliers.len()), (&None, 0));
    }

    /// Without `optimizer.lr` the config does not load, and the error gives both stages' values.
    #[test]
    fn the_learning_rate_is_required() {
        let path = Path::new("minimal.toml");
        let mut no_lr = minimal_config();
        no_lr.insert("optimizer".into(), toml::Value::Table(table("weight_decay = 0.0")));
        let mut no_section = minimal_config();
        no_section.remove("optimizer");
        for t in [no_lr, no_section] {
            let e = LoadedConfig::from_table(t, path).unwrap_err().to_string();
            assert!(e.contains("`optimizer.lr` is not set") && e.contains("1e-3") && e.contains("2e-5"), "{e}");
        }
        assert!(LoadedConfig::from_table(minimal_config(), path).is_ok());
    }

    #[test]
    fn overrides_set_nested_values_with_toml_types() {
        let mut t = table("[optimizer]\nlr = 1.0\n[[data.sources]]\npath = \"a\"\n");
        apply_override(&mut t, "optimizer.lr=1e-4").unwrap();
        apply_override(&mut t, "train.max_steps=7").unwrap();
        apply_override(&mut t, "data.sources.0.path=b/c.json").unwrap();
        apply_override(&mut t, "device=\"cuda:0\"").unwrap();
        assert_eq!(t["optimizer"]["lr"].as_float(), Some(1e-4));
        assert_eq!(t["train"]["max_steps"].as_integer(), Some(7));
        assert_eq!(t["data"]["sources"][0]["path"].as_str(), Some("b/c.json"));
        assert_eq!(t["device"].as_str(), Some("cuda:0"));
        assert!(apply_override(&mut t, "optimizer.lr.x=1").unwrap_err().to_string().contains("optimizer.lr"));
        assert!(apply_override(&mut t, "nokey").is_err());
    }

    #[test]
    fn geometry_difference_names_the_key() {
        let a = table("stage = 1\n[batch]\nmicro_batch_size = 4\n[data.loader]\nworkers = 2\n[optimizer]\nlr = 1.0\n");
        let mut b = a.clone();
        apply_override(&mut b, "data.loader.workers=8").unwrap();
        apply_override(&mut b, "optimizer.lr=2.0").unwrap();
        assert_eq!(geometry_difference(&a, 1, &b, 1), None);
        // 4 ranks × accumulation 1 resume as 2 ranks × 2, not as 2 × 1.
        apply_override(&mut b, "batch.accumulation_steps=2").unwrap();
        assert_eq!(geometry_difference(&a, 4, &b, 2), None);
        let d = geometry_difference(&a, 4, &b, 1).unwrap();
        assert!(d.contains("`batch.accumulation_steps × world size`: checkpoint has 4, this config has 2"), "{d}");
        apply_override(&mut b, "batch.micro_batch_size=2").unwrap();
        let d = geometry_difference(&a, 4, &b, 2).unwrap();
        assert!(d.contains("`batch.micro_batch_size`") && d.contains('4') && d.contains('2'), "{d}");
    }
}
