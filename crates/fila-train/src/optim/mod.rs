//! AdamW over named parameters (PyTorch's `torch.optim.AdamW` update, single-tensor path), the
//! warmup-cosine schedule, and global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).
//!
//! Written here rather than taken from burn-optim because Burn's AdamW decays every parameter
//! (no groups), its `GradientClippingConfig::Norm` clips each tensor on its own, and it cannot
//! shard its state or gradients across ranks. Gradients are flat f32 tensors on the inner (non-autodiff)
//! backend, keyed by model path; the optimizer state is one flat slice per rank ([`FlatLayout`]).
//!
//! On the CPU backend (flex) the update is one multi-threaded pass over the slice that writes the
//! master values and both moments in place ([`fused`]): the same arithmetic as the tensor ops,
//! which would make about fifteen slice-sized temporaries per step.
//!
//! [`schedule`] holds the learning-rate schedule, [`grads`] the gradients' form, [`state`] the
//! checkpoint files, `fused` the CPU update.

mod fused;
pub mod grads;
pub mod schedule;
pub mod state;

pub use grads::{accumulate_grads, Grads};
pub use schedule::Schedule;

use crate::config::OptimizerConfig;
use crate::dist::Comm;
use crate::shard::FlatLayout;
use crate::trainable::TrainableSet;
use anyhow::{anyhow, Result};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::FloatDType;
use fila_model::probe::same_type;
use fila_model::weights::{map_params, visit_params, ParamPath, PathMapper, PathVisitor};
use fused::Update;
use std::any::Any;

/// PyTorch's `clip_grad_norm_` factor for a global gradient norm: `max_norm / (norm + 1e-6)` when
/// that is below 1; `None` (no clipping) otherwise, when `max_norm` is 0 or the norm not finite.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (norm + 1e-6);
    (max_norm > 0.0 && norm.is_finite() && coef < 1.0).then_some(coef)
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
    /// Per parameter (layout order): its LR multiplier and whether weight decay applies.
    param_lr_multiplier: Vec<f32>,
    param_decays: Vec<bool>,
    /// The step's gradient slice so far (summed over micro-batches and ranks), and which
    /// parameters received a gradient on this rank.
    grad: Option<Tensor<I, 1>>,
    has_grad: Vec<bool>,
    /// Whether checkpoints carry the master slice (`master.<path>`): needed when the model
    /// stores its trainable weights in a lower precision ([`crate::precision::Precision::master_apart`]).
    pub master_in_checkpoint: bool,
}

/// The flat values of the trainable parameters of `model` in their own dtypes, by layout index
/// (views: nothing is copied).
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
                self.out[i] = Some(t.reshape([n]));
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
        Self::with_master(config, set, layout, master)
    }

    /// Fresh moments around the master slice `master`.
    fn with_master(config: OptimizerConfig, set: &TrainableSet, layout: FlatLayout, master: Tensor<I, 1>) -> Self {
        let device = master.device();
        let info = |p: usize| &set.params[&layout.names[p]];
        let param_lr_multiplier = (0..layout.names.len()).map(|p| info(p).lr_multiplier as f32).collect();
        let param_decays = (0..layout.names.len()).map(|p| info(p).decay).collect();
        let zeros = Tensor::zeros([layout.slice_len], &device);
        let has_grad = vec![false; layout.names.len()];
        Self {
            config,
            step: 0,
            layout,
            master,
            exp_avg: zeros.clone(),
            exp_avg_sq: zeros,
            param_lr_multiplier,
            param_decays,
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
        // Each bucket's reduced piece is added into its range of the slice at once (in place where
        // the backend can), so besides the slice and the gradients one bucket is alive.
        let first = self.grad.is_none();
        let mut sum = self.grad.take().unwrap_or_else(|| Tensor::zeros([layout.slice_len], &device));
        for (b, bucket) in layout.buckets.iter().enumerate() {
            let piece = comm.reduce_scatter(layout.bucket_tensor(b, &|p| grads.get(&layout.names[p]).cloned(), &device))?;
            let range = bucket.at..bucket.at + piece.dims()[0];
            let piece = if first { piece } else { sum.clone().slice(range.clone()) + piece };
            sum = sum.slice_assign(range, piece);
        }
        self.grad = Some(sum);
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
        let grad = self.grad.take().unwrap_or_else(|| Tensor::zeros([self.layout.slice_len], &device));
        self.has_grad.fill(false);
        let local_sq = match as_flex(&grad) {
            Some(g) => fused::sum_of_squares(&g),
            None => grad.clone().powf_scalar(2.0).sum().into_scalar().elem::<f64>(),
        };
        let norm = comm.sum_f64(&[local_sq])?[0].sqrt();
        if !norm.is_finite() {
            return Ok((model, norm));
        }
        self.step += 1;
        let update = Update::new(&self.config, self.step, lr, clip_coefficient(norm, max_norm));
        match (self as &mut dyn Any).downcast_mut::<AdamW<Flex>>() {
            Some(flex) => flex.update_fused(same_type(grad), &present, &update),
            None => self.update_with_tensors(grad, &present, &update),
        }
        Ok((self.write_back(model, comm)?, norm))
    }

    /// Puts the master values into `model`'s trainable parameters, in their own dtypes: each
    /// rank's slice is all-gathered bucket by bucket and each bucket cast into parameters before
    /// the next is gathered ([`FlatLayout::params_from_buckets`]). Besides the new parameters (the
    /// old ones are freed as they are replaced) at most one f32 bucket is alive.
    pub fn write_back<B, M>(&self, model: M, comm: &Comm) -> Result<M>
    where
        B: AutodiffBackend<InnerBackend = I>,
        M: Module<B>,
    {
        let layout = &self.layout;
        let dtypes: Vec<FloatDType> = flat_values::<B, M>(&model, layout)
            .iter()
            .enumerate()
            .map(|(p, t)| t.as_ref().map(|t| t.dtype().into()).ok_or_else(|| anyhow!("trainable parameter `{}` is not in the model", layout.names[p])))
            .collect::<Result<_>>()?;
        let params = layout.params_from_buckets(&dtypes, |b| {
            let bucket = &layout.buckets[b];
            comm.all_gather(self.master.clone().slice(bucket.at..bucket.at + bucket.piece(layout.world)))
        })?;
        Ok(map_params(model, &mut SetValues::<B> { layout, params: params.into_iter().map(Some).collect() }))
    }

    /// The AdamW update of the slice from Burn's tensor ops (any backend).
    fn update_with_tensors(&mut self, grad: Tensor<I, 1>, present: &[bool], u: &Update) {
        let grad = match u.clip {
            Some(coef) => grad.mul_scalar(coef),
            None => grad,
        };
        // The per-element LR multipliers and weight-decay mask, filled on the device for this update
        // only (the fused CPU update reads the per-parameter values).
        let device = self.master.device();
        let lr_vec = self.layout.per_element(|p| self.param_lr_multiplier[p], 0.0, &device).mul_scalar(u.lr);
        let mut p = self.master.clone();
        if u.weight_decay > 0.0 {
            let decays = self.layout.per_element(|p| if self.param_decays[p] { 1.0 } else { 0.0 }, 0.0, &device);
            let factor = (lr_vec.clone() * decays).mul_scalar(-u.weight_decay).add_scalar(1.0);
            p = p * factor;
        }
        let m = self.exp_avg.clone().mul_scalar(u.beta1) + grad.clone().mul_scalar(u.one_minus_beta1);
        let v = self.exp_avg_sq.clone().mul_scalar(u.beta2) + grad.powf_scalar(2.0).mul_scalar(u.one_minus_beta2);
        let denom = v.clone().sqrt().div_scalar(u.bias_correction2_sqrt).add_scalar(u.eps);
        p = p - (m.clone() / denom) * lr_vec.div_scalar(u.bias_correction1);
        if present.iter().all(|&x| x) {
            (self.master, self.exp_avg, self.exp_avg_sq) = (p, m, v);
        } else {
            let absent = self.layout.per_element(|i| if present[i] { 0.0 } else { 1.0 }, 1.0, &self.master.device()).equal_elem(1.0);
            self.master = p.mask_where(absent.clone(), self.master.clone());
            self.exp_avg = m.mask_where(absent.clone(), self.exp_avg.clone());
            self.exp_avg_sq = v.mask_where(absent, self.exp_avg_sq.clone());
        }
    }
}

impl AdamW<Flex> {
    /// The AdamW update of the slice in one pass ([`fused::update`]), writing the master values
    /// and moments in place where this optimizer is their storage's only owner.
    fn update_fused(&mut self, grad: Tensor<Flex, 1>, present: &[bool], u: &Update) {
        let grad = fused::whole(flex_of(grad));
        let take = |t: &mut Tensor<Flex, 1>| fused::Target::new(flex_of(std::mem::replace(t, Tensor::empty([0], &Default::default()))));
        let (mut master, mut exp_avg, mut exp_avg_sq) = (take(&mut self.master), take(&mut self.exp_avg), take(&mut self.exp_avg_sq));
        let params = fused::Params { segments: &self.layout.segments, lr_multiplier: &self.param_lr_multiplier, decays: &self.param_decays, present };
        fused::update(grad.storage(), [&mut master, &mut exp_avg, &mut exp_avg_sq], &params, u);
        (self.master, self.exp_avg, self.exp_avg_sq) = (master.into_tensor(), exp_avg.into_tensor(), exp_avg_sq.into_tensor());
    }
}

/// The flex primitive of `t` when the backend `I` is flex.
fn as_flex<I: Backend>(t: &Tensor<I, 1>) -> Option<FlexTensor> {
    (t as &dyn Any).downcast_ref::<Tensor<Flex, 1>>().map(|t| flex_of(t.clone()))
}

fn flex_of(t: Tensor<Flex, 1>) -> FlexTensor {
    t.into_primitive().tensor()
}

/// Puts whole flat parameter values (layout order, in the parameters' dtypes) back into the
/// model as trainable parameters.
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
        let value = Tensor::<B, D>::from_inner(flat.reshape(tensor.dims())).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ScheduleConfig;
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

    /// The fused CPU update against the tensor ops on random state over three steps: weight
    /// decay, LR multipliers, clipping, a parameter without a gradient, runs that cross the fused
    /// pass's chunks and padding (rank 1 of 2). The first step writes fresh buffers (the state is
    /// shared with the other optimizer), the later ones write in place.
    #[test]
    fn the_fused_cpu_update_computes_what_the_tensor_ops_compute() {
        use burn::tensor::Distribution;
        let dev = Default::default();
        let mut set = TrainableSet::default();
        for (name, n, lr_multiplier, decay) in [("a", 37, 1.0, true), ("b", 150_001, 0.5, true), ("c", 9, 2.0, false), ("d", 80_000, 2.0, false)] {
            set.params.insert(name.into(), crate::trainable::TrainableParam { shape: vec![n], lr_multiplier, decay });
        }
        let layout = FlatLayout::new(&set, 2, 1, 25_001);
        let n = layout.slice_len;
        assert!(n > 2 * fused::CHUNK && layout.buckets.iter().any(|b| b.padded > b.len));
        Flex::seed(&dev, 19);
        let random = |lo: f64, hi: f64| Tensor::<Flex, 1>::random([n], Distribution::Uniform(lo, hi), &dev);
        let mut tensors = AdamW::with_master(config(), &set, layout.clone(), random(-1.0, 1.0));
        (tensors.exp_avg, tensors.exp_avg_sq) = (random(-0.1, 0.1), random(0.0, 0.01));
        let mut fused = AdamW::with_master(config(), &set, layout, tensors.master.clone());
        (fused.exp_avg, fused.exp_avg_sq) = (tensors.exp_avg.clone(), tensors.exp_avg_sq.clone());
        let before = |t: &Tensor<Flex, 1>| t.clone().into_data().to_vec::<f32>().unwrap();
        let start = [before(&tensors.master), before(&tensors.exp_avg), before(&tensors.exp_avg_sq)];
        let present = [true, true, false, true]; // `c` got no gradient
        for (step, clip) in [(1, None), (2, Some(0.25)), (3, Some(0.5))] {
            let grad = random(-1.0, 1.0);
            let u = Update::new(&config(), step, 1e-2, clip);
            tensors.update_with_tensors(grad.clone(), &present, &u);
            fused.update_fused(grad, &present, &u);
        }
        let pairs = [(&fused.master, &tensors.master), (&fused.exp_avg, &tensors.exp_avg), (&fused.exp_avg_sq, &tensors.exp_avg_sq)];
        for (k, (f, t)) in pairs.into_iter().enumerate() {
            let (f, t) = (before(f), before(t));
            let worst = f.iter().zip(&t).map(|(a, b)| ((a - b).abs() / b.abs().max(1e-6)) as f64).fold(0.0, f64::max);
            assert!(worst <= 1e-6, "state {k}: largest relative difference {worst:e}");
            // `c` and the padding keep their values; (almost) every other element moved.
            let mut updated = vec![false; n];
            for seg in fused.layout.segments.iter().filter(|s| present[s.param]) {
                updated[seg.at..seg.at + seg.len].fill(true);
            }
            assert!((0..n).filter(|&i| !updated[i]).all(|i| f[i] == start[k][i]), "state {k}");
            let moved = (0..n).filter(|&i| updated[i] && f[i] != start[k][i]).count();
            assert!(moved as f64 > 0.999 * updated.iter().filter(|&&u| u).count() as f64, "state {k}: {moved} moved");
        }
    }
}
