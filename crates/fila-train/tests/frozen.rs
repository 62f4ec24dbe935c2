//! Stage 1 leaves every frozen parameter bit-identical and changes the trainable ones; the
//! `final/` export loads back through `Fila::load`. (Own test binary: it seeds Burn's global RNG.)

mod common;

use burn::backend::{Autodiff, Flex};
use common::*;
use fila_model::fila::{Fila, FilaConfig, ModelSource};
use fila_train::config::LoadedConfig;
use fila_train::trainer::build_model;

#[test]
fn stage1_changes_only_cvfm_and_projector_and_final_loads() {
    let _serial = autodiff_lock();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let sets = ["train.max_steps=2", "schedule.warmup_steps=0", "checkpoint.every_steps=0"];
    let mut overrides: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    overrides.push(format!("checkpoint.output_dir={}", out.display()));
    let loaded = LoadedConfig::load(&tiny(1), &overrides).unwrap();
    let (model, _, set) = build_model::<Autodiff<Flex>>(&loaded, &Default::default()).unwrap();
    assert!(set.params.keys().all(|p| p.starts_with("encoder.cvfm.") || p.starts_with("projector.")));
    let before = model.named_tensors();
    ok(&fila_train(&tiny(1), &out, &sets, &[]));
    let after = tensors(&out.join("final/model.safetensors"));
    assert_eq!(before.len(), after.len());
    let (mut frozen, mut changed) = (0, 0);
    for (name, data) in &before {
        let old: Vec<f32> = data.clone().convert::<f32>().to_vec().unwrap();
        let new = &after[name].1;
        if name.starts_with("cvfm.") || name.starts_with("projector.") {
            changed += usize::from(old != *new);
        } else {
            assert!(old == *new, "frozen `{name}` changed (max diff {})", max_abs_diff(&old, new));
            frozen += 1;
        }
    }
    assert!(frozen > 100, "{frozen} frozen tensors checked");
    // All 44 trainable tensors move except what cannot in 2 steps: none are expected to stay.
    assert!(changed >= 40, "only {changed} of 44 trainable tensors changed");

    // final/ is a FILA checkpoint: Fila::load reads it back to the same values.
    let final_dir = out.join("final");
    let config = FilaConfig::from_checkpoint_dir(&final_dir).unwrap();
    let loaded_back = Fila::<Flex>::load(&config, &ModelSource::Checkpoint(final_dir.clone()), &Default::default()).unwrap();
    for (name, data) in loaded_back.named_tensors() {
        assert!(data.convert::<f32>().to_vec::<f32>().unwrap() == after[&name].1, "`{name}` differs after reload");
    }
    assert!(final_dir.join("tokenizer.json").is_file());
}

#[test]
fn stage1_without_convnext_trains_the_projector_alone() {
    let _serial = autodiff_lock();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vit-only");
    let text = ok(&fila_train(&tiny(1), &out, &["train.max_steps=1", "model.hybrid.use_convnext=false"], &[]));
    assert!(text.contains("stage 1: 4 of"), "{text}");
}
