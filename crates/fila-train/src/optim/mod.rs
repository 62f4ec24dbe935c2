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
///
/// `I` is the model's (inner) backend, where gradients are made and collectives run; `S` is where
/// the optimizer's state lives: `I` itself, or the CPU backend under `optimizer.offload = "cpu"`
/// (gradient pieces come to the host as they arrive, the update runs on CPU threads, and the new
/// values go back to the device bucket by bucket).
pub struct AdamW<I: Backend, S: Backend = I> {
    pub config: OptimizerConfig,
    /// Updates taken (PyTorch's `step`, shared by all parameters: they all update together).
    pub step: u64,
    pub layout: FlatLayout,
    master: Tensor<S, 1>,
    exp_avg: Tensor<S, 1>,
    exp_avg_sq: Tensor<S, 1>,
    /// Per parameter (layout order): its LR multiplier and whether weight decay applies.
    param_lr_multiplier: Vec<f32>,
    param_decays: Vec<bool>,
    /// The step's gradient slice so far (summed over micro-batches and ranks), and which
    /// parameters received a gradient on this rank.
    grad: Option<Tensor<S, 1>>,
    has_grad: Vec<bool>,
    /// How the current micro-batch's buckets are reduce-scattered ([`Overlap`]).
    overlap: Overlap<I>,
    /// The model's device (collectives, write-back).
    device: I::Device,
    /// Whether checkpoints carry the master slice (`master.<path>`): needed when the model
    /// stores its trainable weights in a lower precision ([`crate::precision::Precision::master_apart`]).
    pub master_in_checkpoint: bool,
    /// ZeRO-3: the model holds placeholders for the trainable weights ([`crate::zero3`]), so an
    /// update keeps the new values in the slice instead of gathering them into the model.
    pub shard_weights: bool,
    /// Elements per chunk of the tensor-op update ([`UPDATE_CHUNK`]).
    update_chunk: usize,
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

/// `t` on backend `T` at `device`: moved as it is when `T` is `F`, copied through the host
/// otherwise (the offloaded optimizer's way between the GPU and the CPU).
pub fn moved<F: Backend, T: Backend>(t: Tensor<F, 1>, device: &T::Device) -> Tensor<T, 1> {
    match (Box::new(t) as Box<dyn Any>).downcast::<Tensor<T, 1>>() {
        Ok(same) => same.to_device(device),
        Err(other) => Tensor::from_data(other.downcast::<Tensor<F, 1>>().expect("the tensor's own type").into_data(), device),
    }
}

impl<I: Backend> AdamW<I> {
    /// Fresh moments; the master slice taken from `model`'s current values; the state on the
    /// model's device.
    pub fn new<B, M>(config: OptimizerConfig, set: &TrainableSet, layout: FlatLayout, model: &M, device: &I::Device) -> Self
    where
        B: AutodiffBackend<InnerBackend = I>,
        M: Module<B>,
    {
        Self::with_state_on::<B, M>(config, set, layout, model, device, device)
    }
}

impl<I: Backend, S: Backend> AdamW<I, S> {
    /// [`AdamW::new`] with the state on `store` (of backend `S`): each parameter's values are
    /// moved there whole, in their own dtype, and cut and cast there, so the model's device never
    /// holds an f32 copy of the slice.
    pub fn with_state_on<B, M>(config: OptimizerConfig, set: &TrainableSet, layout: FlatLayout, model: &M, device: &I::Device, store: &S::Device) -> Self
    where
        B: AutodiffBackend<InnerBackend = I>,
        M: Module<B>,
    {
        let values = flat_values::<B, M>(model, &layout);
        let master = layout.own_slice(&|p| values[p].clone().map(|t| moved::<I, S>(t, store)), store);
        Self::with_master(config, set, layout, master, device.clone())
    }

    /// Fresh moments around the master slice `master`.
    fn with_master(config: OptimizerConfig, set: &TrainableSet, layout: FlatLayout, master: Tensor<S, 1>, model_device: I::Device) -> Self {
        let device = master.device();
        let info = |p: usize| &set.params[&layout.names[p]];
        let param_lr_multiplier = (0..layout.names.len()).map(|p| info(p).lr_multiplier as f32).collect();
        let param_decays = (0..layout.names.len()).map(|p| info(p).decay).collect();
        let zeros = Tensor::zeros([layout.slice_len], &device);
        let has_grad = vec![false; layout.names.len()];
        let overlap = Overlap::new(&layout);
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
            overlap,
            device: model_device,
            master_in_checkpoint: false,
            shard_weights: false,
            update_chunk: UPDATE_CHUNK,
        }
    }

    /// Orders the buckets' reduce-scatters by when their gradients are final: `segment(name)` is
    /// the segment of the backward pass after which parameter `name` has its whole gradient
    /// (segments end in increasing number). The same on every rank.
    pub fn order_gradients(&mut self, segment: impl Fn(&str) -> u32) {
        let ready: Vec<u32> = self.layout.names.iter().map(|n| segment(n)).collect();
        self.overlap.order(&self.layout, &ready);
    }

    /// Whether a micro-batch's buckets may stay in flight while the computation goes on
    /// (`distributed.overlap`; on by default). Off, each one is waited for as soon as it starts.
    pub fn set_overlap(&mut self, on: bool) {
        self.overlap.enabled = on;
    }

    /// Starts the reduce-scatter of every bucket of the current micro-batch whose gradients are
    /// final once backward segment `done` has ended ([`AdamW::order_gradients`]), in the fixed
    /// launch order, so that the communication runs while the backward pass goes on. Gradients
    /// of parameters whose buckets have all started are dropped from `grads` (their values now
    /// travel in the buckets). At most [`IN_FLIGHT`] buckets stay in flight; older ones are added
    /// into the step's slice first.
    pub fn reduce_ready(&mut self, grads: &mut Grads<I>, done: u32, comm: &Comm) -> Result<()> {
        for (p, name) in self.layout.names.iter().enumerate() {
            self.has_grad[p] |= grads.contains_key(name);
        }
        let device = self.device.clone();
        let limit = if self.overlap.enabled && self.layout.world > 1 { IN_FLIGHT } else { 0 };
        while let Some(b) = self.overlap.next_ready(done) {
            let bucket = self.layout.bucket_tensor(b, &|p| grads.get(&self.layout.names[p]).cloned(), &device);
            let pending = comm.start(crate::dist::Op::ReduceScatter, bucket)?;
            let range = self.layout.buckets[b].at..self.layout.buckets[b].at + self.layout.buckets[b].piece(self.layout.world);
            self.overlap.in_flight.push_back(InFlightBucket { range, first: self.overlap.first_micro_batch, pending });
            for p in self.overlap.finished_params(&self.layout, b) {
                grads.remove(&self.layout.names[p]);
            }
            while self.overlap.in_flight.len() > limit {
                self.settle_oldest()?;
            }
        }
        Ok(())
    }

    /// Adds one micro-batch's gradients (`grads`: this rank's, by path) to the step's gradient
    /// slice: every bucket not started yet is reduce-scattered over all ranks (ZeRO-2), so no
    /// rank keeps more than its slice across micro-batches. Every rank calls it equally often per
    /// step; a rank without a micro-batch for this call passes no gradients (it contributes
    /// zeros). The last buckets may still be in flight when it returns (the next micro-batch's
    /// computation overlaps them); [`AdamW::step`] waits for them.
    pub fn add_gradients(&mut self, grads: &Grads<I>, comm: &Comm) -> Result<()> {
        let mut rest = grads.clone();
        self.end_micro_batch(&mut rest, comm)
    }

    /// [`AdamW::add_gradients`] taking the gradients left after [`AdamW::reduce_ready`].
    pub fn end_micro_batch(&mut self, grads: &mut Grads<I>, comm: &Comm) -> Result<()> {
        self.reduce_ready(grads, u32::MAX, comm)?;
        self.overlap.next_micro_batch();
        Ok(())
    }

    /// Waits for the oldest bucket in flight and adds its piece into its range of the slice (in
    /// place where the backend can): the first micro-batch's pieces make the slice.
    fn settle_oldest(&mut self) -> Result<()> {
        let Some(InFlightBucket { range, first, pending }) = self.overlap.in_flight.pop_front() else {
            return Ok(());
        };
        let piece = moved::<I, S>(pending.wait()?, &self.master.device());
        let sum = self.grad.take().unwrap_or_else(|| Tensor::zeros([self.layout.slice_len], &self.master.device()));
        let piece = if first { piece } else { sum.clone().slice(range.clone()) + piece };
        self.grad = Some(sum.slice_assign(range, piece));
        Ok(())
    }

    /// Waits for every bucket in flight.
    fn settle_all(&mut self) -> Result<()> {
        while !self.overlap.in_flight.is_empty() {
            self.settle_oldest()?;
        }
        Ok(())
    }

    /// The step's gradient slice and which parameters got a gradient on this rank, once the
    /// buckets in flight have arrived (the other ranks take part in them); the next micro-batch
    /// starts a new step.
    fn take_gradients(&mut self) -> Result<(Option<Tensor<S, 1>>, Vec<bool>)> {
        self.settle_all()?;
        self.overlap.first_micro_batch = true;
        let has_grad = vec![false; self.has_grad.len()];
        Ok((self.grad.take(), std::mem::replace(&mut self.has_grad, has_grad)))
    }

    /// Drops the step's gradients without an update (a skipped step).
    pub fn clear_gradients(&mut self) -> Result<()> {
        self.take_gradients().map(drop)
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
        let (grad, has_grad) = self.take_gradients()?;
        // Parameters without a gradient on any rank (unused this step) are left untouched.
        let local: Vec<f64> = has_grad.iter().map(|&h| f64::from(u8::from(h))).collect();
        let present: Vec<bool> = comm.sum_f64(&local)?.into_iter().map(|c| c > 0.0).collect();
        let grad = grad.unwrap_or_else(|| Tensor::zeros([self.layout.slice_len], &self.master.device()));
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
        if std::any::TypeId::of::<S>() == std::any::TypeId::of::<Flex>() {
            self.update_fused(same_type(grad), &present, &update);
        } else {
            self.update_with_tensors(grad, &present, &update);
        }
        let model = if self.shard_weights { model } else { self.write_back(model, comm)? };
        Ok((model, norm))
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
        let all: Vec<usize> = (0..self.layout.buckets.len()).collect();
        // Each bucket's gather starts only once the previous one is in the parameters.
        self.install(model, &all, |b| self.gather_bucket(b, comm)?.wait())
    }

    /// Starts the all-gather of buckets `buckets` of the master values, all at once (ZeRO-3's
    /// prefetch of a segment); [`AdamW::install_gathered`] waits for them and installs them,
    /// leaving the other parameters as they are.
    pub fn start_gather(&self, buckets: &[usize], comm: &Comm) -> Result<Gathering<I>> {
        let pending = buckets.iter().map(|&b| Ok((b, self.gather_bucket(b, comm)?))).collect::<Result<_>>()?;
        Ok(Gathering { pending })
    }

    /// Waits for `gathered` and puts its parameters into `model`, cast to their dtypes there.
    pub fn install_gathered<B, M>(&self, model: M, gathered: Gathering<I>) -> Result<M>
    where
        B: AutodiffBackend<InnerBackend = I>,
        M: Module<B>,
    {
        let order: Vec<usize> = gathered.pending.iter().map(|(b, _)| *b).collect();
        let mut pending: std::collections::VecDeque<_> = gathered.pending.into();
        self.install(model, &order, |_| pending.pop_front().expect("one per bucket").1.wait())
    }

    /// The all-gather of bucket `b` of the master values, moved to the model's device.
    fn gather_bucket(&self, b: usize, comm: &Comm) -> Result<crate::dist::Pending<I>> {
        let bucket = &self.layout.buckets[b];
        let piece = moved::<S, I>(self.master.clone().slice(bucket.at..bucket.at + bucket.piece(self.layout.world)), &self.device);
        comm.start(crate::dist::Op::AllGather, piece)
    }

    /// Puts buckets `buckets` (`gather(b)` gives bucket `b` whole) into `model`'s parameters,
    /// each bucket's runs cast to their parameters' dtypes before the next is asked for.
    fn install<B, M>(&self, model: M, buckets: &[usize], gather: impl FnMut(usize) -> Result<Tensor<I, 1>>) -> Result<M>
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
        let params = layout.params_from_buckets(&dtypes, buckets, gather)?;
        Ok(map_params(model, &mut SetValues::<B> { layout, params }))
    }

    /// The AdamW update of the slice from Burn's tensor ops (any backend).
    ///
    /// It runs over [`UPDATE_CHUNK`] elements at a time, each chunk's new values written into the
    /// state in place (CubeCL writes a slice in place into a tensor nothing else holds), so its
    /// temporaries are a chunk's, not the slice's.
    fn update_with_tensors(&mut self, grad: Tensor<S, 1>, present: &[bool], u: &Update) {
        let device = self.master.device();
        let n = self.layout.slice_len;
        let empty = || Tensor::<S, 1>::empty([0], &device);
        let (mut master, mut exp_avg, mut exp_avg_sq) =
            (std::mem::replace(&mut self.master, empty()), std::mem::replace(&mut self.exp_avg, empty()), std::mem::replace(&mut self.exp_avg_sq, empty()));
        let all_present = present.iter().all(|&x| x);
        for start in (0..n).step_by(self.update_chunk) {
            let range = start..(start + self.update_chunk).min(n);
            let g = grad.clone().slice(range.clone());
            let g = match u.clip {
                Some(coef) => g.mul_scalar(coef),
                None => g,
            };
            // The per-element LR multipliers and weight-decay mask of the chunk, filled on the
            // device (the fused CPU update reads the per-parameter values).
            let lr_vec = self.layout.per_element_in(range.clone(), |p| self.param_lr_multiplier[p], 0.0, &device).mul_scalar(u.lr);
            let (p_old, m_old, v_old) = (master.clone().slice(range.clone()), exp_avg.clone().slice(range.clone()), exp_avg_sq.clone().slice(range.clone()));
            let mut p = p_old.clone();
            if u.weight_decay > 0.0 {
                let decays = self.layout.per_element_in(range.clone(), |p| if self.param_decays[p] { 1.0 } else { 0.0 }, 0.0, &device);
                let factor = (lr_vec.clone() * decays).mul_scalar(-u.weight_decay).add_scalar(1.0);
                p = p * factor;
            }
            let m = m_old.clone().mul_scalar(u.beta1) + g.clone().mul_scalar(u.one_minus_beta1);
            let v = v_old.clone().mul_scalar(u.beta2) + g.powf_scalar(2.0).mul_scalar(u.one_minus_beta2);
            let denom = v.clone().sqrt().div_scalar(u.bias_correction2_sqrt).add_scalar(u.eps);
            p = p - (m.clone() / denom) * lr_vec.div_scalar(u.bias_correction1);
            let (p, m, v) = if all_present {
                (p, m, v)
            } else {
                let absent = self.layout.per_element_in(range.clone(), |i| if present[i] { 0.0 } else { 1.0 }, 1.0, &device).equal_elem(1.0);
                (p.mask_where(absent.clone(), p_old), m.mask_where(absent.clone(), m_old), v.mask_where(absent, v_old))
            };
            master = master.slice_assign(range.clone(), p);
            exp_avg = exp_avg.slice_assign(range.clone(), m);
            exp_avg_sq = exp_avg_sq.slice_assign(range, v);
        }
        (self.master, self.exp_avg, self.exp_avg_sq) = (master, exp_avg, exp_avg_sq);
    }
}

impl<I: Backend, S: Backend> AdamW<I, S> {
    /// The AdamW update of the slice in one pass ([`fused::update`]) when the state is on the
    /// CPU backend (`S` is flex), writing the master values and moments in place where this
    /// optimizer is their storage's only owner.
    fn update_fused(&mut self, grad: Tensor<Flex, 1>, present: &[bool], u: &Update) {
        let grad = fused::whole(flex_of(grad));
        let take = |t: &mut Tensor<S, 1>| {
            let empty = Tensor::empty([0], &t.device());
            fused::Target::new(flex_of(same_type(std::mem::replace(t, empty))))
        };
        let (mut master, mut exp_avg, mut exp_avg_sq) = (take(&mut self.master), take(&mut self.exp_avg), take(&mut self.exp_avg_sq));
        let params = fused::Params { segments: &self.layout.segments, lr_multiplier: &self.param_lr_multiplier, decays: &self.param_decays, present };
        fused::update(grad.storage(), [&mut master, &mut exp_avg, &mut exp_avg_sq], &params, u);
        (self.master, self.exp_avg, self.exp_avg_sq) = (same_type(master.into_tensor()), same_type(exp_avg.into_tensor()), same_type(exp_avg_sq.into_tensor()));
    }
}

/// The flex primitive of `t` when the backend `I` is flex.
fn as_flex<I: Backend>(t: &Tensor<I, 1>) -> Option<FlexTensor> {
    (t as &dyn Any).downcast_ref::<Tensor<Flex, 1>>().map(|t| flex_of(t.clone()))
}

fn flex_of(t: Tensor<Flex, 1>) -> FlexTensor {
    t.into_primitive().tensor()
}

/// Buckets of master values being all-gathered ([`AdamW::start_gather`]).
pub struct Gathering<I: Backend> {
    pending: Vec<(usize, crate::dist::Pending<I>)>,
}

/// Puts whole flat parameter values (layout order, in the parameters' dtypes) back into the
/// model as trainable parameters, in the layout's shapes.
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
        let (id, _, mapper) = param.consume();
        let shape: [usize; D] = self.layout.shapes[i].clone().try_into().expect("the layout has the parameter's rank");
        let value = Tensor::<B, D>::from_inner(flat.reshape(shape)).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

/// Elements per chunk of the update with tensor ops (the GPU path): its temporaries are about
/// ten chunks (1.25 GiB of f32).
pub const UPDATE_CHUNK: usize = 1 << 25;

/// Buckets of one micro-batch's gradients that may be in flight besides the one being built:
/// each holds a bucket's f32 values (on the host for TCP, on the device for NCCL) and its piece
/// until it is added into the slice. One suffices under checkpointing, where buckets start
/// spread over the backward pass, and keeps the extra memory at two buckets.
pub const IN_FLIGHT: usize = 1;

/// A bucket's reduce-scatter started and not yet added into the slice.
struct InFlightBucket<I: Backend> {
    /// Where its piece goes in the slice.
    range: std::ops::Range<usize>,
    /// Whether it belongs to the step's first micro-batch (its piece starts the sum).
    first: bool,
    pending: crate::dist::Pending<I>,
}

/// The order in which a micro-batch's buckets are reduce-scattered and which are in flight.
struct Overlap<I: Backend> {
    enabled: bool,
    /// Bucket indices in launch order: by the backward segment after which each is final, then
    /// by index. Every rank launches in this order.
    order: Vec<usize>,
    /// The segment after which each bucket is final (by bucket index).
    ready_at: Vec<u32>,
    /// Buckets of the current micro-batch started so far (a prefix of `order`), and which.
    started: usize,
    started_flags: Vec<bool>,
    /// Per parameter: the buckets its elements lie in.
    param_buckets: Vec<std::ops::Range<usize>>,
    first_micro_batch: bool,
    in_flight: std::collections::VecDeque<InFlightBucket<I>>,
}

impl<I: Backend> Overlap<I> {
    fn new(layout: &FlatLayout) -> Self {
        let bucket_of = |flat: usize| layout.buckets.partition_point(|b| b.start + b.len <= flat);
        let param_buckets = (0..layout.names.len())
            .map(|p| {
                let (start, n) = (layout.offsets[p], layout.numel(p));
                if n == 0 {
                    0..0
                } else {
                    bucket_of(start)..bucket_of(start + n - 1) + 1
                }
            })
            .collect();
        let mut o = Self {
            enabled: true,
            order: Vec::new(),
            ready_at: Vec::new(),
            started: 0,
            started_flags: vec![false; layout.buckets.len()],
            param_buckets,
            first_micro_batch: true,
            in_flight: Default::default(),
        };
        o.order(layout, &vec![0; layout.names.len()]);
        o
    }

    /// Launch order from each parameter's segment (`ready[p]`).
    fn order(&mut self, layout: &FlatLayout, ready: &[u32]) {
        assert_eq!(self.started, 0, "the launch order changes between micro-batches only");
        let mut ready_at = vec![0u32; layout.buckets.len()];
        for (p, buckets) in self.param_buckets.iter().enumerate() {
            for b in buckets.clone() {
                ready_at[b] = ready_at[b].max(ready[p]);
            }
        }
        let mut order: Vec<usize> = (0..layout.buckets.len()).collect();
        order.sort_by_key(|&b| (ready_at[b], b));
        (self.order, self.ready_at) = (order, ready_at);
    }

    /// The next bucket to start once segment `done` has ended, if it is final.
    fn next_ready(&mut self, done: u32) -> Option<usize> {
        let b = *self.order.get(self.started)?;
        (self.ready_at[b] <= done).then(|| {
            self.started += 1;
            self.started_flags[b] = true;
            b
        })
    }

    /// Parameters of bucket `b` whose every bucket has now started.
    fn finished_params(&self, layout: &FlatLayout, b: usize) -> Vec<usize> {
        let bucket = &layout.buckets[b];
        let mut out: Vec<usize> = layout.runs(bucket.start, bucket.len).into_iter().map(|(p, ..)| p).collect();
        out.retain(|&p| self.param_buckets[p].clone().all(|b| self.started_flags[b]));
        out
    }

    fn next_micro_batch(&mut self) {
        self.started = 0;
        self.started_flags.fill(false);
        self.first_micro_batch = false;
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
        OptimizerConfig { lr: 1e-2, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.1, offload: Default::default() }
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
        let mut tensors: AdamW<Flex> = AdamW::with_master(config(), &set, layout.clone(), random(-1.0, 1.0), dev);
        (tensors.exp_avg, tensors.exp_avg_sq) = (random(-0.1, 0.1), random(0.0, 0.01));
        let mut fused: AdamW<Flex> = AdamW::with_master(config(), &set, layout, tensors.master.clone(), dev);
        // The tensor ops in chunks that cut parameters and the fused pass's chunks.
        tensors.update_chunk = 70_001;
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
