//! Short key tables: how each checkpoint family names the parameters of our modules.
//!
//! Module field names already equal Hugging Face tensor names, so a table holds only the
//! exceptions: renames (ours → theirs, substring rules, `^` anchors at the start), the prefixes a
//! family is saved under, tensors of the file that are ignored on purpose, and parameters that a
//! file may lack.

use super::Checkpoint;
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Which tensor names a ConvNeXt checkpoint uses (`model.convnext_layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConvNextLayout {
    /// Decided from the folder: a Hugging Face `config.json` (`"model_type": "convnext"`) means
    /// `hf`; otherwise the tensor names (`stem.0.weight` → `timm`, `embeddings.patch_embeddings.weight`
    /// → `hf`, each also under its usual prefix).
    #[default]
    Auto,
    /// `ConvNextModel` / `ConvNextForImageClassification` (`facebook/convnext-*`).
    Hf,
    /// timm names (`stem.0`, `stages.{i}.blocks.{j}.conv_dw`), bare or inside a whole OpenCLIP
    /// model (`visual.trunk.*`, text tower and projection head ignored).
    #[serde(alias = "open_clip", alias = "openclip")]
    Timm,
}

#[derive(Debug, Clone)]
pub struct KeyMap {
    pub family: &'static str,
    /// Candidate prefixes in the file (`vision_model.`, `convnext.`, ``); the first under which
    /// the module's first parameter exists is used.
    pub prefixes: Vec<&'static str>,
    pub renames: Vec<(&'static str, &'static str)>,
    /// File keys (prefix patterns, matched from the start of the full key or of the key without
    /// the detected prefix) ignored on purpose.
    pub ignore: Vec<&'static str>,
    /// Our parameter paths that a file may lack; they keep their initial values.
    pub optional: Vec<&'static str>,
}

impl KeyMap {
    /// `CLIPVisionModel` (bare, transformers 5) or a whole `CLIPModel` / transformers-4
    /// `CLIPVisionModel` (`vision_model.*`). The text tower and projections are ignored.
    pub fn clip_vision() -> Self {
        Self {
            family: "CLIP vision (Hugging Face)",
            prefixes: vec!["vision_model.", ""],
            renames: vec![],
            ignore: vec![
                "text_model.",
                "logit_scale",
                "text_projection.",
                "visual_projection.",
                "vision_model.embeddings.position_ids",
                "embeddings.position_ids",
            ],
            optional: vec![],
        }
    }

    /// `ConvNextModel` or `ConvNextForImageClassification` (`convnext.*` plus `classifier.*`).
    pub fn convnext_hf() -> Self {
        Self {
            family: "ConvNeXt (Hugging Face)",
            prefixes: vec!["convnext.", ""],
            renames: vec![("downsampling_layer.norm.", "downsampling_layer.0."), ("downsampling_layer.conv.", "downsampling_layer.1.")],
            ignore: vec!["classifier."],
            optional: vec![],
        }
    }

    /// timm ConvNeXt names, bare (`stem.0.weight`, timm hub files) or inside a whole OpenCLIP
    /// model (`visual.trunk.stem.0.weight`, e.g. `laion/CLIP-convnext_large_d_320.*`, the tower
    /// of FILA and Mini-Gemini). The pooler norm is `head.norm`; headless trunks lack it.
    pub fn convnext_timm() -> Self {
        Self {
            family: "ConvNeXt (timm / OpenCLIP)",
            prefixes: vec!["visual.trunk.", "trunk.", ""],
            renames: vec![
                ("^embeddings.patch_embeddings.", "stem.0."),
                ("^embeddings.layernorm.", "stem.1."),
                ("^layernorm.", "head.norm."),
                ("^encoder.stages.", "stages."),
                ("downsampling_layer.norm.", "downsample.0."),
                ("downsampling_layer.conv.", "downsample.1."),
                (".layers.", ".blocks."),
                (".dwconv.", ".conv_dw."),
                (".layernorm.", ".norm."),
                (".pwconv1.", ".mlp.fc1."),
                (".pwconv2.", ".mlp.fc2."),
                (".layer_scale_parameter", ".gamma"),
            ],
            ignore: vec![
                // timm classifier and MLP pre-logits (in timm's copy they hold the CLIP projection).
                "head.fc.",
                "head.pre_logits.",
                // OpenCLIP: the image projection head beside the trunk ...
                "visual.head.",
                // ... and the text tower (`CLIP`: bare names; `CustomTextCLIP`: under `text.`).
                "text.",
                "transformer.",
                "token_embedding.",
                "positional_embedding",
                "ln_final.",
                "text_projection",
                "logit_scale",
                "logit_bias",
            ],
            optional: vec!["layernorm.weight", "layernorm.bias"],
        }
    }

    /// The layout of a ConvNeXt checkpoint: `layout` itself unless it is `Auto`, else read from
    /// the names of its stem tensors.
    pub fn convnext_layout_of(checkpoint: &Checkpoint, layout: ConvNextLayout) -> Result<ConvNextLayout, ModelError> {
        if layout != ConvNextLayout::Auto {
            return Ok(layout);
        }
        let has_stem = |map: &KeyMap| {
            let stem = map.file_key("embeddings.patch_embeddings.weight");
            map.prefixes.iter().any(|p| checkpoint.contains(&format!("{p}{stem}")))
        };
        if has_stem(&Self::convnext_timm()) {
            return Ok(ConvNextLayout::Timm);
        }
        if has_stem(&Self::convnext_hf()) {
            return Ok(ConvNextLayout::Hf);
        }
        let sample: Vec<&str> = checkpoint.keys().take(5).collect();
        Err(ModelError::Checkpoint {
            path: checkpoint.description().into(),
            message: format!(
                "not a ConvNeXt checkpoint that FILA knows: no `stem.0.weight` (timm / OpenCLIP, also under `visual.trunk.`) \
                 and no `embeddings.patch_embeddings.weight` (Hugging Face, also under `convnext.`); its first tensors are {sample:?}"
            ),
        })
    }

    /// `LlamaForCausalLM`. With tied embeddings a stray `lm_head.weight` is ignored, as
    /// transformers does; rotary buffers of old exports are ignored.
    pub fn llama(tied: bool) -> Self {
        let mut ignore = vec!["model.rotary_emb.inv_freq"];
        if tied {
            ignore.push("lm_head.weight");
        }
        Self { family: "Llama (Hugging Face)", prefixes: vec![""], renames: vec![], ignore, optional: vec![] }
    }

    /// Our own modules (CVFM, projector) under FILA checkpoint names.
    pub fn native(family: &'static str) -> Self {
        Self { family, prefixes: vec![""], renames: vec![], ignore: vec![], optional: vec![] }
    }

    /// The file key (without prefix) for one of our parameter paths.
    pub fn file_key(&self, ours: &str) -> String {
        let mut key = ours.to_string();
        for (from, to) in &self.renames {
            if let Some(anchored) = from.strip_prefix('^') {
                if let Some(rest) = key.strip_prefix(anchored) {
                    key = format!("{to}{rest}");
                }
            } else {
                // Match whole segments: pad with dots so `.layers.` also matches at the ends.
                let padded = format!(".{key}.").replace(from, to);
                key = padded[1..padded.len() - 1].to_string();
            }
        }
        key
    }

    pub fn is_optional(&self, ours: &str) -> bool {
        self.optional.contains(&ours)
    }

    pub fn is_ignored(&self, file_key: &str, prefix: &str) -> bool {
        let relative = file_key.strip_prefix(prefix).unwrap_or(file_key);
        self.ignore.iter().any(|p| file_key.starts_with(p) || relative.starts_with(p))
    }

    /// The first candidate prefix under which the module's first parameter exists.
    pub fn detect_prefix(&self, checkpoint: &Checkpoint, first_param: &str) -> String {
        let key = self.file_key(first_param);
        self.prefixes.iter().find(|p| checkpoint.contains(&format!("{p}{key}"))).unwrap_or(&self.prefixes[0]).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convnext_names_map_to_both_families() {
        let hf = KeyMap::convnext_hf();
        assert_eq!(hf.file_key("encoder.stages.1.downsampling_layer.norm.weight"), "encoder.stages.1.downsampling_layer.0.weight");
        assert_eq!(hf.file_key("encoder.stages.2.layers.0.pwconv1.weight"), "encoder.stages.2.layers.0.pwconv1.weight");
        let timm = KeyMap::convnext_timm();
        assert_eq!(timm.file_key("embeddings.patch_embeddings.weight"), "stem.0.weight");
        assert_eq!(timm.file_key("embeddings.layernorm.bias"), "stem.1.bias");
        assert_eq!(timm.file_key("encoder.stages.1.downsampling_layer.conv.weight"), "stages.1.downsample.1.weight");
        assert_eq!(timm.file_key("encoder.stages.2.layers.4.layernorm.weight"), "stages.2.blocks.4.norm.weight");
        assert_eq!(timm.file_key("encoder.stages.3.layers.0.layer_scale_parameter"), "stages.3.blocks.0.gamma");
        assert_eq!(timm.file_key("encoder.stages.0.layers.2.pwconv2.bias"), "stages.0.blocks.2.mlp.fc2.bias");
        assert_eq!(timm.file_key("layernorm.weight"), "head.norm.weight");
    }

    #[test]
    fn openclip_text_tower_and_heads_are_ignored_not_the_trunk() {
        let timm = KeyMap::convnext_timm();
        let p = "visual.trunk.";
        for key in [
            "visual.head.mlp.fc1.weight",
            "visual.head.mlp.fc2.weight",
            "transformer.resblocks.15.attn.in_proj_weight",
            "token_embedding.weight",
            "positional_embedding",
            "ln_final.bias",
            "text_projection",
            "logit_scale",
            "visual.trunk.head.fc.weight",
        ] {
            assert!(timm.is_ignored(key, p), "{key}");
        }
        for key in ["visual.trunk.head.norm.weight", "visual.trunk.stages.2.blocks.26.gamma", "visual.proj", "visual.trunk.norm_pre.weight"] {
            assert!(!timm.is_ignored(key, p), "{key}");
        }
        // timm's own hub copy: bare names, the CLIP projection as `head.pre_logits.fc` + `head.fc`.
        assert!(timm.is_ignored("head.pre_logits.fc.weight", "") && timm.is_ignored("head.fc.bias", ""));
    }

    #[test]
    fn clip_text_tower_is_ignored_not_the_vision_tower() {
        let clip = KeyMap::clip_vision();
        assert!(clip.is_ignored("text_model.encoder.layers.0.mlp.fc1.weight", "vision_model."));
        assert!(clip.is_ignored("logit_scale", "vision_model."));
        assert!(!clip.is_ignored("vision_model.encoder.layers.0.mlp.fc1.weight", "vision_model."));
    }
}
