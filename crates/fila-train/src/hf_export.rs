//! Hugging Face remote code in `final/`, so that transformers loads a trained model:
//!
//! ```python
//! model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
//! processor = AutoProcessor.from_pretrained(final, trust_remote_code=True)
//! inputs = processor(images=image, text=question, return_tensors="pt")
//! answer = processor.decode(model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1]:])
//! ```
//!
//! The three Python files live in `scripts/hf/` (Python stays under scripts/) and are embedded here at build time.
//! Besides them the export writes `config.json` (the [`FilaConfig`] with `model_type`,
//! `architectures` and `auto_map` added; our loader skips those keys), `generation_config.json`
//! (the stop tokens `fila generate` stops at, greedy), `processor_config.json` (the run's `[data]`
//! settings that shape the model's input: image mode, geometry, normalisation, padding colours,
//! template, image marker, `max_len`) and `tokenizer_config.json` (`PreTrainedTokenizerFast` over
//! the folder's `tokenizer.json`, with its special tokens). See docs/hf.md.

use anyhow::{anyhow, Context, Result};
use fila_data::{DataConfig, Normalization, TemplateKind, TextEncoder};
use fila_model::fila::{FilaConfig, FILA_MODEL_TYPE};
use serde_json::{json, Value};
use std::path::Path;

/// `configuration_fila.py`: the `PretrainedConfig` of FILA.
pub const CONFIGURATION_PY: &str = include_str!("../../../scripts/hf/configuration_fila.py");
/// `modeling_fila.py`: FILA in PyTorch over transformers' CLIP, ConvNeXt and Llama classes.
pub const MODELING_PY: &str = include_str!("../../../scripts/hf/modeling_fila.py");
/// `processing_fila.py`: the processor (tiling, resizing, normalisation, template).
pub const PROCESSING_PY: &str = include_str!("../../../scripts/hf/processing_fila.py");

/// The Python files of the export, by file name.
pub const PYTHON_FILES: [(&str, &str); 3] =
    [("configuration_fila.py", CONFIGURATION_PY), ("modeling_fila.py", MODELING_PY), ("processing_fila.py", PROCESSING_PY)];

/// Class name of the model in `modeling_fila.py`.
pub const MODEL_CLASS: &str = "FilaForCausalLM";
/// File written with the processor settings.
pub const PROCESSOR_CONFIG_FILE: &str = "processor_config.json";

/// `auto_map` of `config.json`: which class of which file each transformers auto class loads.
pub fn auto_map() -> Value {
    json!({
        "AutoConfig": "configuration_fila.FilaConfig",
        "AutoModel": format!("modeling_fila.{MODEL_CLASS}"),
        "AutoModelForCausalLM": format!("modeling_fila.{MODEL_CLASS}"),
        "AutoProcessor": "processing_fila.FilaProcessor",
    })
}

/// `config.json`: the model config with the keys transformers reads added.
pub fn config_json(config: &FilaConfig) -> Result<Value> {
    let mut value = serde_json::to_value(config)?;
    let object = value.as_object_mut().ok_or_else(|| anyhow!("the model config is not a JSON object"))?;
    object.insert("model_type".into(), json!(FILA_MODEL_TYPE));
    object.insert("architectures".into(), json!([MODEL_CLASS]));
    object.insert("auto_map".into(), auto_map());
    object.insert("dtype".into(), json!("float32"));
    object.insert("tie_word_embeddings".into(), json!(config.llm.tie_word_embeddings));
    Ok(value)
}

/// The token ids `fila generate` stops at: `<|eot_id|>` (llama3) or the plain end token, and
/// `<|end_of_text|>` when the tokenizer has it.
pub fn stop_ids(text: &TextEncoder) -> Vec<i64> {
    let mut ids: Vec<i64> = [text.special.eot, text.special.plain_end].into_iter().flatten().collect();
    if let Some(id) = text.tokenizer.token_to_id("<|end_of_text|>").map(i64::from) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

fn token_name(text: &TextEncoder, id: i64) -> Result<String> {
    u32::try_from(id).ok().and_then(|i| text.tokenizer.id_to_token(i)).ok_or_else(|| anyhow!("the tokenizer has no token with id {id}"))
}

/// A float32 setting as the shortest decimal that reads back to it (0.4578275, not the
/// 0.45782750844955444 of its float64 widening).
fn f32_json(x: f32) -> Value {
    json!(x.to_string().parse::<f64>().expect("a float32 prints as a number"))
}

/// Mean and standard deviation per channel.
fn norm_json(norm: &Normalization) -> Value {
    json!({ "mean": norm.mean.map(f32_json), "std": norm.std.map(f32_json) })
}

/// `processor_config.json`: the `[data]` settings the processor follows, with the token ids
/// resolved from the tokenizer.
pub fn processor_json(data: &DataConfig, text: &TextEncoder) -> Result<Value> {
    let stop = stop_ids(text);
    let stop_tokens = stop.iter().map(|&id| token_name(text, id)).collect::<Result<Vec<_>>>()?;
    Ok(json!({
        "processor_class": "FilaProcessor",
        "auto_map": { "AutoProcessor": "processing_fila.FilaProcessor" },
        "image_mode": data.image_mode,
        "geometry": data.geometry,
        "vit_norm": norm_json(&data.vit_norm),
        "hires_norm": norm_json(&data.hires_norm),
        "square_pad_color": data.square_fill(),
        "canvas_pad_color": data.canvas_pad_color,
        "template": data.template,
        "system_prompt": data.system_prompt,
        "image_marker": data.image_marker,
        "image_token_id": text.special.image,
        "bos_token": data.bos_token,
        "plain_end_token": data.plain_end_token,
        "pad_token_id": data.pad_token_id,
        "max_len": data.max_len,
        "stop_tokens": stop_tokens,
        "stop_token_ids": stop,
    }))
}

/// `tokenizer_config.json`: `PreTrainedTokenizerFast` over `tokenizer.json`.
pub fn tokenizer_json(data: &DataConfig, text: &TextEncoder) -> Result<Value> {
    let eos = match data.template {
        TemplateKind::Llama3 => "<|eot_id|>".to_string(),
        TemplateKind::Plain => data.plain_end_token.clone(),
    };
    let mut value = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "processor_class": "FilaProcessor",
        "auto_map": { "AutoProcessor": "processing_fila.FilaProcessor" },
        "eos_token": eos,
        "pad_token": token_name(text, data.pad_token_id)?,
        "model_max_length": data.max_len,
        "clean_up_tokenization_spaces": false,
        "add_bos_token": false,
        "add_eos_token": false,
    });
    if !data.bos_token.is_empty() {
        value["bos_token"] = json!(data.bos_token);
    }
    Ok(value)
}

/// `generation_config.json`: greedy decoding that stops where `fila generate` stops.
pub fn generation_json(data: &DataConfig, text: &TextEncoder) -> Value {
    let mut value = json!({
        "eos_token_id": stop_ids(text),
        "pad_token_id": data.pad_token_id,
        "do_sample": false,
    });
    if let Some(bos) = text.special.bos {
        value["bos_token_id"] = json!(bos);
    }
    value
}

/// The `[data]` table of a run config (the `run.toml` text the export writes).
pub fn data_config_of(run_config: &str) -> Result<DataConfig> {
    DataConfig::from_toml_str(run_config, Path::new("run.toml")).map_err(|e| anyhow!("{e}"))
}

/// Writes the Hugging Face files into `dir`, which already holds `model.safetensors` and
/// `tokenizer.json`; `config.json` is replaced by [`config_json`].
pub fn write_hf_files(dir: &Path, config: &FilaConfig, data: &DataConfig) -> Result<()> {
    let mut data = data.clone();
    data.tokenizer = dir.join("tokenizer.json");
    let text = TextEncoder::from_config(&data).map_err(|e| anyhow!("{e}"))?;
    let write_json = |name: &str, value: &Value| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n").with_context(|| format!("writing {}", path.display()))
    };
    for (name, source) in PYTHON_FILES {
        std::fs::write(dir.join(name), source).with_context(|| format!("writing {}", dir.join(name).display()))?;
    }
    write_json("config.json", &config_json(config)?)?;
    write_json("generation_config.json", &generation_json(&data, &text))?;
    write_json(PROCESSOR_CONFIG_FILE, &processor_json(&data, &text)?)?;
    write_json("tokenizer_config.json", &tokenizer_json(&data, &text)?)?;
    Ok(())
}
