//! QLoRA runs (`lora.base_bits = 4`) through the real binary on the tiny configs: the language
//! model's projections stored as NF4, training and exact resume, and a `final/` that is the
//! de-quantised base plus the adapters, merged, computing what the QLoRA model computed. Plus the
//! plan of configs/stage2-qlora.toml and the settings QLoRA refuses.

mod common;

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use common::*;
use fila_model::fila::{Fila, FilaConfig, ModelSource};
use fila_model::nf4::Nf4Weight;
use fila_train::config::LoadedConfig;
use std::path::Path;

type A = Autodiff<Flex>;

/// Stage 2 from a one-step stage 1: QLoRA rank 8 with dropout, 4 steps of 2 micro-batches, the
/// decoder layers recomputed (QLoRA requires it).
fn qlora_sets(init: &Path) -> Vec<String> {
    [
        "train.max_steps=4",
        "schedule.warmup_steps=0",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=0",
        "lora.r=8",
        "lora.base_bits=4",
        "lora.dropout=0.1",
        "lora.lr=1e-3",
        "train.activation_checkpointing=true",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("model.checkpoint={}", init.display())])
    .collect()
}

#[test]
fn a_qlora_stage_2_trains_on_nf4_weights_resumes_exactly_and_exports_the_merged_model() {
    let tmp = tempfile::tempdir().unwrap();
    let init = stage1_export(tmp.path());
    let sets = qlora_sets(&init);
    let straight = tmp.path().join("straight");
    let text = ok(&fila_train(&tiny(2), &straight, &refs(&sets), &[]));
    let trained = losses(&straight);
    assert_eq!(trained.len(), 4, "{text}");
    assert!(trained.values().all(|l| l.is_finite()), "{trained:?}");

    // The QLoRA model: every projection of every decoder layer in NF4 behind an empty placeholder,
    // the same parameter paths as a LoRA model's.
    let _lock = autodiff_lock();
    let device = Default::default();
    let overrides: Vec<String> = sets.iter().cloned().chain([format!("checkpoint.output_dir={}", straight.display())]).collect();
    let loaded = LoadedConfig::load(&tiny(2), &overrides).unwrap();
    let (model, fila_config, set) = fila_train::trainer::build_model::<A>(&loaded, &device).unwrap();
    for layer in &model.llm.model.layers {
        let (a, m) = (&layer.self_attn, &layer.mlp);
        for (linear, nf4) in [(&a.q_proj, &a.q_nf4), (&a.k_proj, &a.k_nf4), (&a.v_proj, &a.v_nf4), (&a.o_proj, &a.o_nf4)].into_iter().chain([
            (&m.gate_proj, &m.gate_nf4),
            (&m.up_proj, &m.up_nf4),
            (&m.down_proj, &m.down_nf4),
        ]) {
            assert!(nf4.is_some());
            assert_eq!(linear.weight.dims(), [0, 0]);
        }
    }
    assert!(model.llm.model.embed_tokens.weight.dims()[0] == fila_config.llm.vocab_size);
    let plain_lora = LoadedConfig::load(&tiny(2), &overrides.iter().filter(|s| *s != "lora.base_bits=4").cloned().collect::<Vec<_>>()).unwrap();
    let (lora_model, _, lora_set) = fila_train::trainer::build_model::<A>(&plain_lora, &device).unwrap();
    assert_eq!(fila_model::weights::parameter_paths(&model), fila_model::weights::parameter_paths(&lora_model));
    let trainable = |s: &fila_train::trainable::TrainableSet| s.params.keys().cloned().collect::<Vec<_>>();
    assert_eq!(trainable(&set), trainable(&lora_set));

    // Stopped after 2 steps and resumed: the same losses and the same final model, bit for bit.
    let split = tmp.path().join("split");
    ok(&fila_train(&tiny(2), &split, &refs(&sets), &["--stop-after", "2"]));
    ok(&fila_train(&tiny(2), &split, &refs(&sets), &["--resume"]));
    assert_eq!(trained, losses(&split));
    let merged = tensors(&straight.join("final/model.safetensors"));
    assert_eq!(merged, tensors(&split.join("final/model.safetensors")));

    // final/: the usual names; each projection the de-quantised base plus s·B·A (computed here on
    // the host from the stage-1 weights and the exported adapters), the rest as loaded.
    let base = tensors(&init.join("model.safetensors"));
    assert_eq!(merged.keys().collect::<Vec<_>>(), base.keys().collect::<Vec<_>>());
    assert_eq!(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"]);
    assert_eq!(merged["model.layers.0.input_layernorm.weight"], base["model.layers.0.input_layernorm.weight"]);
    let adapters = tensors(&straight.join("final/adapter.safetensors"));
    let scale = 16.0 / 8.0;
    for (group, proj) in [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")] {
        let name = format!("model.layers.1.{group}.{proj}.weight");
        let (shape, values) = &base[&name];
        let (out, inp) = (shape[0], shape[1]);
        let rounded = Nf4Weight::quantize(values, shape).dequantize();
        let (a_shape, a) = &adapters[&format!("base_model.model.model.layers.1.{group}.{proj}.lora_A.weight")];
        let (_, b) = &adapters[&format!("base_model.model.model.layers.1.{group}.{proj}.lora_B.weight")];
        let r = a_shape[0];
        let want: Vec<f32> = (0..out * inp)
            .map(|k| {
                let (o, i) = (k / inp, k % inp);
                rounded[k] + scale * (0..r).map(|j| b[o * r + j] * a[j * inp + i]).sum::<f32>()
            })
            .collect();
        let worst = max_abs_diff(&want, &merged[&name].1);
        assert!(worst <= 1e-5, "{name}: merged weight off by {worst}");
        assert!(max_abs_diff(&rounded, values) > 0.0, "{name}: NF4 rounds the base");
    }

    // The merged LLM computes what the QLoRA model of the last step computes (f32, 1e-5).
    let config = FilaConfig::from_checkpoint_dir(&straight.join("final")).unwrap();
    let exported = Fila::<Flex>::load(&config, &ModelSource::Checkpoint(straight.join("final")), &device).unwrap();
    let adapted = fila_train::checkpoint::load_trainable(model, &set, &straight.join("step-4")).unwrap().valid();
    let (want, got) = (llm_logits(&adapted, &device), llm_logits(&exported, &device));
    let worst = max_abs_diff(&want, &got);
    assert!(worst <= 1e-5, "merged logits off by {worst}");
    // The export merges one weight at a time (Fila::merged_sources): the values of the model
    // merged as a whole.
    let whole = fila_train::checkpoint::all_tensors(&fila_train::lora::merged(&adapted));
    let exported_values: std::collections::BTreeMap<String, Vec<f32>> = merged.iter().map(|(k, (_, v))| (k.clone(), v.clone())).collect();
    assert_eq!(whole, exported_values);

    // A step checkpoint merged by hand is the run's final/ (step 4 is the last step).
    let by_hand = fila_train::lora::merge_step_checkpoint(&straight.join("step-4"), &tmp.path().join("merged")).unwrap();
    assert_eq!(tensors(&by_hand.join("model.safetensors")), merged);
}

#[test]
fn two_ranks_with_qlora_train_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    assert_two_ranks_train_adapters_like_one(tmp.path(), &qlora_sets(&stage1_export(tmp.path())));
}

#[test]
fn qlora_settings_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let err = failed(&fila_train(&tiny(2), &out, &["lora.base_bits=4", "train.activation_checkpointing=true"], &["--check"]));
    assert!(err.contains("`lora.base_bits = 4`") && err.contains("set `lora.r`"), "{err}");
    let err = failed(&fila_train(&tiny(2), &out, &["lora.r=8", "lora.base_bits=4", "train.activation_checkpointing=false"], &["--check"]));
    assert!(err.contains("`lora.base_bits = 4`") && err.contains("`train.activation_checkpointing = true`"), "{err}");
    let err = failed(&fila_train(&tiny(2), &out, &["lora.r=8", "lora.base_bits=8"], &["--check"]));
    assert!(err.contains("`lora.base_bits` = 8"), "{err}");
    // A part of the language model trained in full must not be an NF4 projection.
    let mut sets = qlora_sets(&stage1_export(tmp.path()));
    sets.push(r#"trainable.modules=["projector", "llm.model.layers.0.mlp.up_proj"]"#.into());
    let err = failed(&fila_train(&tiny(2), &out, &refs(&sets), &[]));
    assert!(err.contains("trains `llm.model.layers.0.mlp.up_proj.weight`") && err.contains("NF4"), "{err}");
}

/// The plan of the QLoRA recipe fits one 24 GB card (at most 22 GiB), with the language model's
/// projections counted at NF4 size.
#[test]
fn the_qlora_recipe_plans_within_22_gib() {
    let loaded = LoadedConfig::load(&repo().join("configs/stage2-qlora.toml"), &[]).unwrap();
    assert!(loaded.config.lora.quantized());
    let plan = fila_train::plan::plan_of(&loaded, 1).unwrap();
    let gib = plan.total() / (1u64 << 30) as f64;
    assert!(gib <= 22.0, "stage 2 with QLoRA plans {gib:.2} GiB on one device\n{}", plan.render());
    let text = plan.render();
    // Llama-3-8B's 32 layers × 218,103,808 projection weights at ≈ 4.127 bits (codes,
    // double-quantised block scales), as stored on the host.
    let sizes = [4096 * 4096, 4096 * 1024, 4096 * 1024, 4096 * 4096, 4096 * 14336, 4096 * 14336, 14336 * 4096];
    let projections: usize = 32 * sizes.iter().sum::<usize>();
    assert_eq!(projections, 32 * 218_103_808);
    assert!(text.contains(&format!("the LLM's {projections} projection weights")), "{text}");
    let nf4 = plan.resident.iter().find(|t| t.name == "NF4 weights").unwrap().bytes;
    // Per weight: the codes, an 8-bit code per block of 64, an f32 maximum per 256 blocks, the mean.
    let stored: usize = sizes.iter().map(|&n| n / 2 + n / 64 + 4 * (n / 64).div_ceil(256) + 4).sum();
    assert_eq!(nf4 as usize, 32 * stored);
    assert!((8.0 * nf4 / projections as f64 - 4.127).abs() < 1e-3, "{} bits per value", 8.0 * nf4 / projections as f64);
    assert!(plan.phase.1.iter().any(|t| t.name == "de-quantised weights" && t.bytes > 0.0), "{text}");
    // The same run with the base in bf16 plans more by the difference of the two storages.
    let lora = LoadedConfig::load(&repo().join("configs/stage2-qlora.toml"), &["lora.base_bits=16".into()]).unwrap();
    let full = fila_train::plan::plan_of(&lora, 1).unwrap();
    let weights = |p: &fila_train::plan::Plan| p.resident.iter().map(|t| t.bytes).sum::<f64>();
    assert!((weights(&full) - weights(&plan) - (2.0 * projections as f64 - nf4)).abs() < 1.0);
}
