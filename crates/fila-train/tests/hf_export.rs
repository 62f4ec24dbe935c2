//! The `final/` export writes the Hugging Face files (remote code, config, processor and
//! tokenizer settings) with the right content, and the folder still loads with our loader.

mod common;

use burn::backend::Flex;
use common::*;
use fila_model::fila::{Fila, FilaConfig, ModelSource, HF_CONFIG_KEYS};
use fila_train::checkpoint::export_final;
use fila_train::hf_export::{self, PYTHON_FILES};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A small model for the fixture tokenizer (650 ids, `<image>` = 649) and the tiny configs' 28-pixel tiles.
fn tiny_config() -> FilaConfig {
    serde_json::from_value(json!({
        "vision": { "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 5, "num_attention_heads": 2, "num_channels": 3,
                    "image_size": 28, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5 },
        "convnext": { "num_channels": 3, "patch_size": 4, "hidden_sizes": [8, 8, 16, 16], "depths": [1, 1, 1, 1], "hidden_act": "gelu",
                      "layer_norm_eps": 1e-12, "layer_scale_init_value": 1e-6 },
        "hybrid": { "fusion_layers": [1, 2, 3, 4], "select_layer": -2, "alignment": "conv", "use_convnext": true },
        "projector": "mlp2x_gelu",
        "llm": { "vocab_size": 650, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                 "rope_scaling": null, "tie_word_embeddings": false },
        "image_token_id": 649
    }))
    .unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Exports a random tiny model with the `[data]` table of `configs/tiny/stage2.toml`.
fn export(dir: &Path) -> (PathBuf, FilaConfig, String, Fila<Flex>) {
    let config = tiny_config();
    let model = config.init::<Flex>(&Default::default());
    let run_config = std::fs::read_to_string(tiny(2)).unwrap();
    let tokenizer = repo().join("crates/fila-data/tests/fixtures/tokenizer.json");
    let dest = export_final(dir, &model, &config, &tokenizer, &run_config).unwrap();
    (dest, config, run_config, model)
}

#[test]
fn final_holds_the_hugging_face_files_and_still_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (dest, config, run_config, model) = export(tmp.path());

    for name in ["model.safetensors", "config.json", "tokenizer.json", "run.toml", "generation_config.json", "processor_config.json", "tokenizer_config.json"] {
        assert!(dest.join(name).is_file(), "final/ lacks {name}");
    }
    // The Python files are the repository's, byte for byte.
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/hf");
    for (name, embedded) in PYTHON_FILES {
        let written = std::fs::read_to_string(dest.join(name)).unwrap();
        let in_repo = std::fs::read_to_string(sources.join(name)).unwrap();
        assert_eq!(written, in_repo, "{name} differs from scripts/hf/{name}");
        assert_eq!(written, embedded);
    }

    // config.json: ours plus what transformers reads; every auto_map entry names a class of a written file.
    let value = read_json(&dest.join("config.json"));
    assert_eq!(value["model_type"], "fila");
    assert_eq!(value["architectures"], json!(["FilaForCausalLM"]));
    let auto_map = value["auto_map"].as_object().unwrap();
    for auto in ["AutoConfig", "AutoModelForCausalLM", "AutoProcessor"] {
        let target = auto_map[auto].as_str().unwrap_or_else(|| panic!("auto_map lacks {auto}"));
        let (module, class) = target.split_once('.').unwrap();
        let source = std::fs::read_to_string(dest.join(format!("{module}.py"))).unwrap();
        assert!(source.contains(&format!("class {class}(")) || source.contains(&format!("class {class}:")), "{module}.py has no class {class}");
    }
    assert!(read_json(&dest.join("processor_config.json"))["auto_map"]["AutoProcessor"] == auto_map["AutoProcessor"]);
    let mut ours = value.clone();
    for key in HF_CONFIG_KEYS {
        ours.as_object_mut().unwrap().remove(*key);
    }
    assert_eq!(ours, serde_json::to_value(&config).unwrap(), "config.json besides the Hugging Face keys is the FilaConfig");

    // Our loader reads the folder back: same config, same tensors.
    assert_eq!(FilaConfig::from_checkpoint_dir(&dest).unwrap(), config);
    let loaded = Fila::<Flex>::load(&config, &ModelSource::Checkpoint(dest.clone()), &Default::default()).unwrap();
    let before = model.named_tensors();
    let after = loaded.named_tensors();
    assert_eq!(before.len(), after.len());
    for ((name, a), (other, b)) in before.into_iter().zip(after) {
        assert_eq!(name, other);
        assert!(a.convert::<f32>().to_vec::<f32>().unwrap() == b.convert::<f32>().to_vec::<f32>().unwrap(), "`{name}` differs after reload");
    }

    // processor_config.json: the run's [data] settings, token ids resolved from the tokenizer.
    let data = hf_export::data_config_of(&run_config).unwrap();
    let processor = read_json(&dest.join("processor_config.json"));
    assert_eq!(processor["image_mode"], "tiled");
    assert_eq!(processor["template"], "llama3");
    assert_eq!(processor["max_len"], 256);
    assert_eq!(processor["geometry"], serde_json::to_value(&data.geometry).unwrap());
    assert_eq!(processor["geometry"]["tile_size"], 28);
    assert_eq!(processor["geometry"]["canvases"], json!([[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]));
    for (key, norm) in [("vit_norm", &data.vit_norm), ("hires_norm", &data.hires_norm)] {
        let read = |field: &str| -> Vec<f32> { processor[key][field].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect() };
        assert_eq!(read("mean"), norm.mean.to_vec(), "{key}.mean");
        assert_eq!(read("std"), norm.std.to_vec(), "{key}.std");
    }
    assert_eq!(processor["square_pad_color"], json!(data.square_fill()));
    assert_eq!(processor["canvas_pad_color"], json!([0, 0, 0]));
    assert_eq!(processor["image_marker"], "<image>");
    assert_eq!(processor["image_token_id"], 649);
    assert_eq!(processor["bos_token"], "<|begin_of_text|>");
    assert_eq!(processor["stop_tokens"], json!(["<|eot_id|>", "<|end_of_text|>"]));

    // Tokenizer and generation settings.
    let tokenizer = read_json(&dest.join("tokenizer_config.json"));
    assert_eq!(tokenizer["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(tokenizer["bos_token"], "<|begin_of_text|>");
    assert_eq!(tokenizer["eos_token"], "<|eot_id|>");
    assert_eq!(tokenizer["model_max_length"], 256);
    let generation = read_json(&dest.join("generation_config.json"));
    assert_eq!(generation["eos_token_id"], processor["stop_token_ids"]);
    assert_eq!(generation["do_sample"], false);
}

#[test]
fn the_loader_skips_only_the_hugging_face_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let (dest, config, _, _) = export(tmp.path());
    let file = dest.join("config.json");
    let exported = read_json(&file);

    // What `save_pretrained` adds (transformers_version, dtype) loads too.
    let mut saved = exported.clone();
    saved["transformers_version"] = json!("5.0.0");
    saved["use_cache"] = json!(true);
    std::fs::write(&file, saved.to_string()).unwrap();
    assert_eq!(FilaConfig::from_checkpoint_dir(&dest).unwrap(), config);

    // A typo in our keys is still an error, and so is another model type.
    let mut typo = exported.clone();
    typo["hybird"] = json!({});
    std::fs::write(&file, typo.to_string()).unwrap();
    let message = FilaConfig::from_checkpoint_dir(&dest).unwrap_err().to_string();
    assert!(message.contains("hybird"), "{message}");
    let mut other = exported;
    other["model_type"] = json!("llava");
    std::fs::write(&file, other.to_string()).unwrap();
    let message = FilaConfig::from_checkpoint_dir(&dest).unwrap_err().to_string();
    assert!(message.contains("llava") && message.contains("fila"), "{message}");
}
