//! `bf16_mixed` stores product weights in bf16 (frozen ones when the model is built, trainable
//! ones once the optimizer holds their f32 master values): steps compute the same bits as f32
//! weights cast at every product, only product weights change dtype, and a checkpoint carries the
//! master values so a resumed run continues exactly.
//! (Run on the CPU backend, where `bf16_mixed` is accepted for tests: its bf16 products compute
//! the same way. The same path through the binary, on several ranks: `tests/ranks.rs`.)

mod common;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use common::*;
use fila_data::{DataCursor, DataLoader, LoaderOptions, Pipeline, RecordSet};
use fila_model::autocast::{with_compute, Compute};
use fila_model::fila::Fila;
use fila_train::batch::to_input;
use fila_train::config::LoadedConfig;
use fila_train::dist::Comm;
use fila_train::optim::{accumulate_grads, AdamW, Grads};
use fila_train::precision::Precision;
use fila_train::shard::{FlatLayout, BUCKET_ELEMENTS};
use fila_train::trainer::build_model;
use std::sync::Arc;

type B = Autodiff<Flex>;

#[test]
fn frozen_weights_stored_in_bf16_compute_what_per_product_casts_compute() {
    let _serial = autodiff_lock();
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

/// Two AdamW steps of stage 1 (trainable CVFM and projector, in bf16 storage as well) against the
/// per-product casts of f32 weights: the first step is bit-identical; after it the convolutions'
/// bf16 weight gradients differ in their last bits (the weight reaches the kernel in another
/// memory layout, which changes the summation order), so losses agree to 1e-4 (2e-5 seen) and
/// weights to a bf16 step of their largest value. A third step after a save and load equals the straight one bit for bit: the checkpoint
/// carries the f32 master values.
#[test]
fn trainable_weights_in_bf16_with_f32_masters_train_like_per_product_casts() {
    let _serial = autodiff_lock();
    let dev = Default::default();
    let loaded = LoadedConfig::load(&tiny(1), &[]).unwrap();
    let (model, _, set) = build_model::<B>(&loaded, &dev).unwrap();
    let records = Arc::new(RecordSet::load(&loaded.data).unwrap());
    let pipeline = Arc::new(Pipeline::new(loaded.data.clone()).unwrap());
    let opts = LoaderOptions::from_config(&loaded.data.loader, 0, 1, DataCursor::default(), 1);
    let batches: Vec<_> = DataLoader::start(records, pipeline, opts).unwrap().take(3).map(|b| b.unwrap()).collect();
    let config = loaded.config.optimizer.clone();
    let new_optimizer = |m: &Fila<B>, master: bool| {
        let mut o = AdamW::new(config.clone(), &set, FlatLayout::new(&set, 1, 0, BUCKET_ELEMENTS), m, &dev);
        o.master_in_checkpoint = master;
        o
    };
    let step = |m: Fila<B>, o: &mut AdamW<Flex>, k: usize| {
        let out = with_compute(Compute::Bf16, || m.forward(to_input::<B>(&batches[k], &dev), None));
        let loss = out.loss.unwrap();
        let value: f32 = loss.clone().into_scalar().elem();
        let mut grads: Grads<Flex> = Grads::new();
        accumulate_grads(&m, &loss.backward(), &set, &mut grads);
        o.add_gradients(&grads, &Comm::single()).unwrap();
        (o.step(m, 1e-3, 1.0, &Comm::single()).unwrap().0, value)
    };
    let trainable_values = |m: &Fila<B>| -> Vec<(String, TensorData)> {
        let names: Vec<String> = m.named_tensors().into_iter().map(|(n, _)| n).filter(|n| n.starts_with("cvfm.") || n.starts_with("projector.")).collect();
        m.named_tensors().into_iter().filter(|(n, _)| names.contains(n)).collect()
    };

    let (mut cast, mut cast_opt) = (model.clone(), new_optimizer(&model, false));
    let mut stored_opt = new_optimizer(&model, true);
    let mut stored = Precision::Bf16Mixed.store_trainable(Precision::Bf16Mixed.store_frozen(model.clone(), &set), &set);
    let product_weights = trainable_values(&stored).iter().filter(|(_, d)| d.dtype == DType::BF16).count();
    assert!(product_weights >= 10, "{product_weights} trainable product weights in bf16");
    for k in 0..2 {
        let (a, la) = step(cast, &mut cast_opt, k);
        let (b, lb) = step(stored, &mut stored_opt, k);
        if k == 0 {
            assert_eq!(la, lb, "loss of step {k}");
        }
        assert!((la - lb).abs() <= 1e-4 * la.abs(), "loss of step {k}: {la} vs {lb}");
        (cast, stored) = (a, b);
    }
    // The stored weights are the f32 run's weights as its products read them (Burn's bf16 cast);
    // norms and biases are f32 in both.
    for ((name, f), (_, s)) in trainable_values(&cast).into_iter().zip(trainable_values(&stored)) {
        let expected = if s.dtype == DType::BF16 {
            let v: Vec<f32> = f.convert::<f32>().to_vec().unwrap();
            let n = v.len();
            Tensor::<Flex, 1>::from_data(TensorData::new(v, [n]), &dev).cast(burn::tensor::FloatDType::BF16).into_data()
        } else {
            f
        };
        assert_eq!(expected.dtype, s.dtype, "{name}");
        let (e, g): (Vec<f32>, Vec<f32>) = (expected.convert::<f32>().to_vec().unwrap(), s.convert::<f32>().to_vec().unwrap());
        // One bf16 step (2^-7 relative) of the tensor's largest value at most.
        let scale = e.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(max_abs_diff(&e, &g) <= scale / 128.0, "`{name}` after 2 steps: max diff {} (largest value {scale})", max_abs_diff(&e, &g));
    }

    // Save, then resume from the stored model (bf16-rounded weights) and the shard's masters.
    let tmp = tempfile::tempdir().unwrap();
    stored_opt.save(tmp.path()).unwrap();
    let mut resumed_opt = new_optimizer(&stored, true);
    resumed_opt.load(tmp.path()).unwrap();
    let (_, cast_loss) = step(cast.clone(), &mut cast_opt, 2);
    let (after_straight, straight) = step(stored.clone(), &mut stored_opt, 2);
    let (after_resumed, resumed) = step(stored, &mut resumed_opt, 2);
    assert_eq!(resumed, straight, "loss of step 3");
    assert!((cast_loss - straight).abs() <= 1e-4 * cast_loss.abs(), "loss of step 3: {cast_loss} vs {straight}");
    for ((name, a), (_, b)) in trainable_values(&after_straight).into_iter().zip(trainable_values(&after_resumed)) {
        assert!(a.to_vec::<f32>().ok() == b.to_vec::<f32>().ok() && a.dtype == b.dtype, "`{name}` after the resumed step");
    }
}
