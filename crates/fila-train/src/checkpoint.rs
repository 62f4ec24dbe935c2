//! Checkpoint I/O, in one place.
//!
//! `<output_dir>/step-<N>/` holds `trainable.safetensors` (the trainable parameters under their
//! model paths, Burn layout: resume state, not an interchange format), the optimizer state
//! (`optimizer.safetensors`, or one `optimizer-RRRRR-of-WWWWW.safetensors` per rank, re-cut by
//! parameter name when read at another world size), `state.json` and `config.toml`. All ranks
//! write into `.tmp-step-<N>/`, and rank 0 renames it into place once every rank has finished,
//! so a crash while writing leaves the previous checkpoints intact and no half-written `step-*`.
//! Several nodes need `output_dir` on a filesystem they share.
//! `final/` is the interchange export: the whole model under FILA checkpoint names
//! (`model.safetensors`), `config.json` (the `FilaConfig`) and `tokenizer.json`, loadable with
//! `Fila::load(.., &ModelSource::Checkpoint(final))`, and the Hugging Face remote code and
//! settings of [`crate::hf_export`] (transformers loads the same folder).

use crate::dist::Comm;
use crate::optim::state::shard_file;
pub use crate::optim::state::OPTIMIZER_FILE;
use crate::optim::AdamW;
use crate::trainable::TrainableSet;
use anyhow::{anyhow, bail, Context, Result};
use burn::module::Param;
use burn::prelude::*;
use fila_data::{BadRecordCounts, DataCursor};
use fila_model::fila::{Fila, FilaConfig};
use fila_model::weights::{map_params, visit_params, with_value, write_safetensors_from, Checkpoint, ParamPath, PathMapper, PathVisitor, TensorSource};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "state.json";
pub const WEIGHTS_FILE: &str = "trainable.safetensors";
pub const CONFIG_FILE: &str = "config.toml";

/// Everything besides tensors needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken (including skipped non-finite ones: they consumed their data).
    pub step: u64,
    pub epoch: u64,
    /// Where the data loader resumes.
    pub cursor: DataCursor,
    /// The schedule's length, fixed at the start of the run.
    pub total_steps: u64,
    /// Seeds: `seed` initialised fresh parameters; the data order depends only on
    /// `data_seed` and the cursor. Training itself draws no random numbers (no dropout), so these
    /// two are the whole RNG state.
    pub seed: u64,
    pub data_seed: u64,
    pub samples_seen: u64,
    pub tokens_seen: u64,
    pub nonfinite_total: u64,
    pub nonfinite_in_a_row: u64,
    /// Bad records skipped so far, by reason.
    pub skipped: BadRecordCounts,
    /// Why this checkpoint was written.
    pub reason: CheckpointReason,
    /// Ranks of the run that wrote it (optimizer shards); a resume may use another number.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

/// Why a checkpoint was written (`reason` in `state.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointReason {
    /// Every `checkpoint.every_steps`.
    #[serde(rename = "interval")]
    Interval,
    /// SIGINT or SIGTERM on some rank.
    #[serde(rename = "signal")]
    Signal,
    /// `--stop-after`.
    #[serde(rename = "stop_after")]
    StopAfter,
    /// Too many non-finite steps in a row.
    #[serde(rename = "nonfinite")]
    NonFinite,
    /// The run's last step.
    #[serde(rename = "end")]
    End,
}

/// The step checkpoints in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u64 = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join(STATE_FILE).is_file().then(|| (n, e.path()))
        })
        .collect();
    out.sort();
    out
}

pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    list(output_dir).pop().map(|(_, p)| p)
}

/// Trainable parameters by path, in Burn layout, read one at a time as the file is written.
fn trainable_tensors<B: Backend>(model: &Fila<B>, set: &TrainableSet) -> Vec<TensorSource<'static>> {
    struct Collect<'a> {
        set: &'a TrainableSet,
        out: Vec<TensorSource<'static>>,
    }
    impl<B: Backend> PathVisitor<B> for Collect<'_> {
        fn visit<const D: usize>(&mut self, at: &ParamPath, param: &Param<Tensor<B, D>>) {
            let path = at.path();
            if self.set.contains(&path) {
                let value = param.val();
                self.out.push(TensorSource::new(path, value.dims().to_vec(), move || value.to_data()));
            }
        }
    }
    let mut c = Collect { set, out: Vec::new() };
    visit_params(model, &mut c);
    c.out
}

/// Writes the step checkpoints of a run, from every rank together.
pub struct CheckpointWriter<'a> {
    pub output_dir: PathBuf,
    /// The resolved run config, stored beside the weights.
    pub config_toml: String,
    /// Checkpoints kept (0 keeps all).
    pub keep_last: usize,
    pub comm: &'a Comm,
}

impl CheckpointWriter<'_> {
    /// Writes `step-<step>/` atomically and prunes to the newest `keep_last`. Every rank calls it
    /// at the same step; every rank returns the same error if any rank's part failed.
    pub fn save<B, S>(&self, model: &Fila<B>, set: &TrainableSet, optimizer: &AdamW<B::InnerBackend, S>, state: &TrainState) -> Result<PathBuf>
    where
        B: burn::tensor::backend::AutodiffBackend,
        S: burn::tensor::backend::Backend,
    {
        let world = self.comm.world();
        let name = format!("step-{}", state.step);
        let tmp = self.output_dir.join(format!(".tmp-{name}"));
        let dest = self.output_dir.join(&name);
        // Rank 0 clears a stale temporary folder before anyone writes into it.
        let prepared = if world.is_root() { prepare_dir(&tmp) } else { Ok(()) };
        self.agree(prepared, "preparing", &tmp)?;
        let written = (|| -> Result<()> {
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            optimizer.save(&tmp)?;
            if world.is_root() {
                write_safetensors_from(&tmp.join(WEIGHTS_FILE), trainable_tensors(model, set), None)?;
                std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
                std::fs::write(tmp.join(CONFIG_FILE), &self.config_toml)?;
            }
            Ok(())
        })();
        self.agree(written, "writing", &tmp)?;
        let published = if world.is_root() { self.publish(&tmp, &dest) } else { Ok(()) };
        self.agree(published, "publishing", &dest)?;
        Ok(dest)
    }

    /// Rank 0: checks that every rank's shard is there, renames, prunes.
    fn publish(&self, tmp: &Path, dest: &Path) -> Result<()> {
        let size = self.comm.world().size;
        if let Some(r) = (0..size).find(|&r| !tmp.join(shard_file(r, size)).is_file()) {
            bail!("rank {r}'s optimizer shard is not in {}: every node must see the same `checkpoint.output_dir` (a shared filesystem)", tmp.display());
        }
        sync_dir(tmp);
        if dest.exists() {
            // Same step written again (a resumed run that stopped at once): replace it.
            std::fs::remove_dir_all(dest)?;
        }
        std::fs::rename(tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        sync_dir(&self.output_dir);
        if self.keep_last > 0 {
            let all = list(&self.output_dir);
            for (_, old) in all.iter().take(all.len().saturating_sub(self.keep_last)) {
                std::fs::remove_dir_all(old).with_context(|| format!("pruning {}", old.display()))?;
            }
        }
        Ok(())
    }

    /// Every rank learns whether every rank's part of `what` succeeded; a failure names its rank.
    fn agree(&self, result: Result<()>, what: &str, dir: &Path) -> Result<()> {
        let mine = match &result {
            Ok(()) => Vec::new(),
            Err(e) => format!("{e:#}").into_bytes(),
        };
        let all = self.comm.exchange(&mine)?;
        if let Some((rank, message)) = all.iter().enumerate().find(|(_, m)| !m.is_empty()) {
            let prefix = if self.comm.world().size > 1 { format!("rank {rank}: ") } else { String::new() };
            bail!("{prefix}{what} checkpoint {}: {}", dir.display(), String::from_utf8_lossy(message));
        }
        Ok(())
    }
}

fn prepare_dir(tmp: &Path) -> Result<()> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))
}

/// Flushes a folder's entries (file contents are flushed by the writers' close); best effort.
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

pub fn read_state(dir: &Path) -> Result<TrainState> {
    let file = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))
}

pub fn read_config(dir: &Path) -> Result<toml::Table> {
    let file = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    toml::from_str(&text).map_err(|e| anyhow!("parsing {}: {e}", file.display()))
}

/// Loads `trainable.safetensors` into the model: every trainable parameter must be there with
/// its shape, and nothing else may be.
pub fn load_trainable<B: Backend>(model: Fila<B>, set: &TrainableSet, dir: &Path) -> Result<Fila<B>> {
    let path = dir.join(WEIGHTS_FILE);
    let file = Checkpoint::open(&path)?;
    if let Some(extra) = file.keys().find(|k| !set.contains(k)) {
        bail!("{}: `{extra}` is not a trainable parameter of this run (different stage or trainable list?)", path.display());
    }
    struct Load<'a> {
        file: &'a Checkpoint,
        set: &'a TrainableSet,
        problems: Vec<String>,
    }
    impl<B: Backend> PathMapper<B> for Load<'_> {
        fn map<const D: usize>(&mut self, at: &ParamPath, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let path = at.path();
            if !self.set.contains(&path) {
                return param;
            }
            match self.file.read_f32(&path) {
                Ok((shape, values)) => {
                    let dims = param.val().dims();
                    if shape != dims.to_vec() {
                        self.problems.push(format!("`{path}` has shape {shape:?}, the model {dims:?}"));
                        return param;
                    }
                    with_value(param, values, shape)
                }
                Err(e) => {
                    self.problems.push(format!("{e}"));
                    param
                }
            }
        }
    }
    let mut loader = Load { file: &file, set, problems: Vec::new() };
    let model = map_params(model, &mut loader);
    if !loader.problems.is_empty() {
        bail!("{}:\n  {}", path.display(), loader.problems.join("\n  "));
    }
    Ok(model)
}

/// Writes `final/`: the whole model, its config, the tokenizer, the run config whose `[data]`
/// table `fila generate` and `fila eval` read, and the Hugging Face files (through a temporary
/// folder).
pub fn export_final<B: Backend>(output_dir: &Path, model: &Fila<B>, config: &FilaConfig, tokenizer: &Path, run_config: &str) -> Result<PathBuf> {
    export_model_to(&output_dir.join("final"), model, config, tokenizer, run_config, &|_| Ok(()))
}

/// Writes a `final/`-style model folder at `dest` (replacing one that is there) through a
/// temporary sibling `.tmp-<name>` renamed into place at the end. A model with LoRA adapters or
/// NF4 weights is written merged ([`Fila::merged_sources`]: one merged weight at a time).
pub fn export_model_to<B: Backend>(
    dest: &Path,
    model: &Fila<B>,
    config: &FilaConfig,
    tokenizer: &Path,
    run_config: &str,
    extra: &dyn Fn(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dest = dest.to_path_buf();
    let name = dest.file_name().ok_or_else(|| anyhow!("{}: not a folder name", dest.display()))?.to_string_lossy().into_owned();
    let tmp = dest.with_file_name(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    write_safetensors_from(&tmp.join("model.safetensors"), model.merged_sources(), None)?;
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(config)?)?;
    std::fs::copy(tokenizer, tmp.join("tokenizer.json")).with_context(|| format!("copying {}", tokenizer.display()))?;
    std::fs::write(tmp.join("run.toml"), exported_run_config(run_config)?)?;
    crate::hf_export::write_hf_files(&tmp, config, &crate::hf_export::data_config_of(run_config)?).context("writing the Hugging Face files")?;
    extra(&tmp)?;
    sync_dir(&tmp);
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}

/// The run config as a model folder keeps it (`run.toml`): the run's, with `[model]` naming the
/// folder itself (`checkpoint = "."`), so that a command given this file (`fila forward --config
/// final/run.toml`, a next stage) reads the trained model, not the one the run started from.
fn exported_run_config(run_config: &str) -> Result<String> {
    let mut table: toml::Table = toml::from_str(run_config).context("the run config to export")?;
    table.insert("model".into(), toml::Value::Table(toml::Table::from_iter([("checkpoint".to_string(), toml::Value::from("."))])));
    let header: String = run_config.lines().take_while(|l| l.starts_with('#')).map(|l| format!("{l}\n")).collect();
    Ok(format!("{header}# [model] names this folder: the trained model.\n{}", toml::to_string(&table)?))
}

/// Parameter values by path (tests compare runs with this).
pub fn all_tensors<B: Backend>(model: &Fila<B>) -> BTreeMap<String, Vec<f32>> {
    model.named_tensors().into_iter().map(|(k, d)| (k, d.convert::<f32>().to_vec().expect("f32"))).collect()
}
