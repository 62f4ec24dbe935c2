//! `bf16_mixed` stores frozen matrix weights in bf16: a stage-1 step computes the same bits as
//! with f32 weights cast at every product, and only the frozen product weights change dtype.
//! (Run on the CPU backend, whose bf16 products the policy does not use for training but which
//! compute the same way.)

mod common;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::DType;
use common::*;
use fila_data::{DataCursor, DataLoader, LoaderOptions, Pipeline, RecordSet};
use fila_model::autocast::{with_compute, Compute};
use fila_model::fila::Fila;
use fila_train::batch::to_input;
use fila_train::config::LoadedConfig;
use fila_train::optim::{accumulate_grads, Grads};
use fila_train::precision::Precision;
use fila_train::trainer::build_model;
use std::sync::Arc;

type B = Autodiff<Flex>;

#[test]
fn frozen_weights_stored_in_bf16_compute_what_per_product_casts_compute() {
    let dev = Default::default();
    let loaded = LoadedConfig::load(&tiny(1), &[]).unwrap();
    let (model, _, set) = build_model::<B>(&loaded, &dev).unwrap();
    let stored = Precision::Bf16Mixed.store_frozen(model.clone(), &set);

    // Which tensors changed dtype: frozen product weights only.
    let (mut bf16, mut f32) = (0, 0);
    for (name, data) in stored.named_tensors() {
        let trainable = name.starts_with("cvfm.") || name.starts_with("projector.");
        if data.dtype == DType::BF16 {
            assert!(!trainable && name.ends_with(".weight") && !name.contains("embed"), "`{name}` stored in bf16");
            bf16 += 1;
        } else {
            assert_eq!(data.dtype, DType::F32, "{name}");
            f32 += 1;
        }
    }
    assert!(bf16 > 50 && f32 > 50, "{bf16} bf16, {f32} f32 tensors");
    // f32 keeps everything as it was.
    assert!(Precision::F32.store_frozen(model.clone(), &set).named_tensors().iter().all(|(_, d)| d.dtype == DType::F32));

    let records = Arc::new(RecordSet::load(&loaded.data).unwrap());
    let pipeline = Arc::new(Pipeline::new(loaded.data.clone()).unwrap());
    let opts = LoaderOptions::from_config(&loaded.data.loader, 0, 1, DataCursor::default(), 1);
    let batch = DataLoader::start(records, pipeline, opts).unwrap().next().unwrap().unwrap();
    let step = |m: &Fila<B>| {
        let out = with_compute(Compute::Bf16, || m.forward(to_input::<B>(&batch, &dev), None));
        let loss = out.loss.unwrap();
        let value: f32 = loss.clone().into_scalar().elem();
        let mut grads: Grads<Flex> = Grads::new();
        accumulate_grads(m, &loss.backward(), &set, &mut grads);
        (out.logits.into_data(), value, grads)
    };
    let (logits_cast, loss_cast, grads_cast) = step(&model);
    let (logits_stored, loss_stored, grads_stored) = step(&stored);
    assert_eq!(loss_stored, loss_cast);
    assert_eq!(logits_stored.to_vec::<f32>().unwrap(), logits_cast.to_vec::<f32>().unwrap());
    assert_eq!(grads_stored.len(), set.params.len());
    for (name, g) in &grads_cast {
        let (a, b): (Vec<f32>, Vec<f32>) = (g.to_data().to_vec().unwrap(), grads_stored[name].to_data().to_vec().unwrap());
        assert!(a == b, "gradient of `{name}` differs (max {})", max_abs_diff(&a, &b));
    }
}
