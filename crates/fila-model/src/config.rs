//! Reading component configs from Hugging Face `config.json` files.

use crate::ModelError;
use serde::de::DeserializeOwned;
use std::path::Path;

/// Parses `path` (a `config.json`, or a folder holding one). When `nested` names a key that the
/// file has (`vision_config` in a whole `CLIPModel`), that sub-object is read instead. Unknown keys
/// are ignored: Hugging Face configs carry many that do not concern the architecture.
pub fn read_hf_config<T: DeserializeOwned>(path: &Path, nested: Option<&str>) -> Result<T, ModelError> {
    let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&file).map_err(|source| ModelError::Io { path: file.clone(), source })?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Config { path: file.clone(), message: format!("not valid JSON: {e}") })?;
    if let Some(key) = nested {
        if let Some(inner) = value.get(key) {
            value = inner.clone();
        }
    }
    serde_json::from_value(value)
        .map_err(|e| ModelError::Config { path: file.clone(), message: format!("{e} (is this the config of the right model family?)") })
}
