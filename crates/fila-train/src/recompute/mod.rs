//! One micro-batch's forward and backward pass, and activation checkpointing
//! (`train.activation_checkpointing`).
//!
//! Without checkpointing the whole pass is one autodiff graph, which keeps every activation until
//! the backward pass reaches it: for Llama-3-8B at 4096 tokens that is about 36 GiB per sample.
//! With checkpointing the language model runs in segments, each with its own graph:
//!
//! 1. the vision encoder runs without a graph, keeping each ConvNeXt piece's and ViT layer's input
//!    ([`vision`]); the projector and the token embeddings run with a graph that is kept;
//! 2. the decoder layers run on the inner backend, without a graph, keeping only each layer's input
//!    (`[B, T, D]` per layer);
//! 3. the loss runs on chunks of scored positions ([`HEAD_ROWS`] by default), each from a leaf made of those
//!    rows of the last hidden state, so the `[rows, vocab]` logits exist for one chunk at a time;
//! 4. from the last layer down, each layer is recomputed from its stored input (a leaf that
//!    requires a gradient), and the backward pass of `Σ output · gradient` gives the layer's
//!    parameter gradients and the gradient of its input for the layer below;
//! 5. the gradient of the embeddings goes through the kept graph of step 1, and the visual
//!    features' gradient through the encoder's pieces, each recomputed from its stored input.
//!
//! Each parameter's gradient comes from exactly one segment, by the same operations as in one
//! graph, so both ways give the same gradients up to float summation order (tested in
//! `tests/recompute.rs`). The cost is a second forward pass of the decoder layers and of the
//! encoder's layers above its lowest trainable part.

use crate::alloc;
use crate::optim::{accumulate_grads, Grads};
use crate::precision::Precision;
use crate::trainable::TrainableSet;
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::IndexingUpdateOp;
use fila_model::fila::{Fila, FilaInput, ScoredRows};

mod vision;

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
    let loss = forward_backward_into(model, input, share, precision, recompute, set, &mut grads, &mut Whole, &mut |_, _| Ok(()))
        .expect("nothing to fail after a segment");
    (loss, grads)
}

/// [`forward_backward`] adding the gradients into `grads` and calling `segment_done(grads, s)`
/// after each segment `s` of the checkpointed pass ([`segment_of`]): from there on, the
/// gradients of that segment's parameters are final and may be sent (the optimizer starts their
/// reduce-scatter while the pass goes on, and may take them out of `grads`). The checkpointed
/// pass takes each segment's weights from `weights` ([`Whole`], or ZeRO-3's gathered shards); a
/// micro-batch without scored tokens still makes the same calls to both, in the same order
/// ([`replay`]), so every rank's collectives stay in step.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_into<B: AutodiffBackend>(
    model: &Fila<B>,
    input: FilaInput<B>,
    share: f64,
    precision: Precision,
    recompute: Recompute,
    set: &TrainableSet,
    grads: &mut Grads<B::InnerBackend>,
    weights: &mut dyn Weights<B>,
    segment_done: &mut SegmentDone<'_, B::InnerBackend>,
) -> anyhow::Result<Tensor<B::InnerBackend, 1>> {
    let rows = ScoredRows::of(input.labels.as_ref().expect("the training loss needs labels"));
    if rows.is_empty() {
        // Nothing to learn from: no gradient, so no parameter counts as updated by it.
        if recompute != Recompute::Off {
            replay(model, grads, weights, segment_done)?;
        }
        return Ok(Tensor::zeros([1], &input.input_ids.device()));
    }
    if let Recompute::Layers { head_rows } = recompute {
        recomputed(model, input, &rows, share, precision, head_rows.max(1), set, grads, weights, segment_done)
    } else {
        let (loss, _) = precision.forward(|| model.loss_at(input, &rows));
        let loss = loss.mul_scalar(share);
        alloc::mark("forward");
        accumulate_grads(model, &loss.backward(), set, grads);
        alloc::mark("backward");
        Ok(loss.inner())
    }
}

/// Called after each segment of the checkpointed pass with the gradients so far and the
/// segment's number ([`segment_of`]).
pub type SegmentDone<'a, I> = dyn FnMut(&mut Grads<I>, u32) -> anyhow::Result<()> + 'a;

/// Where the checkpointed pass takes a segment's trainable weights from.
pub trait Weights<B: AutodiffBackend> {
    /// `model` with the weights of segment `segment` ([`segment_of`]'s numbering) present.
    fn with(&mut self, model: &Fila<B>, segment: u32) -> anyhow::Result<Fila<B>>;
}

/// The model's own weights, all present (ZeRO-2, one process).
pub struct Whole;

impl<B: AutodiffBackend> Weights<B> for Whole {
    fn with(&mut self, model: &Fila<B>, _: u32) -> anyhow::Result<Fila<B>> {
        Ok(model.clone())
    }
}

/// What the checkpointed pass asks for, in order: a segment's weights, or the end of a segment's
/// backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassEvent {
    Weights(u32),
    Done(u32),
}

/// The checkpointed pass's requests for `model`, from its structure alone: the embeddings, each
/// decoder layer, the head; the head's end; then each layer from the last down to the lowest
/// one the backward pass must reach (all of them when anything below the layers trains).
pub fn pass_events<B: AutodiffBackend>(model: &Fila<B>) -> Vec<PassEvent> {
    let layers = model.llm.model.layers.len();
    let number = |s: Segment| s.number(layers);
    let mut events = vec![PassEvent::Weights(number(Segment::Embeddings))];
    events.extend((0..layers).map(|i| PassEvent::Weights(number(Segment::Layer(i)))));
    events.extend([PassEvent::Weights(number(Segment::Head)), PassEvent::Done(number(Segment::Head))]);
    let (upstream, lowest) = backward_reach(model);
    for i in (0..layers).rev() {
        if !upstream && lowest.is_none_or(|lowest| i < lowest) {
            break;
        }
        events.extend([PassEvent::Weights(number(Segment::Layer(i))), PassEvent::Done(number(Segment::Layer(i)))]);
    }
    events
}

/// Whether anything below the decoder layers trains, and the lowest decoder layer that does.
fn backward_reach<B: AutodiffBackend>(model: &Fila<B>) -> (bool, Option<usize>) {
    let upstream = trains(&model.encoder) || trains(&model.projector) || trains(&model.llm.model.embed_tokens);
    (upstream, model.llm.model.layers.iter().position(trains))
}

/// The checkpointed pass's requests without its computation: for a rank whose micro-batch has
/// nothing to learn from, so that its collectives match the other ranks'.
pub fn replay<B: AutodiffBackend>(
    model: &Fila<B>,
    grads: &mut Grads<B::InnerBackend>,
    weights: &mut dyn Weights<B>,
    segment_done: &mut SegmentDone<'_, B::InnerBackend>,
) -> anyhow::Result<()> {
    for event in pass_events(model) {
        match event {
            PassEvent::Weights(s) => drop(weights.with(model, s)?),
            PassEvent::Done(s) => segment_done(grads, s)?,
        }
    }
    Ok(())
}

/// The segments of the checkpointed pass, in the order their backward passes end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    /// The final norm and the output head (the loss chunks).
    Head,
    /// Decoder layer `i`.
    Layer(usize),
    /// The encoder, projector and token embeddings.
    Embeddings,
}

impl Segment {
    fn number(self, layers: usize) -> u32 {
        (match self {
            Segment::Head => 0,
            Segment::Layer(i) => layers - i,
            Segment::Embeddings => layers + 1,
        }) as u32
    }
}

/// The segment after whose backward pass the gradient of parameter `path` is final, as a number
/// in the order the segments end (of a model with `layers` decoder layers): the head, the
/// decoder layers from the last down, then everything else (a tied output embedding is the
/// token embedding, whose gradient ends with the last segment).
pub fn segment_of(path: &str, layers: usize) -> u32 {
    let segment = if path.starts_with("llm.lm_head.") || path.starts_with("llm.model.norm.") {
        Segment::Head
    } else if let Some(i) = path.strip_prefix("llm.model.layers.").and_then(|rest| rest.split('.').next()).and_then(|i| i.parse::<usize>().ok()) {
        Segment::Layer(i)
    } else {
        Segment::Embeddings
    };
    segment.number(layers)
}

/// The segmented pass described in the module documentation, adding each segment's gradients
/// into `grads` and calling `done` after each.
#[allow(clippy::too_many_arguments)]
fn recomputed<B: AutodiffBackend>(
    model: &Fila<B>,
    input: FilaInput<B>,
    rows: &ScoredRows,
    share: f64,
    precision: Precision,
    head_rows: usize,
    set: &TrainableSet,
    grads: &mut Grads<B::InnerBackend>,
    weights: &mut dyn Weights<B>,
    done: &mut SegmentDone<'_, B::InnerBackend>,
) -> anyhow::Result<Tensor<B::InnerBackend, 1>> {
    let layers = model.llm.model.layers.len();
    let number = |s: Segment| s.number(layers);
    // Each segment runs on a model holding its weights (the embeddings' stay for the whole pass:
    // their graph is kept), and its gradients are read from that model's parameters.
    let take = |m: &Fila<B>, g: &B::Gradients, grads: &mut Grads<B::InnerBackend>| accumulate_grads(m, g, set, grads);
    let valid = input.attention_mask;
    let with_embeddings = weights.with(model, number(Segment::Embeddings))?;
    // 1. The encoder without a graph (its pieces recomputed in step 5), the projector and the
    // token embeddings with one.
    let (visual, vision) = if input.images.is_empty() {
        (None, None)
    } else {
        let (features, stored) = vision::forward(&with_embeddings.encoder, &input.images, precision);
        let features = Tensor::<B, 2>::from_inner(features);
        let features = if stored.needs_grad() { features.require_grad() } else { features };
        (Some(precision.forward(|| with_embeddings.projector.forward(features.clone()))), Some((features, stored)))
    };
    let embeds = precision.forward(|| with_embeddings.splice(input.input_ids, visual));
    let [b, t, d] = embeds.dims();
    let device = embeds.device();
    alloc::mark("encoder and embeddings");

    // 2. The decoder layers without a graph, keeping each layer's input.
    let inner_context = model.llm.valid().context(&embeds.clone().inner(), Some(valid.clone().inner()));
    let mut stored = vec![embeds.clone().inner()];
    for i in 0..layers {
        let layer = weights.with(&with_embeddings, number(Segment::Layer(i)))?.llm.model.layers[i].valid();
        let x = stored.last().expect("the embeddings come first").clone();
        stored.push(precision.forward(|| layer.forward_in(x, &inner_context)));
    }
    alloc::mark("decoder layers without a graph");

    // 3. The loss over chunks of scored rows; the gradient of the last hidden state collects
    // each chunk's rows.
    let last = stored.pop().expect("the last layer's output");
    let scale = share / rows.len().max(1) as f64;
    let mut value = Tensor::<B::InnerBackend, 1>::zeros([1], &device);
    let mut grad = Tensor::<B::InnerBackend, 2>::zeros([b * t, d], &device);
    let with_head = weights.with(&with_embeddings, number(Segment::Head))?;
    for start in (0..rows.len()).step_by(head_rows) {
        let part = rows.part(start..(start + head_rows).min(rows.len()));
        let leaf = Tensor::<B, 2>::from_inner(part.gather(last.clone())).require_grad();
        let loss = precision.forward(|| with_head.llm.nll_sum(leaf.clone(), part.targets(&device))).mul_scalar(scale);
        value = value + loss.clone().inner();
        let g = loss.backward();
        take(&with_head, &g, grads);
        let rows_grad = leaf.grad(&g).expect("the chunk's rows are a leaf that requires a gradient");
        let index = Tensor::from_data(TensorData::new(part.index.clone(), [part.len()]), &device);
        grad = grad.select_assign(0, index, rows_grad, IndexingUpdateOp::Add);
        alloc::mark("loss chunk");
    }
    drop((last, with_head));
    done(grads, number(Segment::Head))?;

    // 4. Each layer recomputed from its input, last layer first.
    let context = model.llm.context(&embeds, Some(valid));
    let mut grad = grad.reshape([b, t, d]);
    let (upstream_trains, lowest_training_layer) = backward_reach(model);
    for i in (0..layers).rev() {
        if !upstream_trains && lowest_training_layer.is_none_or(|lowest| i < lowest) {
            // Nothing at or below this layer trains.
            return Ok(value);
        }
        let x = Tensor::<B, 3>::from_inner(stored.pop().expect("one stored input per layer"));
        let x = if upstream_trains || lowest_training_layer.is_some_and(|lowest| i > lowest) { x.require_grad() } else { x };
        let with_layer = weights.with(&with_embeddings, number(Segment::Layer(i)))?;
        let out = precision.forward(|| with_layer.llm.model.layers[i].forward_in(x.clone(), &context));
        let g = (out * Tensor::from_inner(grad)).sum().backward();
        take(&with_layer, &g, grads);
        alloc::mark("layer recomputed and backward");
        let below = x.grad(&g);
        drop((g, with_layer));
        done(grads, number(Segment::Layer(i)))?;
        match below {
            Some(below) => grad = below,
            None => return Ok(value), // the lowest training layer: nothing below needs a gradient
        }
    }

    // 5. The embeddings' graph, then the encoder's pieces recomputed.
    if upstream_trains {
        let g = (embeds * Tensor::from_inner(grad)).sum().backward();
        take(&with_embeddings, &g, grads);
        alloc::mark("projector and embeddings backward");
        if let Some((Some(grad), stored)) = vision.map(|(features, stored)| (features.grad(&g), stored)) {
            drop(g);
            vision::backward(&with_embeddings.encoder, stored, grad, precision, &mut |g| take(&with_embeddings, g, grads));
            alloc::mark("encoder recomputed and backward");
        }
    }
    Ok(value)
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
