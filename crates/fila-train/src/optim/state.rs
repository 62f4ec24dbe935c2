//! The optimizer's state in checkpoints: one shard file per rank, read back at any world size.

use super::AdamW;
use anyhow::{anyhow, bail, Context, Result};
use burn::prelude::*;
use burn::tensor::TensorData;
use fila_model::weights::{write_safetensors_from, Checkpoint, TensorSource};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The optimizer state of a checkpoint written by one rank (several ranks: [`shard_file`]).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Name of rank `rank`'s optimizer shard in a checkpoint (one rank: `optimizer.safetensors`).
pub fn shard_file(rank: usize, world: usize) -> String {
    if world == 1 {
        OPTIMIZER_FILE.to_string()
    } else {
        format!("optimizer-{rank:05}-of-{world:05}.safetensors")
    }
}

/// The optimizer shards of a checkpoint: `optimizer.safetensors` (one rank) or all of
/// `optimizer-RRRRR-of-WWWWW.safetensors`, checked complete.
fn shard_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let single = dir.join(OPTIMIZER_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut found: BTreeMap<usize, (usize, std::path::PathBuf)> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(body) = name.strip_prefix("optimizer-").and_then(|n| n.strip_suffix(".safetensors")) else { continue };
        let parsed = body.split_once("-of-").and_then(|(r, w)| Some((r.parse::<usize>().ok()?, w.parse::<usize>().ok()?)));
        let Some((rank, world)) = parsed else { continue };
        found.insert(rank, (world, entry.path()));
    }
    let Some(world) = found.values().next().map(|(w, _)| *w) else {
        bail!("{}: no optimizer state ({OPTIMIZER_FILE} or optimizer-*-of-*.safetensors)", dir.display());
    };
    if let Some(missing) = (0..world).find(|r| found.get(r).is_none_or(|(w, _)| *w != world)) {
        bail!("{}: the optimizer shard of rank {missing} of {world} is missing: the checkpoint is incomplete (resume from an earlier one)", dir.display());
    }
    Ok(found.into_values().map(|(_, p)| p).collect())
}

impl<I: Backend, S: Backend> AdamW<I, S> {
    /// Writes this rank's shard ([`shard_file`]) into `dir`: `exp_avg.<path>` and
    /// `exp_avg_sq.<path>` (and `master.<path>` when [`AdamW::master_in_checkpoint`]) for each
    /// parameter run of the slice (`…@<start>` when the run is part of the parameter), the step
    /// count in the metadata.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut sources = Vec::with_capacity(3 * self.layout.segments.len());
        for s in &self.layout.segments {
            let name = &self.layout.names[s.param];
            let key = if s.start == 0 && s.len == self.layout.numel(s.param) { name.clone() } else { format!("{name}@{}", s.start) };
            let kinds = [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq), ("master", &self.master)];
            for (kind, t) in kinds.into_iter().take(if self.master_in_checkpoint { 3 } else { 2 }) {
                sources.push(TensorSource::new(format!("{kind}.{key}"), vec![s.len], move || t.clone().slice(s.at..s.at + s.len).to_data()));
            }
        }
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        let path = dir.join(shard_file(self.layout.rank, self.layout.world));
        Ok(write_safetensors_from(&path, sources, Some(meta))?)
    }

    /// Reads the optimizer shards of checkpoint `dir`, written at any world size, and keeps this
    /// rank's slice of them. Every stored run must belong to a trainable parameter and lie inside it.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let files = shard_files(dir)?;
        let layout = &self.layout;
        let mut exp_avg = vec![0.0f32; layout.slice_len];
        let mut exp_avg_sq = vec![0.0f32; layout.slice_len];
        // Master values the checkpoint carries replace those taken from the model's weights.
        let mut master: Vec<f32> = self.master.to_data().to_vec().map_err(|e| anyhow!("{e:?}"))?;
        let mut step = None;
        for path in &files {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            let s: u64 = header
                .metadata()
                .as_ref()
                .and_then(|m| m.get("step"))
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("{}: no `step` in the metadata", path.display()))?;
            if *step.get_or_insert(s) != s {
                bail!("{}: step {s}, while another shard of this checkpoint has {}", path.display(), step.unwrap());
            }
            let file = Checkpoint::open(path)?;
            for key in file.keys().map(String::from).collect::<Vec<_>>() {
                let (kind, rest) = key.split_once('.').ok_or_else(|| anyhow!("{}: unexpected tensor `{key}`", path.display()))?;
                let target = match kind {
                    "exp_avg" => &mut exp_avg,
                    "exp_avg_sq" => &mut exp_avg_sq,
                    "master" => &mut master,
                    _ => bail!("{}: unexpected tensor `{key}`", path.display()),
                };
                let (name, start) = match rest.rsplit_once('@') {
                    Some((n, s)) if s.parse::<usize>().is_ok() => (n, s.parse().unwrap()),
                    _ => (rest, 0),
                };
                let Ok(p) = layout.names.binary_search_by(|n| n.as_str().cmp(name)) else {
                    bail!("{}: optimizer state for `{name}`, which is not trainable in this run", path.display());
                };
                let (shape, values) = file.read_f32(&key)?;
                if shape.len() != 1 || start + values.len() > layout.numel(p) {
                    bail!("{}: `{key}` has shape {shape:?}, which does not fit `{name}` ({} elements)", path.display(), layout.numel(p));
                }
                // Copy the part of this run that falls in this rank's slice.
                for seg in layout.segments.iter().filter(|s| s.param == p) {
                    let (lo, hi) = (seg.start.max(start), (seg.start + seg.len).min(start + values.len()));
                    if lo < hi {
                        target[seg.at + lo - seg.start..seg.at + hi - seg.start].copy_from_slice(&values[lo - start..hi - start]);
                    }
                }
            }
        }
        let device = self.master.device();
        let n = layout.slice_len;
        self.exp_avg = Tensor::from_data(TensorData::new(exp_avg, [n]), &device);
        self.exp_avg_sq = Tensor::from_data(TensorData::new(exp_avg_sq, [n]), &device);
        self.master = Tensor::from_data(TensorData::new(master, [n]), &device);
        self.step = step.unwrap_or(0);
        Ok(())
    }
}
