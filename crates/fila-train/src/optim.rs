//! AdamW over named parameters (PyTorch's `torch.optim.AdamW` update, single-tensor path), the
//! warmup-cosine schedule, and global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).
//!
//! Written here rather than taken from burn-optim because Burn's AdamW decays every parameter
//! (no groups) and its `GradientClippingConfig::Norm` clips each tensor on its own. Gradients and
//! moments are flat f32 tensors on the inner (non-autodiff) backend, keyed by model path.

use crate::config::{OptimizerConfig, ScheduleConfig};
use crate::trainable::TrainableSet;
use anyhow::{anyhow, bail, Context, Result};
use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use fila_model::weights::{map_params, visit_params, write_safetensors, Checkpoint, ParamPath, PathMapper, PathVisitor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Gradients by parameter path, flattened.
pub type Grads<I> = BTreeMap<String, Tensor<I, 1>>;

/// Adds the gradients of the trainable parameters in `grads` to `acc` (summing over micro-batches).
pub fn accumulate_grads<B: AutodiffBackend, M: Module<B>>(
    model: &M,
    grads: &B::Gradients,
    set: &TrainableSet,
    acc: &mut Grads<B::InnerBackend>,
) {
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
                let g = g.reshape([n]);
                let sum = match self.acc.remove(&path) {
                    Some(prev) => prev + g,
                    None => g,
                };
                self.acc.insert(path, sum);
            }
        }
    }
    visit_params(model, &mut Collector::<B> { grads, set, acc });
}

/// The global L2 norm of all gradients, as `clip_grad_norm_` computes it (f32 per-tensor sums of
/// squares, combined in f64).
pub fn global_norm<I: Backend>(grads: &Grads<I>) -> f64 {
    grads
        .values()
        .map(|g| g.clone().powf_scalar(2.0).sum().into_scalar().elem::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// Scales the gradients so their global norm is at most `max_norm` (PyTorch: coefficient
/// `max_norm / (norm + 1e-6)`, applied only when below 1). Returns the norm before clipping.
pub fn clip_grad_norm<I: Backend>(grads: &mut Grads<I>, max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && norm.is_finite() && coef < 1.0 {
        for g in grads.values_mut() {
            *g = g.clone().mul_scalar(coef as f32);
        }
    }
    norm
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

struct Moments<I: Backend> {
    exp_avg: Tensor<I, 1>,
    exp_avg_sq: Tensor<I, 1>,
}

/// AdamW with per-parameter LR multipliers and decay flags from the [`TrainableSet`].
pub struct AdamW<I: Backend> {
    pub config: OptimizerConfig,
    /// Updates taken (PyTorch's `step`, shared by all parameters: they all update together).
    pub step: u64,
    state: BTreeMap<String, Moments<I>>,
}

impl<I: Backend> AdamW<I> {
    pub fn new(config: OptimizerConfig) -> Self {
        Self { config, step: 0, state: BTreeMap::new() }
    }

    /// One update of every trainable parameter that has a gradient, at learning rate `lr`.
    pub fn step<B, M>(&mut self, model: M, grads: &Grads<I>, set: &TrainableSet, lr: f64) -> M
    where
        B: AutodiffBackend<InnerBackend = I>,
        M: Module<B>,
    {
        self.step += 1;
        let t = self.step as i32;
        let [beta1, beta2] = self.config.betas;
        let mut updater = Updater::<B> {
            grads,
            set,
            state: &mut self.state,
            lr,
            beta1,
            beta2,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
            bias_correction1: 1.0 - beta1.powi(t),
            bias_correction2: 1.0 - beta2.powi(t),
        };
        map_params(model, &mut updater)
    }

    /// Writes `optimizer.safetensors`: `exp_avg.<path>`, `exp_avg_sq.<path>` (flat f32) and the
    /// step count in the metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::with_capacity(2 * self.state.len());
        for (name, m) in &self.state {
            tensors.push((format!("exp_avg.{name}"), m.exp_avg.to_data()));
            tensors.push((format!("exp_avg_sq.{name}"), m.exp_avg_sq.to_data()));
        }
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        write_safetensors(path, &tensors, Some(meta)).map_err(|e| anyhow!("{e}"))
    }

    /// Reads what [`AdamW::save`] wrote; every moment must belong to a trainable parameter of the
    /// right size.
    pub fn load(&mut self, path: &Path, set: &TrainableSet, device: &I::Device) -> Result<()> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let step: u64 = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("{}: no `step` in the metadata", path.display()))?;
        let file = Checkpoint::open(path).map_err(|e| anyhow!("{e}"))?;
        let mut state = BTreeMap::new();
        for key in file.keys().filter_map(|k| k.strip_prefix("exp_avg.")).map(String::from).collect::<Vec<_>>() {
            let Some(p) = set.params.get(&key) else {
                bail!("{}: optimizer state for `{key}`, which is not trainable in this run", path.display());
            };
            let n: usize = p.shape.iter().product();
            let read = |k: String| -> Result<Tensor<I, 1>> {
                let (shape, values) = file.read_f32(&k).map_err(|e| anyhow!("{e}"))?;
                if shape != [n] {
                    bail!("{}: `{k}` has shape {shape:?}, expected [{n}]", path.display());
                }
                Ok(Tensor::from_data(TensorData::new(values, [n]), device))
            };
            let m = Moments { exp_avg: read(format!("exp_avg.{key}"))?, exp_avg_sq: read(format!("exp_avg_sq.{key}"))? };
            state.insert(key, m);
        }
        self.step = step;
        self.state = state;
        Ok(())
    }
}

struct Updater<'a, B: AutodiffBackend> {
    grads: &'a Grads<B::InnerBackend>,
    set: &'a TrainableSet,
    state: &'a mut BTreeMap<String, Moments<B::InnerBackend>>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    bias_correction1: f64,
    bias_correction2: f64,
}

impl<B: AutodiffBackend> PathMapper<B> for Updater<'_, B> {
    fn map<const D: usize>(&mut self, at: &ParamPath, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let path = at.path();
        let (Some(info), Some(grad)) = (self.set.params.get(&path), self.grads.get(&path)) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let n = tensor.shape().num_elements();
        let lr = self.lr * info.lr_multiplier;
        let mut p = tensor.inner().reshape([n]);
        if info.decay && self.weight_decay > 0.0 {
            p = p.mul_scalar((1.0 - lr * self.weight_decay) as f32);
        }
        let (m, v) = match self.state.remove(&path) {
            Some(s) => (s.exp_avg, s.exp_avg_sq),
            None => (grad.zeros_like(), grad.zeros_like()),
        };
        let m = m.mul_scalar(self.beta1 as f32) + grad.clone().mul_scalar((1.0 - self.beta1) as f32);
        let v = v.mul_scalar(self.beta2 as f32) + grad.clone().powf_scalar(2.0).mul_scalar((1.0 - self.beta2) as f32);
        let step_size = lr / self.bias_correction1;
        let denom = v.clone().sqrt().div_scalar(self.bias_correction2.sqrt() as f32).add_scalar(self.eps as f32);
        p = p - (m.clone() / denom).mul_scalar(step_size as f32);
        self.state.insert(path, Moments { exp_avg: m, exp_avg_sq: v });
        let value = Tensor::<B, D>::from_inner(p.reshape(dims)).require_grad();
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

    fn grads(values: &[&[f32]]) -> Grads<Flex> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("p{i}"), Tensor::<Flex, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())))
            .collect()
    }

    fn values(g: &Grads<Flex>, key: &str) -> Vec<f32> {
        g[key].to_data().to_vec().unwrap()
    }

    #[test]
    fn clipping_matches_clip_grad_norm() {
        // ‖(3, 4, 12)‖ = 13; max 1 → scale 1 / (13 + 1e-6).
        let mut g = grads(&[&[3.0, 4.0], &[12.0]]);
        let norm = clip_grad_norm(&mut g, 1.0);
        assert_eq!(norm, 13.0);
        let c = (1.0 / (13.0 + 1e-6)) as f32;
        assert_eq!(values(&g, "p0"), vec![3.0 * c, 4.0 * c]);
        assert_eq!(values(&g, "p1"), vec![12.0 * c]);
        // Below the limit nothing changes.
        let mut g = grads(&[&[0.3, 0.4]]);
        assert!((clip_grad_norm(&mut g, 1.0) - 0.5).abs() < 1e-7);
        assert_eq!(values(&g, "p0"), vec![0.3, 0.4]);
        // 0 disables clipping but still reports the norm.
        let mut g = grads(&[&[30.0, 40.0]]);
        assert_eq!(clip_grad_norm(&mut g, 0.0), 50.0);
        assert_eq!(values(&g, "p0"), vec![30.0, 40.0]);
        // A non-finite gradient gives a non-finite norm (the step is skipped by the caller).
        let mut g = grads(&[&[f32::NAN, 1.0]]);
        assert!(!clip_grad_norm(&mut g, 1.0).is_finite());
    }
}
