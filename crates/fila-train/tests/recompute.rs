//! Activation checkpointing (`fila_train::recompute`): the segmented pass (decoder layers
//! recomputed from their stored inputs, the loss in chunks of scored rows) gives the loss and
//! gradients of the one-graph pass, for every pattern of which parts train; and the one-graph
//! training loss (logits of the scored rows only) equals the loss of the full logits.

mod common;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use common::*;
use fila_data::{Batch, DataCursor, DataLoader, LoaderOptions, Pipeline, RecordSet};
use fila_model::fila::Fila;
use fila_train::batch::to_input;
use fila_train::config::LoadedConfig;
use fila_train::optim::Grads;
use fila_train::precision::Precision;
use fila_train::recompute::{forward_backward, Recompute};
use fila_train::trainable::TrainableSet;
use fila_train::trainer::build_model;
use std::sync::Arc;

type B = Autodiff<Flex>;

fn setup(sets: &[&str]) -> (Fila<B>, TrainableSet, Batch) {
    let overrides: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let loaded = LoadedConfig::load(&tiny(1), &overrides).unwrap();
    let (mut model, _, set) = build_model::<B>(&loaded, &Default::default()).unwrap();
    // CVFM's output projections start at zero, which makes every gradient below a fusion zero:
    // random values let the recomputed ConvNeXt and ViT pieces show a difference.
    for block in &mut model.encoder.cvfm {
        block.fc_out.weight = block.fc_out.weight.clone().map(|w| {
            let tracked = w.is_require_grad();
            Tensor::random(w.shape(), burn::tensor::Distribution::Normal(0.0, 0.05), &w.device()).set_require_grad(tracked)
        });
    }
    let records = Arc::new(RecordSet::load(&loaded.data).unwrap());
    let pipeline = Arc::new(Pipeline::new(loaded.data.clone()).unwrap());
    let opts = LoaderOptions::from_config(&loaded.data.loader, 0, 1, DataCursor::default(), 1);
    let batch = DataLoader::start(records, pipeline, opts).unwrap().next().unwrap().unwrap();
    (model, set, batch)
}

fn run(model: &Fila<B>, set: &TrainableSet, batch: &Batch, precision: Precision, recompute: Recompute) -> (f64, Grads<Flex>) {
    let (loss, grads) = forward_backward(model, to_input::<B>(batch, &Default::default()), 0.5, precision, recompute, set);
    (loss.into_scalar().elem::<f64>(), grads)
}

/// Same loss, same gradient names, and every gradient within `tol` of its largest magnitude, or
/// of 1e-4 of the largest gradient overall: a gradient that is zero in exact arithmetic (a key
/// projection's bias, which softmax ignores) is float noise of order 1e-11 either way.
fn assert_same(what: &str, (la, ga): &(f64, Grads<Flex>), (lb, gb): &(f64, Grads<Flex>), tol: f32) {
    assert!((la - lb).abs() <= 1e-6 * la.abs(), "{what}: loss {la} vs {lb}");
    let (na, nb): (Vec<_>, Vec<_>) = (ga.keys().collect(), gb.keys().collect());
    let only = |x: &[&String], y: &[&String]| x.iter().filter(|n| !y.contains(n)).map(|n| n.to_string()).collect::<Vec<_>>();
    assert!(na == nb, "{what}: gradients only in the first: {:?}, only in the second: {:?}", only(&na, &nb), only(&nb, &na));
    assert!(!ga.is_empty(), "{what}: no gradients");
    let largest = |v: &[f32]| v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let overall = ga.values().map(|g| largest(&g.to_data().to_vec::<f32>().unwrap())).fold(0.0f32, f32::max);
    for (name, a) in ga {
        let (a, b) = (a.to_data().to_vec::<f32>().unwrap(), gb[name].to_data().to_vec::<f32>().unwrap());
        let scale = largest(&a).max(1e-4 * overall).max(1e-12);
        let diff = max_abs_diff(&a, &b);
        assert!(diff <= tol * scale, "{what}: `{name}` differs by {diff} (largest {scale})");
    }
}

#[test]
fn recomputed_layers_give_the_one_graph_gradients() {
    let _serial = autodiff_lock();
    for (what, sets) in [
        ("stage 1 (CVFM and projector train, the LLM frozen)", vec![]),
        ("everything trains", vec!["trainable.modules=[\"all\"]"]),
        ("only the last decoder layer trains", vec!["trainable.modules=[\"llm.model.layers.1\"]"]),
        ("the final norm and first decoder layer train", vec!["trainable.modules=[\"llm.model.layers.0\", \"llm.model.norm\"]"]),
        // The encoder's recomputed pieces: a gradient through the ViT layers and a fusion into
        // one ConvNeXt stage, and through the whole tower into its stem.
        ("ConvNeXt's third stage trains", vec!["trainable.modules=[\"encoder.convnext.encoder.stages.2\"]"]),
        ("ViT's second layer and ConvNeXt's stem train", vec!["trainable.modules=[\"encoder.vit.encoder.layers.1\", \"encoder.convnext.embeddings\"]"]),
        ("the ViT embeddings train", vec!["trainable.modules=[\"encoder.vit.embeddings\"]"]),
        // Tiled images of several canvases, ConvNeXt run per image when their sizes differ.
        (
            "stage 2 geometry, everything trains",
            vec![
                "stage=2",
                "trainable.modules=[\"all\"]",
                "data.image_mode=\"tiled\"",
                "data.geometry.canvases=[[1, 2], [2, 1], [2, 2], [1, 1]]",
                "batch.micro_batch_size=3",
            ],
        ),
    ] {
        let (model, set, batch) = setup(&sets);
        let plain = run(&model, &set, &batch, Precision::F32, Recompute::Off);
        // Chunks of 3 scored rows: the loss runs in several pieces.
        let recomputed = run(&model, &set, &batch, Precision::F32, Recompute::Layers { head_rows: 3 });
        assert_same(what, &plain, &recomputed, 1e-5);
        let whole = run(&model, &set, &batch, Precision::F32, Recompute::Layers { head_rows: 1 << 20 });
        assert_same(what, &plain, &whole, 1e-5);
    }
}

#[test]
fn recomputation_runs_in_the_configured_precision() {
    let _serial = autodiff_lock();
    let (model, set, batch) = setup(&["trainable.modules=[\"all\"]"]);
    let plain = run(&model, &set, &batch, Precision::Bf16Mixed, Recompute::Off);
    let recomputed = run(&model, &set, &batch, Precision::Bf16Mixed, Recompute::Layers { head_rows: 1 << 20 });
    assert_same("bf16 products", &plain, &recomputed, 1e-5);
    // In chunks, the output projection's weight gradient is a sum of per-chunk bf16 products,
    // each rounded once: equal up to bf16 rounding (2^-8) rather than f32's.
    let chunked = run(&model, &set, &batch, Precision::Bf16Mixed, Recompute::Layers { head_rows: 4 });
    assert_same("bf16 products, loss in chunks", &plain, &chunked, 1e-2);
    // And bf16 products are not the f32 ones (so the comparison above would see a recomputation
    // that ran in f32).
    let f32 = run(&model, &set, &batch, Precision::F32, Recompute::Off);
    let apart = f32.1.iter().any(|(name, g)| {
        let (a, b) = (g.to_data().to_vec::<f32>().unwrap(), plain.1[name].to_data().to_vec::<f32>().unwrap());
        max_abs_diff(&a, &b) > 1e-3 * a.iter().fold(0.0f32, |m, x| m.max(x.abs()))
    });
    assert!(apart, "bf16 products gave the f32 gradients");
}

#[test]
fn the_training_loss_equals_the_loss_of_the_full_logits() {
    let _serial = autodiff_lock();
    let (model, _, batch) = setup(&[]);
    let dev = Default::default();
    let full = model.forward(to_input::<B>(&batch, &dev), None);
    let (loss, scored) = model.loss(to_input::<B>(&batch, &dev));
    let (a, b) = (full.loss.unwrap().into_scalar().elem::<f64>(), loss.into_scalar().elem::<f64>());
    assert_eq!(scored, full.scored_tokens);
    assert!(scored > 0);
    assert!((a - b).abs() <= 1e-6 * a.abs(), "full logits {a} vs scored rows {b}");
}
