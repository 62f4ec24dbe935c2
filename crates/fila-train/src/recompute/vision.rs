//! Activation checkpointing of the vision encoder: the ConvNeXt pieces
//! ([`ConvNextModel::pieces`]) and the ViT layers (each with the CVFM fusion after it) run without
//! a graph, keeping each piece's and layer's input; the backward pass recomputes one of them at a
//! time from its stored input, from the top down, as the decoder layers are
//! ([`super::recomputed`]).
//!
//! The ViT's layers go first: a layer with a fusion also gives the gradient of the ConvNeXt stage
//! map it read. Then each ConvNeXt batch from its last piece down, the stage maps' gradients from
//! the fusions added where a stage ends. Each parameter's gradient comes from exactly one
//! recomputed piece, by the operations of the one-graph pass.

use crate::precision::Precision;
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use fila_model::convnext::{ConvNextModel, ConvNextPiece};
use fila_model::hybrid_encoder::{HybridEncoder, ImageInput};

/// The stored inputs of a micro-batch's encoder pass.
pub struct Stored<I: Backend> {
    images: Vec<ImageInput<I>>,
    /// Per ConvNeXt batch: the pixels, then every piece's output; `None` where no recomputation
    /// reads it (below the lowest training piece, except the stage maps the fusions read).
    conv: Vec<Vec<Option<Tensor<I, 4>>>>,
    /// The input of each ViT layer up to the feature layer.
    vit: Vec<Tensor<I, 3>>,
    depends: Depends,
}

impl<I: Backend> Stored<I> {
    /// Whether the features depend on a trainable parameter of the encoder: only then does
    /// [`backward`] have anything to do.
    pub fn needs_grad(&self) -> bool {
        self.depends.vit.last().copied().unwrap_or(false)
    }
}

/// Which stored values depend on a trainable parameter: those need a gradient.
struct Depends {
    /// Per value of a ConvNeXt batch (the pixels, then each piece's output).
    conv: Vec<bool>,
    /// Per ViT layer's input, then the feature layer's output.
    vit: Vec<bool>,
    /// Each stage's output among a ConvNeXt batch's values.
    ends: Vec<usize>,
}

impl Depends {
    fn of<B: AutodiffBackend>(encoder: &HybridEncoder<B>) -> Self {
        let mut conv = vec![false];
        let mut ends = Vec::new();
        if let Some(convnext) = &encoder.convnext {
            for (j, piece) in convnext.pieces().into_iter().enumerate() {
                let before = conv[j];
                conv.push(before || piece_trains(convnext, piece));
                if convnext.ends_stage(piece).is_some() {
                    ends.push(j + 1);
                }
            }
        }
        let mut vit = vec![super::trains(&encoder.vit.embeddings) || super::trains(&encoder.vit.pre_layrnorm)];
        for index in 0..encoder.feature_layer {
            let before = vit[index];
            let fused = encoder.fused_stage(index).is_some_and(|k| super::trains(&encoder.cvfm[k]) || conv[ends[k]]);
            vit.push(before || super::trains(&encoder.vit.encoder.layers[index]) || fused);
        }
        Self { conv, vit, ends }
    }

    /// Stage `k`'s map among a ConvNeXt batch's stored `values`.
    fn stage_map<I: Backend>(&self, values: &[Option<Tensor<I, 4>>], k: usize) -> Tensor<I, 4> {
        values[self.ends[k]].clone().expect("stage maps are kept")
    }

    /// Whether the backward pass reads ConvNeXt value `v`: the input of a recomputed piece, or a
    /// stage map.
    fn keeps_conv(&self, v: usize) -> bool {
        self.ends.contains(&v) || self.conv.get(v + 1).copied().unwrap_or(false)
    }
}

/// The encoder's forward pass without a graph: the features (`[Σ views·g², D]`) and the stored
/// inputs for [`backward`].
pub fn forward<B: AutodiffBackend>(
    encoder: &HybridEncoder<B>,
    images: &[ImageInput<B>],
    precision: Precision,
) -> (Tensor<B::InnerBackend, 2>, Stored<B::InnerBackend>) {
    let depends = Depends::of(encoder);
    let encoder = encoder.valid();
    let images: Vec<ImageInput<B::InnerBackend>> =
        images.iter().map(|im| ImageInput { views: im.views.clone().inner(), hires: im.hires.clone().map(Tensor::inner), grid: im.grid }).collect();
    let conv: Vec<Vec<Option<Tensor<B::InnerBackend, 4>>>> = match &encoder.convnext {
        None => Vec::new(),
        Some(convnext) => encoder
            .convnext_batches(&images)
            .into_iter()
            .map(|pixels| {
                let mut values = Vec::new();
                let mut x = pixels;
                for (j, piece) in convnext.pieces().into_iter().enumerate() {
                    let next = precision.forward(|| convnext.run_piece(piece, x.clone()));
                    values.push(depends.keeps_conv(j).then_some(x));
                    x = next;
                }
                values.push(Some(x));
                values
            })
            .collect(),
    };
    let maps = |k: usize| -> Vec<Tensor<B::InnerBackend, 4>> { conv.iter().map(|values| depends.stage_map(values, k)).collect() };
    let mut vit = vec![precision.forward(|| encoder.vit_input(&images))];
    for index in 0..encoder.feature_layer {
        let h = vit.last().expect("the embeddings come first").clone();
        vit.push(precision.forward(|| encoder.layer(index, h, &images, &maps)));
    }
    let last = vit.pop().expect("the feature layer's output");
    let features = HybridEncoder::features(last);
    let stored = Stored { images, conv, vit, depends };
    if !stored.needs_grad() {
        // Nothing in the encoder trains: no backward pass will read them.
        return (features, Stored { images: Vec::new(), conv: Vec::new(), vit: Vec::new(), ..stored });
    }
    (features, stored)
}

/// The backward pass of [`forward`] given the features' gradient `grad`: recomputes each piece
/// with `encoder`'s weights and hands each piece's parameter gradients to `take`.
pub fn backward<B: AutodiffBackend>(
    encoder: &HybridEncoder<B>,
    stored: Stored<B::InnerBackend>,
    grad: Tensor<B::InnerBackend, 2>,
    precision: Precision,
    take: &mut dyn FnMut(&B::Gradients),
) {
    let Stored { images, conv, mut vit, depends } = stored;
    let Depends { conv: conv_depends, vit: vit_depends, ends } = &depends;
    let images: Vec<ImageInput<B>> =
        images.into_iter().map(|im| ImageInput { views: Tensor::from_inner(im.views), hires: im.hires.map(Tensor::from_inner), grid: im.grid }).collect();

    // The ViT layers from the feature layer down; the fused stage maps' gradients per stage and
    // ConvNeXt batch.
    let mut map_grads: Vec<Vec<Option<Tensor<B::InnerBackend, 4>>>> = vec![vec![None; conv.len()]; ends.len()];
    let mut top = Some(grad);
    let mut below: Option<Tensor<B::InnerBackend, 3>> = None;
    for index in (0..encoder.feature_layer).rev() {
        let x = vit.pop().expect("one stored input per ViT layer");
        if !vit_depends[index + 1] {
            break;
        }
        let x = leaf::<B, 3>(x, vit_depends[index]);
        let fused = encoder.fused_stage(index);
        let leaves: Vec<Tensor<B, 4>> = match fused {
            Some(k) => conv.iter().map(|values| leaf(depends.stage_map(values, k), conv_depends[ends[k]])).collect(),
            None => Vec::new(),
        };
        let out = precision.forward(|| encoder.layer(index, x.clone(), &images, &|_| leaves.clone()));
        let objective = match (top.take(), below.take()) {
            (Some(features), _) => (HybridEncoder::features(out) * Tensor::from_inner(features)).sum(),
            (None, Some(g)) => (out * Tensor::from_inner(g)).sum(),
            (None, None) => unreachable!("a gradient reaches every layer below the top"),
        };
        let g = objective.backward();
        take(&g);
        if let Some(k) = fused {
            for (slot, leaf) in map_grads[k].iter_mut().zip(&leaves) {
                *slot = leaf.grad(&g);
            }
        }
        below = x.grad(&g);
    }
    if let Some(g) = below {
        if vit_depends[0] {
            take(&(precision.forward(|| encoder.vit_input(&images)) * Tensor::from_inner(g)).sum().backward());
        }
    }

    // Each ConvNeXt batch from its last piece down.
    let Some(convnext) = &encoder.convnext else { return };
    let pieces = convnext.pieces();
    for (batch, mut values) in conv.into_iter().enumerate() {
        let mut grad: Option<Tensor<B::InnerBackend, 4>> = None;
        for (j, &piece) in pieces.iter().enumerate().rev() {
            values.pop(); // this piece's output
            if let Some(k) = convnext.ends_stage(piece) {
                grad = sum(grad, map_grads[k][batch].take());
            }
            if !conv_depends[j + 1] {
                break;
            }
            let Some(g_out) = grad.take() else { continue };
            let input = values.last().cloned().flatten().expect("a recomputed piece's input is kept");
            let x = leaf::<B, 4>(input, conv_depends[j]);
            let out = precision.forward(|| convnext.run_piece(piece, x.clone()));
            let g = (out * Tensor::from_inner(g_out)).sum().backward();
            take(&g);
            grad = x.grad(&g);
        }
    }
}

/// Whether one of `piece`'s parameters trains.
fn piece_trains<B: Backend>(convnext: &ConvNextModel<B>, piece: ConvNextPiece) -> bool {
    match piece {
        ConvNextPiece::Stem => super::trains(&convnext.embeddings),
        ConvNextPiece::Downsample(k) => super::trains(&convnext.encoder.stages[k].downsampling_layer),
        ConvNextPiece::Layer(k, j) => super::trains(&convnext.encoder.stages[k].layers[j]),
    }
}

/// A stored value as the input of a recomputed piece: a leaf requiring a gradient when something
/// before it trains.
fn leaf<B: AutodiffBackend, const D: usize>(x: Tensor<B::InnerBackend, D>, needs_grad: bool) -> Tensor<B, D> {
    let x = Tensor::from_inner(x);
    if needs_grad {
        x.require_grad()
    } else {
        x
    }
}

fn sum<I: Backend>(a: Option<Tensor<I, 4>>, b: Option<Tensor<I, 4>>) -> Option<Tensor<I, 4>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}
