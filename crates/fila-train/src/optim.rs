//! AdamW over named parameters (PyTorch's `torch.optim.AdamW` update, single-tensor path), the
//! warmup-cosine schedule, and global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).
//!
//! Written here rather than taken from burn-optim because Burn's AdamW decays every parameter
//! (no groups), its `GradientClippingConfig::Norm` clips each tensor on its own, and it cannot
//! shard its state or gradients across ranks. Gradients are flat f32 tensors on the inner (non-autodiff)
//! backend, keyed by model path; the optimizer state is one flat slice per rank ([`FlatLayout`]).

use crate::checkpoint::OPTIMIZER_FILE;
use crate::config::{OptimizerConfig, ScheduleConfig};
use crate::dist::Comm;
use crate::shard::FlatLayout;
use crate::trainable::TrainableSet;
use anyhow::{anyhow, bail, Context, Result};
use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{FloatDType, TensorData};
use fila_model::weights::{map_params, visit_params, write_safetensors, Checkpoint, ParamPath, PathMapper, PathVisitor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Gradients by parameter path, flattened.
pub type Grads<I> = BTreeMap<String, Tensor<I, 1>>;

/// Adds the gradients of the trainable parameters in `grads` to `acc` (one entry per parameter,
/// summed where a parameter is reached more than once).
pub fn accumulate_grads<B: AutodiffBackend, M: Module<B>>(model: &M, grads: &B::Gradients, set: &TrainableSet, acc: &mut Grads<B::InnerBackend>) {
    struct Collector<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        set: &'a TrainableSet,
        acc: &'a mut Grads<B::InnerBackend>,
    }
    impl<B: AutodiffBackend> PathVisitor<B> for Collector<'_, B> {
        fn visit<const D: usize>(&mut self, at: &ParamPath, param: &Param<Tensor<B, D>>) {
            let path = at.path();
            if !self.set.contains(&path) {
                return;
            }
            if let Some(g) = param.val().grad(self.grads) {
                let n = g.shape().num_elements();
                // Kept in the weight's dtype (the map holds a whole micro-batch's gradients);
                // a parameter reached twice (tied weights, or two segments) sums in f32.
                let g = g.reshape([n]);
                let sum = match self.acc.remove(&path) {
                    Some(prev) => prev.cast(FloatDType::F32) + g.cast(FloatDType::F32),
                    None => g,
                };
                self.acc.insert(path, sum);
            }
        }
    }
    visit_params(model, &mut Collector::<B> { grads, set, acc });
}

/// PyTorch's `clip_grad_norm_` factor for a global gradient norm: `max_norm / (norm + 1e-6)` when
/// that is below 1; `None` (no clipping) otherwise, when `max_norm` is 0 or the norm not finite.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (norm + 1e-6);
    (max_norm > 0.0 && norm.is_finite() && coef < 1.0).then_some(coef)
}

/// Learning rate at an optimizer step: linear warmup from 0, then cosine down to
/// `min_lr_ratio × peak` — Hugging Face's `get_cosine_with_min_lr_schedule_with_warmup`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_lr_ratio: f64,
}

impl Schedule {
    pub fn new(peak: f64, config: &ScheduleConfig, total_steps: u64) -> Self {
        // HF: warmup = ceil(ratio × total).
        let warmup_steps = config.warmup_steps.unwrap_or_else(|| (config.warmup_ratio * total_steps as f64).ceil() as u64);
        Self { peak, warmup_steps, total_steps, min_lr_ratio: config.min_lr_ratio }
    }

    /// `step`: optimizer steps already taken (0 for the first update).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let progress = (step - self.warmup_steps) as f64 / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
        self.peak * (cosine * (1.0 - self.min_lr_ratio) + self.min_lr_ratio)
    }
}

/// AdamW (PyTorch's `torch.optim.AdamW` update) over this rank's slice of the trainable
/// parameters ([`FlatLayout`]): f32 master values and both moments for the slice only, gradients
/// reduce-scattered into it, global-norm clipping over all ranks, the updated slice all-gathered
/// back into the model. One rank is the same path with the whole model as its slice.
pub struct AdamW<I: Backend> {
    pub config: OptimizerConfig,
    /// Updates taken (PyTorch's `step`, shared by all parameters: they all update together).
    pub step: u64,
    pub layout: FlatLayout,
    master: Tensor<I, 1>,
    exp_avg: Tensor<I, 1>,
    exp_avg_sq: Tensor<I, 1>,
    /// Per element of the slice: the parameter's LR multiplier, and 1 where weight decay applies.
    lr_multiplier: Tensor<I, 1>,
    decays: Tensor<I, 1>,
    /// The step's gradient slice so far (summed over micro-batches and ranks), and which
    /// parameters received a gradient on this rank.
    grad: Option<Tensor<I, 1>>,
    has_grad: Vec<bool>,
    /// Whether checkpoints carry the master slice (`master.<path>`): needed when the model
    /// stores its trainable weights in a lower precision ([`crate::precision::Precision::master_apart`]).
    pub master_in_checkpoint: bool,
}

/// Name of rank `rank`'s optimizer shard in a checkpoint (one rank: `optimizer.safetensors`).
pub fn shard_file(rank: usize, world: usize) -> String {
    if world == 1 {
        OPTIMIZER_FILE.to_string()
    } else {
        format!("optimizer-{rank:05}-of-{world:05}.safetensors")
    }
}

/// The flat values of the trainable parameters of `model`, by layout index.
fn flat_values<B: AutodiffBackend, M: Module<B>>(model: &M, layout: &FlatLayout) -> Vec<Option<Tensor<B::InnerBackend, 1>>> {
    struct Collect<'a, I: Backend> {
        layout: &'a FlatLayout,
        out: Vec<Option<Tensor<I, 1>>>,
    }
    impl<B: AutodiffBackend> PathVisitor<B> for Collect<'_, B::InnerBackend> {
        fn visit<const D: usize>(&mut self, at: &ParamPath, param: &Param<Tensor<B, D>>) {
            if let Ok(i) = self.layout.names.binary_search(&at.path()) {
                let t = param.val().inner();
                let n = t.shape().num_elements();
                self.out[i] = Some(t.reshape([n]).cast(FloatDType::F32));
            }
        }
    }
    let mut c = Collect { layout, out: vec![None; layout.names.len()] };
    visit_params(model, &mut c);
    c.out
}

impl<I: Backend> AdamW<I> {
    /// Fresh moments; the master slice taken from `model`'s current values.
    pub fn new<B, M>(config: OptimizerConfig, set: &TrainableSet, layout: FlatLayout, model: &M, device: &I::Device) -> Self
    where
        B: AutodiffBackend<InnerBackend = I>,
        M: Module<B>,
    {
        let values = flat_values::<B, M>(model, &layout);
        let master = layout.own_slice(&|p| values[p].clone(), device);
        let info = |p: usize| &set.params[&layout.names[p]];
        let lr_multiplier = layout.per_element(|p| info(p).lr_multiplier as f32, 0.0, device);
        let decays = layout.per_element(|p| if info(p).decay { 1.0 } else { 0.0 }, 0.0, device);
        let zeros = Tensor::zeros([layout.slice_len], device);
        let has_grad = vec![false; layout.names.len()];
        Self {
            config,
            step: 0,
            layout,
            master,
            exp_avg: zeros.clone(),
            exp_avg_sq: zeros,
            lr_multiplier,
            decays,
            grad: None,
            has_grad,
            master_in_checkpoint: false,
        }
    }

    /// Adds one micro-batch's gradients (`grads`: this rank's, by path) to the step's gradient
    /// slice: reduce-scattered bucket by bucket over all ranks (ZeRO-2), so no rank keeps more
    /// than its slice across micro-batches. Every rank calls it equally often per step; a rank
    /// without a micro-batch for this call passes no gradients (it contributes zeros).
    pub fn add_gradients(&mut self, grads: &Grads<I>, comm: &Comm) -> Result<()> {
        let layout = &self.layout;
        let device = self.master.device();
        for (p, name) in layout.names.iter().enumerate() {
            self.has_grad[p] |= grads.contains_key(name);
        }
        let mut pieces = Vec::with_capacity(layout.buckets.len());
        for b in 0..layout.buckets.len() {
            let bucket = layout.bucket_tensor(b, &|p| grads.get(&layout.names[p]).map(|g| g.clone().cast(FloatDType::F32)), &device);
            pieces.push(comm.reduce_scatter(bucket)?);
        }
        let piece = Tensor::cat(pieces, 0);
        self.grad = Some(match self.grad.take() {
            Some(sum) => sum + piece,
            None => piece,
        });
        Ok(())
    }

    /// Drops the step's gradients without an update (a skipped step).
    pub fn clear_gradients(&mut self) {
        self.grad = None;
        self.has_grad.fill(false);
    }

    /// One update at learning rate `lr` from the gradients added since the last step: clip to
    /// `max_norm` by the global norm, AdamW on the slice, all-gather into `model`. Returns the
    /// model and the global gradient norm before clipping; a non-finite norm leaves everything as
    /// it was (the caller counts the step as skipped).
    pub fn step<B, M>(&mut self, model: M, lr: f64, max_norm: f64, comm: &Comm) -> Result<(M, f64)>
    where
        B: AutodiffBackend<InnerBackend = I>,
        M: Module<B>,
    {
        let device = self.master.device();
        // Parameters without a gradient on any rank (unused this step) are left untouched.
        let local: Vec<f64> = self.has_grad.iter().map(|&h| f64::from(u8::from(h))).collect();
        let present: Vec<bool> = comm.sum_f64(&local)?.into_iter().map(|c| c > 0.0).collect();
        let mut grad = self.grad.take().unwrap_or_else(|| Tensor::zeros([self.layout.slice_len], &device));
        self.has_grad.fill(false);
        let layout = &self.layout;
        let local_sq = grad.clone().powf_scalar(2.0).sum().into_scalar().elem::<f64>();
        let norm = comm.sum_f64(&[local_sq])?[0].sqrt();
        if !norm.is_finite() {
            return Ok((model, norm));
        }
        if let Some(coef) = clip_coefficient(norm, max_norm) {
            grad = grad.mul_scalar(coef as f32);
        }

        self.step += 1;
        let t = self.step as i32;
        let [beta1, beta2] = self.config.betas;
        let (bias_correction1, bias_correction2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        let lr_vec = self.lr_multiplier.clone().mul_scalar(lr as f32);
        let mut p = self.master.clone();
        if self.config.weight_decay > 0.0 {
            let factor = (lr_vec.clone() * self.decays.clone()).mul_scalar(-self.config.weight_decay as f32).add_scalar(1.0);
            p = p * factor;
        }
        let m = self.exp_avg.clone().mul_scalar(beta1 as f32) + grad.clone().mul_scalar((1.0 - beta1) as f32);
        let v = self.exp_avg_sq.clone().mul_scalar(beta2 as f32) + grad.powf_scalar(2.0).mul_scalar((1.0 - beta2) as f32);
        let denom = v.clone().sqrt().div_scalar(bias_correction2.sqrt() as f32).add_scalar(self.config.eps as f32);
        p = p - (m.clone() / denom) * lr_vec.div_scalar(bias_correction1 as f32);
        if present.iter().all(|&x| x) {
            (self.master, self.exp_avg, self.exp_avg_sq) = (p, m, v);
        } else {
            let absent = layout.per_element(|i| if present[i] { 0.0 } else { 1.0 }, 1.0, &device).equal_elem(1.0);
            self.master = p.mask_where(absent.clone(), self.master.clone());
            self.exp_avg = m.mask_where(absent.clone(), self.exp_avg.clone());
            self.exp_avg_sq = v.mask_where(absent, self.exp_avg_sq.clone());
        }

        let mut gathered = Vec::with_capacity(layout.buckets.len());
        for bucket in &layout.buckets {
            let piece = bucket.piece(layout.world);
            gathered.push(comm.all_gather(self.master.clone().slice(bucket.at..bucket.at + piece))?);
        }
        let params = layout.params_from_buckets(gathered);
        Ok((map_params(model, &mut SetValues::<B> { layout, params: params.into_iter().map(Some).collect() }), norm))
    }

    /// Writes this rank's shard ([`shard_file`]) into `dir`: `exp_avg.<path>` and
    /// `exp_avg_sq.<path>` (and `master.<path>` when [`AdamW::master_in_checkpoint`]) for each
    /// parameter run of the slice (`…@<start>` when the run is part of the parameter), the step
    /// count in the metadata.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors = Vec::with_capacity(2 * self.layout.segments.len());
        for s in &self.layout.segments {
            let name = &self.layout.names[s.param];
            let key = if s.start == 0 && s.len == self.layout.numel(s.param) { name.clone() } else { format!("{name}@{}", s.start) };
            let kinds = [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq), ("master", &self.master)];
            for (kind, t) in kinds.into_iter().take(if self.master_in_checkpoint { 3 } else { 2 }) {
                tensors.push((format!("{kind}.{key}"), t.clone().slice(s.at..s.at + s.len).to_data()));
            }
        }
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        let path = dir.join(shard_file(self.layout.rank, self.layout.world));
        write_safetensors(&path, &tensors, Some(meta)).map_err(|e| anyhow!("{e}"))
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
            let file = Checkpoint::open(path).map_err(|e| anyhow!("{e}"))?;
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
                let (shape, values) = file.read_f32(&key).map_err(|e| anyhow!("{e}"))?;
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

/// Puts whole flat parameter values (layout order) back into the model as trainable parameters.
struct SetValues<'a, B: AutodiffBackend> {
    layout: &'a FlatLayout,
    params: Vec<Option<Tensor<B::InnerBackend, 1>>>,
}

impl<B: AutodiffBackend> PathMapper<B> for SetValues<'_, B> {
    fn map<const D: usize>(&mut self, at: &ParamPath, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Ok(i) = self.layout.names.binary_search(&at.path()) else {
            return param;
        };
        let Some(flat) = self.params[i].take() else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        // The model keeps its own storage dtype (bf16 product weights under bf16_mixed).
        let flat = flat.cast(FloatDType::from(tensor.dtype()));
        let value = Tensor::<B, D>::from_inner(flat.reshape(tensor.dims())).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn warmup_then_cosine_to_the_minimum() {
        let cfg = ScheduleConfig { warmup_ratio: 0.1, warmup_steps: None, min_lr_ratio: 0.1 };
        let s = Schedule::new(1e-3, &cfg, 100);
        assert_eq!(s.warmup_steps, 10); // ceil(0.1 × 100)
        assert_eq!(s.lr(0), 0.0);
        assert!(close(s.lr(5), 5e-4));
        assert!(close(s.lr(10), 1e-3));
        // Halfway through the cosine part (step 55 of 10..100): factor 0.5 → 0.1 + 0.9 × 0.5.
        assert!(close(s.lr(55), 1e-3 * 0.55));
        // A quarter in (step 32.5 is not a step; use 100 total with 0 warmup below).
        assert!(close(s.lr(100), 1e-4));
        assert!(close(s.lr(150), 1e-4));
        let s = Schedule::new(2.0, &ScheduleConfig { warmup_ratio: 0.0, warmup_steps: None, min_lr_ratio: 0.0 }, 4);
        // cos schedule over 4 steps: 0.5(1+cos(πk/4)) × 2 = 2, 1.7071.., 1, 0.2928..
        let expect = [2.0, 1.0 + std::f64::consts::FRAC_1_SQRT_2, 1.0, 1.0 - std::f64::consts::FRAC_1_SQRT_2];
        for (k, e) in expect.iter().enumerate() {
            assert!(close(s.lr(k as u64), *e), "step {k}: {} vs {e}", s.lr(k as u64));
        }
        // 3% of 1000 steps rounds up to 30.
        let s = Schedule::new(1.0, &ScheduleConfig::default(), 1000);
        assert_eq!(s.warmup_steps, 30);
    }

    #[test]
    fn clipping_matches_clip_grad_norm() {
        // ‖(3, 4, 12)‖ = 13; max 1 → scale 1 / (13 + 1e-6).
        assert_eq!(clip_coefficient(13.0, 1.0), Some(1.0 / (13.0 + 1e-6)));
        // Below the limit nothing changes; 0 disables clipping; a non-finite norm is not clipped
        // (the caller skips the step).
        assert_eq!(clip_coefficient(0.5, 1.0), None);
        assert_eq!(clip_coefficient(50.0, 0.0), None);
        assert_eq!(clip_coefficient(f64::NAN, 1.0), None);
        assert_eq!(clip_coefficient(f64::INFINITY, 1.0), None);
    }

    type B = burn::backend::Autodiff<Flex>;

    /// A linear layer (5 × 3 weight + 5 bias = 20 elements) as the model.
    fn model() -> burn::nn::Linear<B> {
        B::seed(&Default::default(), 7);
        burn::nn::LinearConfig::new(3, 5).init(&Default::default())
    }

    fn set_of(m: &burn::nn::Linear<B>) -> TrainableSet {
        let mut set = TrainableSet::default();
        for (name, shape, decay) in [("weight", vec![3, 5], true), ("bias", vec![5], false)] {
            set.params.insert(name.into(), crate::trainable::TrainableParam { shape, lr_multiplier: if decay { 1.0 } else { 2.0 }, decay });
        }
        assert_eq!(m.weight.dims(), [3, 5]);
        set
    }

    fn grads_of(scale: f32) -> Grads<Flex> {
        let dev = Default::default();
        let w: Vec<f32> = (0..15).map(|i| scale * (i as f32 - 7.0) / 3.0).collect();
        let b: Vec<f32> = (0..5).map(|i| scale * (i as f32 + 1.0)).collect();
        [("weight", w), ("bias", b)].into_iter().map(|(n, v)| (n.to_string(), Tensor::from_data(TensorData::new(v.clone(), [v.len()]), &dev))).collect()
    }

    fn config() -> OptimizerConfig {
        OptimizerConfig { lr: 1e-2, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.1 }
    }

    fn weights(m: &burn::nn::Linear<B>) -> Vec<f32> {
        let mut v: Vec<f32> = m.weight.val().into_data().to_vec().unwrap();
        v.extend(m.bias.as_ref().unwrap().val().into_data().to_vec::<f32>().unwrap());
        v
    }

    /// Three updates on one rank against two ranks that each hold half the gradient, in buckets
    /// of 6 elements so parameters straddle buckets and ranks: the same bits, and a checkpoint
    /// written by the two ranks resumes on one with the same moments.
    #[test]
    fn two_ranks_in_small_buckets_update_like_one() {
        let dev = Default::default();
        let m = model();
        let set = set_of(&m);
        let mut one = AdamW::new(config(), &set, FlatLayout::new(&set, 1, 0, crate::shard::BUCKET_ELEMENTS), &m, &dev);
        let mut m1 = m.clone();
        for _ in 0..3 {
            one.add_gradients(&grads_of(1.0), &Comm::single()).unwrap();
            m1 = one.step(m1, 1e-2, 0.0, &Comm::single()).unwrap().0;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let results: Vec<Vec<f32>> = (0..2)
            .map(|rank| {
                let (m, set, dir) = (m.clone(), set.clone(), dir.clone());
                std::thread::spawn(move || {
                    let world = crate::dist::World {
                        rank,
                        size: 2,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        launcher: crate::dist::world::Launcher::Torchrun,
                    };
                    let comm = Comm::connect(world, &crate::dist::Fingerprint { binary: 0, config: 0 }, std::time::Duration::from_secs(20)).unwrap();
                    let mut opt = AdamW::new(config(), &set, FlatLayout::new(&set, 2, rank, 6), &m, &Default::default());
                    let mut m = m;
                    for _ in 0..3 {
                        opt.add_gradients(&grads_of(0.5), &comm).unwrap();
                        m = opt.step(m, 1e-2, 0.0, &comm).unwrap().0;
                    }
                    opt.save(&dir).unwrap();
                    weights(&m)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert_eq!(results[0], weights(&m1));
        assert_eq!(results[1], weights(&m1));
        assert!(dir.join("optimizer-00001-of-00002.safetensors").is_file());
        let mut resumed = AdamW::new(config(), &set, FlatLayout::new(&set, 1, 0, crate::shard::BUCKET_ELEMENTS), &m1, &dev);
        resumed.load(&dir).unwrap();
        assert_eq!(resumed.step, 3);
        let v = |t: &Tensor<Flex, 1>| t.clone().into_data().to_vec::<f32>().unwrap();
        assert_eq!(v(&resumed.exp_avg), v(&one.exp_avg));
        assert_eq!(v(&resumed.exp_avg_sq), v(&one.exp_avg_sq));
        // A missing shard is named.
        std::fs::remove_file(dir.join("optimizer-00001-of-00002.safetensors")).unwrap();
        let e = resumed.load(&dir).unwrap_err().to_string();
        assert!(e.contains("rank 1 of 2 is missing"), "{e}");
    }
}
