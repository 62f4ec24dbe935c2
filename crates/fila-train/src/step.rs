//! One training step, the code both `fila-train` and `fila bench` run: each micro-batch's forward
//! and backward pass (with the configured recomputation), its gradients added to the optimizer's
//! slice at once (ZeRO-2), one exchange of the step's loss and flags over the ranks, then the
//! clipped, sharded AdamW update, skipped when any rank's loss or the gradient norm is not finite.

use crate::alloc;
use crate::config::TrainConfig;
use crate::dist::Comm;
use crate::optim::{AdamW, Grads};
use crate::precision::Precision;
use crate::recompute::{forward_backward, Recompute};
use crate::trainable::TrainableSet;
use anyhow::Result;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use fila_model::fila::{Fila, FilaInput};

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
    pub fn run<B: AutodiffBackend>(
        &self,
        model: Fila<B>,
        micro_batches: impl IntoIterator<Item = Option<MicroBatch<B>>>,
        mut optimizer: Option<&mut AdamW<B::InnerBackend>>,
        lr: f64,
        comm: &Comm,
        signalled: impl FnOnce() -> bool,
    ) -> Result<(Fila<B>, StepOutcome)> {
        // The step's loss stays on the device until the end of the step: one read per step.
        let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
        for micro_batch in micro_batches {
            let mut grads: Grads<B::InnerBackend> = Grads::new();
            if let Some(MicroBatch { input, share }) = micro_batch {
                let (loss, g) = forward_backward(&model, input, share, self.precision, self.recompute, self.set);
                loss_sum = Some(match loss_sum {
                    Some(sum) => sum + loss,
                    None => loss,
                });
                grads = g;
            }
            if let Some(optimizer) = optimizer.as_deref_mut() {
                optimizer.add_gradients(&grads, comm)?;
            }
            alloc::mark("gradients to the slice");
        }
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
                optimizer.clear_gradients();
                model
            }
            None => model,
        };
        alloc::mark("optimizer step");
        Ok((model, StepOutcome { loss: if finite { loss } else { f64::NAN }, grad_norm, finite, signalled }))
    }
}
