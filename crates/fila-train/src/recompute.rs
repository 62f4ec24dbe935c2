//! One micro-batch's forward and backward pass, and activation checkpointing
//! (`train.activation_checkpointing`).
//!
//! Without checkpointing the whole pass is one autodiff graph, which keeps every activation until
//! the backward pass reaches it: for Llama-3-8B at 4096 tokens that is about 36 GiB per sample.
//! With checkpointing the language model runs in segments, each with its own graph:
//!
//! 1. the images and token embeddings (encoder, projector, splice) run with a graph that is kept;
//! 2. the decoder layers run on the inner backend, without a graph, keeping only each layer's input
//!    (`[B, T, D]` per layer);
//! 3. the loss runs on chunks of scored positions ([`HEAD_ROWS`] by default), each from a leaf made of those
//!    rows of the last hidden state, so the `[rows, vocab]` logits exist for one chunk at a time;
//! 4. from the last layer down, each layer is recomputed from its stored input (a leaf that
//!    requires a gradient), and the backward pass of `Σ output · gradient` gives the layer's
//!    parameter gradients and the gradient of its input for the layer below;
//! 5. the gradient of the embeddings goes through the kept graph of step 1.
//!
//! Each parameter's gradient comes from exactly one segment, by the same operations as in one
//! graph, so both ways give the same gradients up to float summation order (tested in
//! `tests/recompute.rs`). The cost is a second forward pass of the decoder layers.

use crate::alloc;
use crate::optim::{accumulate_grads, Grads};
use crate::precision::Precision;
use crate::trainable::TrainableSet;
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::IndexingUpdateOp;
use fila_model::fila::{Fila, FilaInput, ScoredRows};

/// Scored positions per chunk of the loss under checkpointing: the chunk's logits are
/// `HEAD_ROWS × vocab` floats (0.5 GiB in f32 for Llama-3's 128,256 tokens), three times over
/// with their log-softmax and gradient.
pub const HEAD_ROWS: usize = 1024;

/// How a micro-batch's activations are kept for the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recompute {
    /// One graph over the whole pass.
    Off,
    /// The segmented pass, the loss in chunks of `head_rows` scored positions.
    Layers { head_rows: usize },
}

impl Recompute {
    /// `train.activation_checkpointing`.
    pub fn from_config(activation_checkpointing: bool) -> Self {
        if activation_checkpointing {
            Self::Layers { head_rows: HEAD_ROWS }
        } else {
            Self::Off
        }
    }
}

/// Forward and backward pass of one micro-batch whose mean loss is scaled by `share`: returns the
/// scaled loss, still on the device (the trainer reads the step's sum once), and the trainable
/// parameters' gradients by path. A non-finite loss gives non-finite gradients; the trainer then
/// skips the step.
pub fn forward_backward<B: AutodiffBackend>(
    model: &Fila<B>,
    input: FilaInput<B>,
    share: f64,
    precision: Precision,
    recompute: Recompute,
    set: &TrainableSet,
) -> (Tensor<B::InnerBackend, 1>, Grads<B::InnerBackend>) {
    let mut grads = Grads::new();
    let rows = ScoredRows::of(input.labels.as_ref().expect("the training loss needs labels"));
    if rows.is_empty() {
        // Nothing to learn from: no gradient, so no parameter counts as updated by it.
        return (Tensor::zeros([1], &input.input_ids.device()), grads);
    }
    let loss = if let Recompute::Layers { head_rows } = recompute {
        recomputed(model, input, &rows, share, precision, head_rows.max(1), &mut |g| accumulate_grads(model, g, set, &mut grads))
    } else {
        let (loss, _) = precision.forward(|| model.loss_at(input, &rows));
        let loss = loss.mul_scalar(share);
        alloc::mark("forward");
        accumulate_grads(model, &loss.backward(), set, &mut grads);
        alloc::mark("backward");
        loss.inner()
    };
    (loss, grads)
}

/// The segmented pass described in the module documentation; `take` receives each segment's
/// gradients.
fn recomputed<B: AutodiffBackend>(
    model: &Fila<B>,
    input: FilaInput<B>,
    rows: &ScoredRows,
    share: f64,
    precision: Precision,
    head_rows: usize,
    take: &mut dyn FnMut(&B::Gradients),
) -> Tensor<B::InnerBackend, 1> {
    let valid = input.attention_mask;
    let embeds = precision.forward(|| model.embed_batch(input.input_ids, &input.images, None));
    let [b, t, d] = embeds.dims();
    let device = embeds.device();
    alloc::mark("encoder and embeddings");

    // 2. The decoder layers without a graph, keeping each layer's input.
    let llm = model.llm.valid();
    let inner_context = llm.context(&embeds.clone().inner(), Some(valid.clone().inner()));
    let mut stored = vec![embeds.clone().inner()];
    for layer in &llm.model.layers {
        let x = stored.last().expect("the embeddings come first").clone();
        stored.push(precision.forward(|| layer.forward_in(x, &inner_context)));
    }
    drop(llm);
    alloc::mark("decoder layers without a graph");

    // 3. The loss over chunks of scored rows; the gradient of the last hidden state collects
    // each chunk's rows.
    let last = stored.pop().expect("the last layer's output");
    let scale = share / rows.len().max(1) as f64;
    let mut value = Tensor::<B::InnerBackend, 1>::zeros([1], &device);
    let mut grad = Tensor::<B::InnerBackend, 2>::zeros([b * t, d], &device);
    for start in (0..rows.len()).step_by(head_rows) {
        let part = rows.part(start..(start + head_rows).min(rows.len()));
        let leaf = Tensor::<B, 2>::from_inner(part.gather(last.clone())).require_grad();
        let loss = precision.forward(|| model.llm.nll_sum(leaf.clone(), part.targets(&device))).mul_scalar(scale);
        value = value + loss.clone().inner();
        let g = loss.backward();
        take(&g);
        let rows_grad = leaf.grad(&g).expect("the chunk's rows are a leaf that requires a gradient");
        let index = Tensor::from_data(TensorData::new(part.index.clone(), [part.len()]), &device);
        grad = grad.select_assign(0, index, rows_grad, IndexingUpdateOp::Add);
        alloc::mark("loss chunk");
    }
    drop(last);

    // 4. Each layer recomputed from its input, last layer first.
    let context = model.llm.context(&embeds, Some(valid));
    let mut grad = grad.reshape([b, t, d]);
    let upstream_trains = trains(&model.encoder) || trains(&model.projector) || trains(&model.llm.model.embed_tokens);
    let lowest_training_layer = model.llm.model.layers.iter().position(trains);
    for (i, layer) in model.llm.model.layers.iter().enumerate().rev() {
        if !upstream_trains && lowest_training_layer.is_none_or(|lowest| i < lowest) {
            // Nothing at or below this layer trains.
            return value;
        }
        let x = Tensor::<B, 3>::from_inner(stored.pop().expect("one stored input per layer"));
        let x = if upstream_trains || lowest_training_layer.is_some_and(|lowest| i > lowest) { x.require_grad() } else { x };
        let out = precision.forward(|| layer.forward_in(x.clone(), &context));
        let g = (out * Tensor::from_inner(grad)).sum().backward();
        take(&g);
        alloc::mark("layer recomputed and backward");
        match x.grad(&g) {
            Some(below) => grad = below,
            None => return value, // the lowest training layer: nothing below needs a gradient
        }
    }

    // 5. The embeddings' graph.
    if upstream_trains {
        take(&(embeds * Tensor::from_inner(grad)).sum().backward());
        alloc::mark("encoder backward");
    }
    value
}

/// Whether any parameter of `module` takes a gradient.
fn trains<B: Backend, M: Module<B>>(module: &M) -> bool {
    struct Any(bool);
    impl<B: Backend> ModuleVisitor<B> for Any {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 |= param.val().is_require_grad();
        }
    }
    let mut any = Any(false);
    module.visit(&mut any);
    any.0
}
