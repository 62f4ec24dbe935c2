//! The `[model]` section of a run config: where each component comes from.
//!
//! ```toml
//! [model]
//! vision = "models/clip-vit-large-patch14-336"   # a Hugging Face folder ...
//! convnext = "models/CLIP-convnext_large_d_320"   # OpenCLIP (timm names) or facebook/convnext-*
//! convnext_layout = "auto"                         # or "hf" / "timm": see `ConvNextLayout`
//! llm = "models/Meta-Llama-3-8B-Instruct"
//! projector = "mlp2x_gelu"
//! image_token_id = 128002
//!
//! [model.hybrid]
//! fusion_layers = [2, 6, 12, 20]
//! ```
//! A component may instead be an inline table of sizes (tiny models, random weights), and
//! `checkpoint = "DIR"` loads a whole FILA checkpoint (its `config.json` defines the architecture).

use crate::clip_vit::ClipVisionConfig;
use crate::convnext::ConvNextConfig;
use crate::fila::{ConvNextLayout, FilaConfig, ModelSource};
use crate::hybrid_encoder::HybridConfig;
use crate::llama::LlamaConfig;
use crate::projector::ProjectorKind;
use crate::ModelError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A component: a Hugging Face folder, or an inline config (fresh random weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Component<C> {
    Pretrained(PathBuf),
    Inline(C),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A FILA checkpoint folder; when set, the component keys must be absent.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    #[serde(default)]
    pub vision: Option<Component<serde_json::Value>>,
    #[serde(default)]
    pub convnext: Option<Component<serde_json::Value>>,
    #[serde(default)]
    pub convnext_layout: Option<ConvNextLayout>,
    #[serde(default)]
    pub llm: Option<Component<serde_json::Value>>,
    /// Absent: `HybridConfig::default()`.
    #[serde(default)]
    pub hybrid: Option<HybridConfig>,
    /// Absent: `mlp2x_gelu`.
    #[serde(default)]
    pub projector: Option<ProjectorKind>,
    #[serde(default)]
    pub image_token_id: Option<u32>,
}

fn spec_error(message: String) -> ModelError {
    ModelError::Config { path: PathBuf::from("[model]"), message }
}

/// Parses an inline component table, rejecting keys the config type does not have.
fn inline<C: Serialize + for<'de> Deserialize<'de>>(key: &str, value: &serde_json::Value, sample: &C) -> Result<C, ModelError> {
    let known = serde_json::to_value(sample).expect("config serialises");
    if let (Some(given), Some(known)) = (value.as_object(), known.as_object()) {
        if let Some(unknown) = given.keys().find(|k| !known.contains_key(*k)) {
            let mut names: Vec<&String> = known.keys().collect();
            names.sort();
            return Err(spec_error(format!("unknown key `model.{key}.{unknown}`; known keys: {names:?}")));
        }
    }
    serde_json::from_value(value.clone()).map_err(|e| spec_error(format!("`model.{key}`: {e}")))
}

impl ModelSpec {
    /// The fusion settings: `model.hybrid`, or the defaults.
    pub fn hybrid_config(&self) -> HybridConfig {
        self.hybrid.clone().unwrap_or_default()
    }

    /// The projector: `model.projector`, or `mlp2x_gelu`.
    pub fn projector_kind(&self) -> ProjectorKind {
        self.projector.unwrap_or(ProjectorKind::Mlp { depth: 2 })
    }

    /// The architecture and where its weights come from. Relative paths are taken from `base`
    /// (the folder of the config file).
    pub fn resolve(&self, base: &Path) -> Result<(FilaConfig, ModelSource), ModelError> {
        let abs = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        if let Some(dir) = &self.checkpoint {
            let given = [
                ("vision", self.vision.is_some()),
                ("convnext", self.convnext.is_some()),
                ("convnext_layout", self.convnext_layout.is_some()),
                ("llm", self.llm.is_some()),
                ("hybrid", self.hybrid.is_some()),
                ("projector", self.projector.is_some()),
                ("image_token_id", self.image_token_id.is_some()),
            ];
            let given: Vec<String> = given.iter().filter(|(_, set)| *set).map(|(k, _)| format!("`model.{k}`")).collect();
            if !given.is_empty() {
                return Err(spec_error(format!(
                    "`model.checkpoint` defines the whole model (its config.json): remove {}. To train without the \
                     ConvNeXt branch, set `model.hybrid.use_convnext = false` in the run that makes the checkpoint",
                    given.join(", ")
                )));
            }
            let dir = abs(dir);
            let config = FilaConfig::from_checkpoint_dir(&dir)?;
            return Ok((config, ModelSource::Checkpoint(dir)));
        }
        let missing = |k: &str| spec_error(format!("`model.{k}` is required (a Hugging Face folder or an inline table) unless `model.checkpoint` is set"));
        let (vision, vision_dir) = match self.vision.as_ref().ok_or_else(|| missing("vision"))? {
            Component::Pretrained(p) => (ClipVisionConfig::from_hf_file(&abs(p))?, Some(abs(p))),
            Component::Inline(v) => (inline("vision", v, &ClipVisionConfig::default())?, None),
        };
        // A pretrained folder settles `auto` to the layout its files use.
        let mut convnext_layout = self.convnext_layout.unwrap_or_default();
        let (convnext, convnext_dir) = match self.convnext.as_ref().ok_or_else(|| missing("convnext"))? {
            Component::Pretrained(p) => {
                let (config, layout) = ConvNextConfig::from_pretrained(&abs(p), self.convnext_layout.unwrap_or_default())?;
                convnext_layout = layout;
                (config, Some(abs(p)))
            }
            Component::Inline(v) => (inline("convnext", v, &ConvNextConfig::default())?, None),
        };
        let (llm, llm_dir) = match self.llm.as_ref().ok_or_else(|| missing("llm"))? {
            Component::Pretrained(p) => (LlamaConfig::from_hf_file(&abs(p))?, Some(abs(p))),
            Component::Inline(v) => (inline("llm", v, &LlamaConfig::llama3_8b())?, None),
        };
        let image_token_id = self
            .image_token_id
            .ok_or_else(|| spec_error("`model.image_token_id` is required: the id of the `<image>` placeholder token in the tokenizer".into()))?;
        let config = FilaConfig { vision, convnext, hybrid: self.hybrid_config(), projector: self.projector_kind(), llm, image_token_id };
        config.validate().map_err(spec_error)?;
        let source = ModelSource::Components { vision: vision_dir, convnext: convnext_dir, convnext_layout, llm: llm_dir };
        Ok((config, source))
    }
}
