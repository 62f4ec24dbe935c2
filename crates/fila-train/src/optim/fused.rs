//! The AdamW update as one pass over raw `f32` slices (the CPU backend): the same arithmetic as
//! the tensor ops of [`super::AdamW`], without their slice-sized temporaries.

use crate::config::OptimizerConfig;
use crate::shard::Segment;
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::{Bytes, TensorPrimitive};
use rayon::prelude::*;

/// Elements per task: fixed, so how the work is cut does not depend on the thread count.
pub const CHUNK: usize = 1 << 15;

/// Whether `t`'s storage is exactly its `f32` elements, in order.
fn is_whole(t: &FlexTensor) -> bool {
    t.dtype() == burn::tensor::DType::F32
        && t.is_contiguous()
        && t.layout().start_offset() == 0
        && t.bytes().len() == t.layout().num_elements() * size_of::<f32>()
}

/// `t` with storage that is exactly its elements (a copy when it is a view).
pub fn whole(t: FlexTensor) -> FlexTensor {
    if is_whole(&t) {
        t
    } else {
        t.to_contiguous()
    }
}

/// `Σ x²` in f64, summed per fixed chunk and then over chunks in order.
pub fn sum_of_squares(t: &FlexTensor) -> f64 {
    let t = whole(t.clone());
    let partial: Vec<f64> = t.storage::<f32>().par_chunks(CHUNK).map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum()).collect();
    partial.iter().sum()
}

/// One state vector to update in place: its own storage when the optimizer is the only owner
/// (the moments), else a copy (the master values, whose buffer the model's parameters are
/// views of), made in parallel chunks.
pub struct Target(FlexTensor);

impl Target {
    pub fn new(t: FlexTensor) -> Self {
        let t = whole(t);
        if t.is_unique() {
            return Self(t);
        }
        // An indexed parallel collect writes each element once, without zero-filling first.
        let copy: Vec<f32> = t.storage::<f32>().par_iter().with_min_len(CHUNK).copied().collect();
        let n = copy.len();
        Self(FlexTensor::new(Bytes::from_elems(copy), burn::backend::flex::Layout::contiguous([n].into()), burn::tensor::DType::F32))
    }

    fn values(&mut self) -> &mut [f32] {
        self.0.try_storage_mut().expect("a unique buffer")
    }

    pub fn into_tensor(self) -> Tensor<Flex, 1> {
        Tensor::from_primitive(TensorPrimitive::Float(self.0))
    }
}

/// Which parameter each run of the slice belongs to, and its settings.
pub struct Params<'a> {
    pub segments: &'a [Segment],
    pub lr_multiplier: &'a [f32],
    pub decays: &'a [bool],
    /// Whether the parameter got a gradient on some rank this step (absent ones keep their
    /// values and moments).
    pub present: &'a [bool],
}

/// AdamW on `[master, exp_avg, exp_avg_sq]` from `grad`, element by element as the tensor
/// path computes it (PyTorch's single-tensor `AdamW`). Padding between runs is left as it is.
pub fn update(grad: &[f32], targets: [&mut Target; 3], params: &Params, u: &Update) {
    let [master, exp_avg, exp_avg_sq] = targets.map(Target::values);
    let n = grad.len();
    assert!(master.len() == n && exp_avg.len() == n && exp_avg_sq.len() == n, "optimizer state and gradient differ in length");
    master.par_chunks_mut(CHUNK).zip(exp_avg.par_chunks_mut(CHUNK)).zip(exp_avg_sq.par_chunks_mut(CHUNK)).enumerate().for_each(|(k, ((p, m), v))| {
        let lo = k * CHUNK;
        let hi = lo + p.len();
        let first = params.segments.partition_point(|s| s.at + s.len <= lo);
        for s in params.segments[first..].iter().take_while(|s| s.at < hi) {
            if !params.present[s.param] {
                continue;
            }
            let (a, b) = (s.at.max(lo), (s.at + s.len).min(hi));
            let r = a - lo..b - lo;
            update_run(&grad[a..b], &mut p[r.clone()], &mut m[r.clone()], &mut v[r], params.lr_multiplier[s.param], params.decays[s.param], u);
        }
    });
}

/// One parameter's run of elements.
fn update_run(grad: &[f32], p: &mut [f32], m: &mut [f32], v: &mut [f32], lr_multiplier: f32, decays: bool, u: &Update) {
    let lr = lr_multiplier * u.lr;
    let decay = (u.weight_decay > 0.0 && decays).then(|| lr * -u.weight_decay + 1.0);
    let step_size = lr / u.bias_correction1;
    let clip = u.clip.unwrap_or(1.0);
    for (((&g, p), m), v) in grad.iter().zip(p).zip(m).zip(v) {
        let g = g * clip;
        if let Some(factor) = decay {
            *p *= factor;
        }
        *m = *m * u.beta1 + g * u.one_minus_beta1;
        *v = *v * u.beta2 + g * g * u.one_minus_beta2;
        let denom = v.sqrt() / u.bias_correction2_sqrt + u.eps;
        *p -= *m / denom * step_size;
    }
}

/// One step's constants, in f32 as the update applies them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Update {
    pub(super) lr: f32,
    pub(super) weight_decay: f32,
    pub(super) beta1: f32,
    pub(super) one_minus_beta1: f32,
    pub(super) beta2: f32,
    pub(super) one_minus_beta2: f32,
    pub(super) bias_correction1: f32,
    pub(super) bias_correction2_sqrt: f32,
    pub(super) eps: f32,
    /// The gradient's clipping factor, when it is clipped.
    pub(super) clip: Option<f32>,
}

impl Update {
    /// `step`: this update's number, from 1.
    pub(super) fn new(config: &OptimizerConfig, step: u64, lr: f64, clip: Option<f64>) -> Self {
        let t = step as i32;
        let [beta1, beta2] = config.betas;
        Self {
            lr: lr as f32,
            weight_decay: config.weight_decay as f32,
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction1: (1.0 - beta1.powi(t)) as f32,
            bias_correction2_sqrt: (1.0 - beta2.powi(t)).sqrt() as f32,
            eps: config.eps as f32,
            clip: clip.map(|c| c as f32),
        }
    }
}
