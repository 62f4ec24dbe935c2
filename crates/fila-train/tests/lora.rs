//! LoRA runs through the real binary on the tiny configs: what trains, what the step checkpoints
//! hold, exact resume (dropout included), two ranks against one process, and a `final/` whose
//! merged language model computes what the adapter model computed.

mod common;

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use common::*;
use fila_model::fila::{Fila, FilaConfig, ModelSource};
use fila_train::config::LoadedConfig;
use std::path::Path;

type A = Autodiff<Flex>;

/// Stage 2 from a one-step stage 1, LoRA rank 8 with dropout, 4 steps of 2 micro-batches.
fn lora_sets(init: &Path) -> Vec<String> {
    ["train.max_steps=4", "schedule.warmup_steps=0", "checkpoint.every_steps=2", "checkpoint.keep_last=0", "lora.r=8", "lora.dropout=0.1", "lora.lr=1e-3"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("model.checkpoint={}", init.display())])
        .collect()
}

#[test]
fn a_lora_stage_2_trains_adapters_resumes_exactly_and_exports_the_merged_model() {
    let tmp = tempfile::tempdir().unwrap();
    let init = stage1_export(tmp.path());
    let sets = lora_sets(&init);
    let straight = tmp.path().join("straight");
    let text = ok(&fila_train(&tiny(2), &straight, &refs(&sets), &[]));
    assert_eq!(losses(&straight).len(), 4, "{text}");

    // The step checkpoint: the adapters and the vision side; of the language model nothing else.
    let saved = tensors(&straight.join("step-2/trainable.safetensors"));
    let llm: Vec<&String> = saved.keys().filter(|k| k.starts_with("llm.")).collect();
    assert!(!llm.is_empty() && llm.iter().all(|k| k.ends_with(".lora_a") || k.ends_with(".lora_b")), "{llm:?}");
    // Every layer's seven projections, A and B.
    let layers = FilaConfig::from_checkpoint_dir(&init).unwrap().llm.num_hidden_layers;
    assert_eq!(llm.len(), layers * 7 * 2);
    assert!(saved.keys().any(|k| k.starts_with("projector.")) && saved.keys().any(|k| k.starts_with("encoder.vit.")));
    let (_, b) = &saved["llm.model.layers.0.self_attn.q_lora.lora_b"];
    assert!(b.iter().any(|&v| v != 0.0), "lora_b trained away from zero");

    // Stopped after 2 steps and resumed: the same losses and the same final model, bit for bit
    // (the dropout masks are drawn from a generator seeded per step).
    let split = tmp.path().join("split");
    ok(&fila_train(&tiny(2), &split, &refs(&sets), &["--stop-after", "2"]));
    ok(&fila_train(&tiny(2), &split, &refs(&sets), &["--resume"]));
    assert_eq!(losses(&straight), losses(&split));
    assert_eq!(tensors(&straight.join("final/model.safetensors")), tensors(&split.join("final/model.safetensors")));

    // final/: the merged model under the names of a full run (those of the stage-1 export), the
    // adapters beside it under PEFT's names.
    let merged = tensors(&straight.join("final/model.safetensors"));
    let base = tensors(&init.join("model.safetensors"));
    assert_eq!(merged.keys().collect::<Vec<_>>(), base.keys().collect::<Vec<_>>());
    let adapters = tensors(&straight.join("final/adapter.safetensors"));
    assert_eq!(adapters.len(), layers * 7 * 2);
    let (shape, _) = &adapters["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"];
    assert_eq!(shape[0], 8);
    let adapter_config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(straight.join("final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((adapter_config["r"].as_u64(), adapter_config["lora_alpha"].as_f64()), (Some(8), Some(16.0)));
    // final/run.toml names final/ itself as its model (a next stage or `fila forward` reads it).
    let again = LoadedConfig::load(&straight.join("final/run.toml"), &[]).unwrap();
    let (_, source) = again.config.model.resolve(&straight.join("final")).unwrap();
    match source {
        ModelSource::Checkpoint(dir) => assert_eq!(dir.canonicalize().unwrap(), straight.join("final").canonicalize().unwrap()),
        other => panic!("final/run.toml names {other:?}"),
    }
    // The language model's frozen weights changed only by the merge: the embeddings not at all.
    assert_eq!(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"]);

    // `fila merge-lora` on the last step checkpoint writes the same model as final/.
    let by_hand = fila_train::lora::merge_step_checkpoint(&straight.join("step-4"), &tmp.path().join("merged-4")).unwrap();
    assert_eq!(tensors(&by_hand.join("model.safetensors")), merged);
    assert_eq!(tensors(&by_hand.join("adapter.safetensors")), adapters);
    let err = fila_train::lora::merge_step_checkpoint(&init, &tmp.path().join("nope")).unwrap_err().to_string();
    assert!(err.contains("not a step checkpoint"), "{err}");

    // The merged LLM computes what the adapter model of the last step computes (f32, 1e-5).
    let _lock = autodiff_lock();
    let device = Default::default();
    let config = FilaConfig::from_checkpoint_dir(&straight.join("final")).unwrap();
    let exported = Fila::<Flex>::load(&config, &ModelSource::Checkpoint(straight.join("final")), &device).unwrap();
    let overrides: Vec<String> = sets.iter().cloned().chain([format!("checkpoint.output_dir={}", straight.display())]).collect();
    let loaded = LoadedConfig::load(&tiny(2), &overrides).unwrap();
    let (model, _, set) = fila_train::trainer::build_model::<A>(&loaded, &device).unwrap();
    let adapted = fila_train::checkpoint::load_trainable(model, &set, &straight.join("step-4")).unwrap().valid();
    let (want, got) = (llm_logits(&adapted, &device), llm_logits(&exported, &device));
    let worst = max_abs_diff(&want, &got);
    assert!(worst <= 1e-5, "merged logits off by {worst}");
}

#[test]
fn two_ranks_with_lora_train_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let init = stage1_export(tmp.path());
    assert_two_ranks_train_adapters_like_one(tmp.path(), &lora_sets(&init));
}

#[test]
fn lora_settings_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let err = failed(&fila_train(&tiny(2), &out, &["lora.r=4", "lora.targets=[\"q_proj\", \"lm_head\"]"], &["--check"]));
    assert!(err.contains("`lora.targets`: unknown projection `lm_head`"), "{err}");
    let err = failed(&fila_train(&tiny(2), &out, &["lora.r=4", "lora.dropout=1.5"], &["--check"]));
    assert!(err.contains("`lora.dropout` = 1.5"), "{err}");
}

/// The plan of the LoRA recipe fits one 80 GB GPU.
#[test]
fn the_lora_recipe_plans_within_one_80_gb_gpu() {
    let loaded = LoadedConfig::load(&repo().join("configs/stage2-lora.toml"), &[]).unwrap();
    let plan = fila_train::plan::plan_of(&loaded, 1).unwrap();
    let gib = plan.total() / (1u64 << 30) as f64;
    assert!(gib <= 80e9 / (1u64 << 30) as f64, "stage 2 with LoRA plans {gib:.1} GiB on one GPU");
    let text = plan.render();
    // r 128 on all seven projections of Llama-3-8B's 32 layers: 128 · 81,920 · 32 elements.
    assert!(text.contains(&format!("{}", 128 * 81_920 * 32)), "{text}");
}

/// What trains in a LoRA run: the adapters, the rest as `trainable.modules` says, and of the
/// language model's own weights only those an entry names inside it (PEFT's `modules_to_save`).
#[test]
fn a_lora_run_trains_adapters_and_the_named_parts_of_the_language_model() {
    let _lock = autodiff_lock();
    let tmp = tempfile::tempdir().unwrap();
    let init = stage1_export(tmp.path());
    let set_of = |modules: &str| {
        let overrides = vec![format!("model.checkpoint={}", init.display()), "lora.r=4".into(), format!("trainable.modules={modules}")];
        let loaded = LoadedConfig::load(&tiny(2), &overrides).unwrap();
        fila_train::trainer::build_model::<A>(&loaded, &Default::default()).unwrap().2
    };
    let all = set_of(r#"["all"]"#);
    let llm: Vec<&String> = all.params.keys().filter(|k| k.starts_with("llm.")).collect();
    assert!(llm.iter().all(|k| k.ends_with(".lora_a") || k.ends_with(".lora_b")), "{llm:?}");
    assert!(all.params.keys().any(|k| k.starts_with("encoder.vit.")));
    let named = set_of(r#"["projector", "llm.lm_head", "llm.model.embed_tokens"]"#);
    let full: Vec<&String> = named.params.keys().filter(|k| k.starts_with("llm.") && !k.contains("lora_")).collect();
    assert_eq!(full, vec!["llm.lm_head.weight", "llm.model.embed_tokens.weight"]);
    assert!(!named.params.keys().any(|k| k.starts_with("encoder.")));
    assert_eq!(named.params.keys().filter(|k| k.contains("lora_")).count(), llm.len());

    // Trained in full, they go into adapter.safetensors too, named in adapter_config.json.
    let out = tmp.path().join("named");
    let sets = ["train.max_steps=1", "lora.r=4", r#"trainable.modules=["projector", "llm.lm_head"]"#];
    let init_set = format!("model.checkpoint={}", init.display());
    ok(&fila_train(&tiny(2), &out, &[sets[0], sets[1], sets[2], &init_set], &[]));
    let adapters = tensors(&out.join("final/adapter.safetensors"));
    assert!(adapters.contains_key("base_model.model.lm_head.weight"), "{:?}", adapters.keys().collect::<Vec<_>>());
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["modules_to_save"], serde_json::json!(["lm_head"]));
}
