//! One training step, the code both `fila-train` and `fila bench` run: each micro-batch's forward
//! and backward pass (with the configured recomputation), its gradients reduce-scattered into the
//! optimizer's slice (ZeRO-2) bucket by bucket while the computation goes on (under
//! checkpointing, each bucket as soon as the backward pass has made it final), one exchange of
//! the step's loss and flags over the ranks, then the clipped, sharded AdamW update, skipped when
//! any rank's loss or the gradient norm is not finite. Under ZeRO-3 the weights come from the
//! optimizer's slices ([`crate::zero3`]).

use crate::alloc;
use crate::config::TrainConfig;
use crate::dist::Comm;
use crate::optim::{AdamW, Grads};
use crate::precision::Precision;
use crate::recompute::{forward_backward_into, replay, segment_of, Recompute, Weights, Whole};
use crate::trainable::TrainableSet;
use crate::zero3::Gathered;
use anyhow::Result;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use fila_model::fila::{Fila, FilaInput};
use std::cell::RefCell;

/// How a step computes: the run's precision, recomputation, trainable set and clipping norm.
#[derive(Clone, Copy)]
pub struct TrainStep<'a> {
    pub precision: Precision,
    pub recompute: Recompute,
    pub set: &'a TrainableSet,
    pub max_grad_norm: f64,
}

/// One micro-batch and its share of the step's scored tokens over all ranks: the sum of the
/// micro-batches' mean losses × shares is the mean over all the step's tokens, so micro 4 ×
/// accumulation 1 equals micro 1 × accumulation 4, and W ranks equal one with W× the window.
pub struct MicroBatch<B: Backend> {
    pub input: FilaInput<B>,
    pub share: f64,
}

/// What a step did, the same on every rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// The step's loss (mean over all ranks' scored tokens); NaN when some rank's was not finite.
    pub loss: f64,
    /// The gradient norm before clipping; NaN when the update was skipped or there is none.
    pub grad_norm: f64,
    /// Whether the update ran (every loss and the gradient norm finite).
    pub finite: bool,
    /// Whether any rank was asked to stop before this step's exchange.
    pub signalled: bool,
}

impl<'a> TrainStep<'a> {
    /// The step `fila-train` runs for config `c`.
    pub fn of(c: &TrainConfig, set: &'a TrainableSet) -> Self {
        Self { precision: c.precision, recompute: Recompute::from_config(c.train.activation_checkpointing), set, max_grad_norm: c.train.max_grad_norm }
    }

    /// Runs the step over `micro_batches` (one item per accumulation slot; `None` where this rank
    /// has no micro-batch left but still joins the reductions) at learning rate `lr`;
    /// `signalled` is asked after the backward passes, before the exchange. Without an optimizer
    /// (`fila bench` timing forward and backward only) the gradients are dropped.
    pub fn run<B: AutodiffBackend, S: Backend>(
        &self,
        model: Fila<B>,
        micro_batches: impl IntoIterator<Item = Option<MicroBatch<B>>>,
        mut optimizer: Option<&mut AdamW<B::InnerBackend, S>>,
        lr: f64,
        comm: &Comm,
        signalled: impl FnOnce() -> bool,
    ) -> Result<(Fila<B>, StepOutcome)> {
        // The step's loss stays on the device until the end of the step: one read per step.
        let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
        if let (Some(optimizer), Recompute::Layers { .. }) = (optimizer.as_deref_mut(), self.recompute) {
            let layers = model.llm.model.layers.len();
            optimizer.order_gradients(|path| segment_of(path, layers));
        }
        // ZeRO-3 without checkpointing: the pass is one graph, so the step gathers the whole model
        // once (with checkpointing each segment gathers its own weights, `zero3::Gathered`).
        let zero3 = optimizer.as_ref().is_some_and(|o| o.shard_weights);
        let segmented = self.recompute != Recompute::Off;
        let step_model = match optimizer.as_deref() {
            Some(o) if zero3 && !segmented => o.write_back(model.clone(), comm)?,
            _ => model.clone(),
        };
        for micro_batch in micro_batches {
            let mut grads: Grads<B::InnerBackend> = Grads::new();
            {
                let cell = optimizer.as_deref_mut().map(RefCell::new);
                // Under checkpointing, each segment's buckets start their reduce-scatter as soon
                // as the segment's backward pass ends.
                let mut segment_done = |grads: &mut Grads<B::InnerBackend>, s: u32| match &cell {
                    Some(optimizer) => optimizer.borrow_mut().reduce_ready(grads, s, comm),
                    None => Ok(()),
                };
                let (mut whole, mut gathered) = (Whole, None);
                let weights: &mut dyn Weights<B> = match &cell {
                    Some(cell) if zero3 && segmented => gathered.insert(Gathered::new(&step_model, cell, comm)),
                    _ => &mut whole,
                };
                match micro_batch {
                    Some(MicroBatch { input, share }) => {
                        let loss =
                            forward_backward_into(&step_model, input, share, self.precision, self.recompute, self.set, &mut grads, weights, &mut segment_done)?;
                        loss_sum = Some(match loss_sum {
                            Some(sum) => sum + loss,
                            None => loss,
                        });
                    }
                    // No micro-batch: ZeRO-3's gathers are collectives, so this rank makes them too.
                    None if zero3 && segmented => replay(&step_model, &mut grads, weights, &mut segment_done)?,
                    None => {}
                }
            }
            if let Some(optimizer) = optimizer.as_deref_mut() {
                optimizer.end_micro_batch(&mut grads, comm)?;
            }
            alloc::mark("gradients to the slice");
        }
        drop(step_model);
        // A rank without a micro-batch adds 0.
        let loss_sum = loss_sum.map_or(0.0, |sum| sum.into_scalar().elem::<f64>());
        let finite = loss_sum.is_finite();
        let signalled = signalled();
        // One exchange: the loss, whether every rank stayed finite, and whether any was signalled.
        let totals = comm.sum_f64(&[if finite { loss_sum } else { 0.0 }, f64::from(u8::from(!finite)), f64::from(u8::from(signalled))])?;
        let (loss, mut finite, signalled) = (totals[0], totals[1] == 0.0, totals[2] > 0.0);
        let mut grad_norm = f64::NAN;
        let model = match optimizer {
            Some(optimizer) if finite => {
                let (model, norm) = optimizer.step(model, lr, self.max_grad_norm, comm)?;
                grad_norm = norm;
                finite = norm.is_finite();
                model
            }
            Some(optimizer) => {
                optimizer.clear_gradients()?;
                model
            }
            None => model,
        };
        alloc::mark("optimizer step");
        Ok((model, StepOutcome { loss: if finite { loss } else { f64::NAN }, grad_norm, finite, signalled }))
    }
}
