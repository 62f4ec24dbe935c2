//! FILA: hybrid encoder → projector → visual tokens spliced into the embedded text of a LLaMA-3.
//! The loss is the mean next-token cross-entropy over labels that are not −100.

use crate::clip_vit::ClipVisionConfig;
use crate::convnext::ConvNextConfig;
pub use crate::convnext::ConvNextLayout;
use crate::hybrid_encoder::{HybridConfig, HybridEncoder, ImageInput, Trace};
use crate::llama::{KvCache, LlamaConfig, LlamaForCausalLM};
use crate::projector::{Projector, ProjectorKind};
use crate::weights::{load_module, load_module_nf4, named_sources, named_tensors, Checkpoint, KeyMap, TensorSource};
use crate::ModelError;
use burn::module::Module;
use burn::prelude::*;
use burn::tensor::{activation, TensorData};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Labels equal to this are not scored.
pub const IGNORE_INDEX: i64 = -100;

/// The whole architecture; saved as `config.json` in FILA checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilaConfig {
    pub vision: ClipVisionConfig,
    pub convnext: ConvNextConfig,
    #[serde(default)]
    pub hybrid: HybridConfig,
    pub projector: ProjectorKind,
    pub llm: LlamaConfig,
    /// Token id of the `<image>` placeholder; each occurrence receives one visual token.
    pub image_token_id: u32,
}

/// `model_type` of a FILA `config.json` for Hugging Face transformers.
pub const FILA_MODEL_TYPE: &str = "fila";

/// Top-level `config.json` keys that belong to Hugging Face transformers (written by the export
/// of `final/` or by `save_pretrained`), not to [`FilaConfig`].
pub const HF_CONFIG_KEYS: &[&str] =
    &["model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype", "tie_word_embeddings", "use_cache"];

/// Where the weights of a FILA model come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A FILA checkpoint folder (`config.json` + `model.safetensors`).
    Checkpoint(PathBuf),
    /// Components from Hugging Face folders (`None`: random initialisation from the config);
    /// CVFM and projector start fresh.
    Components { vision: Option<PathBuf>, convnext: Option<PathBuf>, convnext_layout: ConvNextLayout, llm: Option<PathBuf> },
}

impl FilaConfig {
    /// Parameter count computed from the config alone.
    pub fn num_params(&self) -> ParamCounts {
        let d = self.vision.hidden_size;
        let cvfm = if self.hybrid.use_convnext {
            let strides = self.convnext.stage_strides();
            (0..4)
                .map(|k| {
                    let c = self.convnext.hidden_sizes[k];
                    let r = strides[3] / strides[k];
                    let align = match self.hybrid.alignment {
                        crate::cvfm::Alignment::Conv => c * c * r * r + c,
                        crate::cvfm::Alignment::Pool => 0,
                    };
                    align + 2 * d + 2 * c + ((d + c) * d + d) + (d * d + d)
                })
                .sum()
        } else {
            0
        };
        ParamCounts {
            vit: self.vision.num_params(),
            convnext: if self.hybrid.use_convnext { self.convnext.num_params() } else { 0 },
            cvfm,
            projector: self.projector.num_params(d, self.llm.hidden_size),
            llm: self.llm.num_params(),
        }
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Fila<B> {
        Fila {
            encoder: self.hybrid.init(&self.vision, &self.convnext, device),
            projector: self.projector.init(self.vision.hidden_size, self.llm.hidden_size, device),
            llm: self.llm.init(device),
            image_token_id: self.image_token_id,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.hybrid.validate(&self.vision, &self.convnext)?;
        if self.image_token_id as usize >= self.llm.vocab_size {
            return Err(format!("image_token_id {} is outside the vocabulary ({})", self.image_token_id, self.llm.vocab_size));
        }
        Ok(())
    }

    /// Reads `config.json` of a FILA checkpoint folder. The keys Hugging Face transformers reads
    /// beside ours ([`HF_CONFIG_KEYS`]: `model_type`, `auto_map`, ...) are skipped; a `model_type`
    /// other than `fila` is an error.
    pub fn from_checkpoint_dir(dir: &Path) -> Result<Self, ModelError> {
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|source| ModelError::Io { path: file.clone(), source })?;
        let error = |message: String| ModelError::Config { path: file.clone(), message };
        let mut value: serde_json::Value = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
        if let Some(object) = value.as_object_mut() {
            if let Some(kind) = object.get("model_type") {
                if kind.as_str() != Some(FILA_MODEL_TYPE) {
                    return Err(error(format!("`model_type` is {kind}, not \"{FILA_MODEL_TYPE}\": not a FILA checkpoint")));
                }
            }
            for key in HF_CONFIG_KEYS {
                object.remove(*key);
            }
        }
        serde_json::from_value(value).map_err(|e| error(e.to_string()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    pub vit: usize,
    pub convnext: usize,
    pub cvfm: usize,
    pub projector: usize,
    pub llm: usize,
}

impl ParamCounts {
    pub fn total(&self) -> usize {
        self.vit + self.convnext + self.cvfm + self.projector + self.llm
    }
}

#[derive(Module, Debug)]
pub struct Fila<B: Backend> {
    pub encoder: HybridEncoder<B>,
    pub projector: Projector<B>,
    pub llm: LlamaForCausalLM<B>,
    pub image_token_id: u32,
}

/// One batch as the model takes it: right-padded token ids with `<image>` placeholders, and the
/// images in the order their placeholders appear (row by row).
pub struct FilaInput<B: Backend> {
    /// `[B, T]`.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[B, T]`, 1 for tokens and 0 for padding.
    pub attention_mask: Tensor<B, 2>,
    /// `[B, T]` aligned with `input_ids` (the shift happens inside the loss), −100 = not scored.
    pub labels: Option<Tensor<B, 2, Int>>,
    pub images: Vec<ImageInput<B>>,
}

pub struct FilaOutput<B: Backend> {
    pub logits: Tensor<B, 3>,
    pub loss: Option<Tensor<B, 1>>,
    /// Number of scored label positions (the loss denominator).
    pub scored_tokens: usize,
}

/// FILA checkpoint names: Hugging Face names for the towers and the LLM, our names for the rest.
pub fn fila_key_map() -> KeyMap {
    KeyMap {
        family: "FILA checkpoint",
        prefixes: vec![""],
        renames: vec![
            ("^encoder.vit.", "vision_model."),
            ("^encoder.convnext.", "convnext."),
            ("^encoder.cvfm.", "cvfm."),
            ("^llm.", ""),
            ("downsampling_layer.norm.", "downsampling_layer.0."),
            ("downsampling_layer.conv.", "downsampling_layer.1."),
        ],
        ignore: vec![],
        optional: vec![],
    }
}

impl<B: Backend> Fila<B> {
    /// Builds the model and loads its weights.
    pub fn load(config: &FilaConfig, source: &ModelSource, device: &B::Device) -> Result<Self, ModelError> {
        Self::load_with(config, source, device, false)
    }

    /// [`Fila::load`] for QLoRA: the seven projections of every decoder layer of the language
    /// model (not its embeddings, norms or output projection) stored as NF4
    /// ([`crate::nf4`]), quantised from the checkpoint's values one weight at a time on the host,
    /// so their f32 values never sit on the device together. Their `Linear` weights are empty
    /// placeholders and the products de-quantise the NF4 weight ([`crate::lora::project`]). The
    /// parameters are initialised lazily, so building the model before loading allocates only
    /// the norms. Fails when the language model has no checkpoint to quantise.
    pub fn load_quantized(config: &FilaConfig, source: &ModelSource, device: &B::Device) -> Result<Self, ModelError> {
        if let ModelSource::Components { llm: None, .. } = source {
            return Err(ModelError::Config {
                path: PathBuf::from("<model config>"),
                message: "NF4 storage quantises the language model's checkpoint; this model's language model has none (random initialisation)".into(),
            });
        }
        Self::load_with(config, source, device, true)
    }

    fn load_with(config: &FilaConfig, source: &ModelSource, device: &B::Device, nf4: bool) -> Result<Self, ModelError> {
        config.validate().map_err(|message| ModelError::Config { path: PathBuf::from("<model config>"), message })?;
        let mut model = config.init::<B>(device);
        // Projection weights of the language model's decoder layers, by path below `llm`.
        let projection = |path: &str| nf4 && crate::lora::projection_weight(path).is_some();
        match source {
            ModelSource::Checkpoint(dir) => {
                let checkpoint = Checkpoint::open(dir)?;
                let select = |path: &str| path.strip_prefix("llm.").is_some_and(projection);
                let (loaded, quantized) = load_module_nf4(model, &checkpoint, &fila_key_map(), &select)?;
                model = loaded;
                for (path, weight) in quantized {
                    crate::lora::install_nf4(&mut model.llm, &path["llm.".len()..], weight);
                }
            }
            ModelSource::Components { vision, convnext, convnext_layout, llm } => {
                if let Some(dir) = vision {
                    model.encoder.vit = load_module(model.encoder.vit, &Checkpoint::open(dir)?, &KeyMap::clip_vision())?;
                }
                // With the ConvNeXt branch off there is no tower to load.
                if let Some(dir) = convnext {
                    if let Some(tower) = model.encoder.convnext.take() {
                        let checkpoint = Checkpoint::open(dir)?;
                        let map = match KeyMap::convnext_layout_of(&checkpoint, *convnext_layout)? {
                            ConvNextLayout::Timm => KeyMap::convnext_timm(),
                            _ => KeyMap::convnext_hf(),
                        };
                        model.encoder.convnext = Some(load_module(tower, &checkpoint, &map)?);
                    }
                }
                if let Some(dir) = llm {
                    let map = KeyMap::llama(config.llm.tie_word_embeddings);
                    let (loaded, quantized) = load_module_nf4(model.llm, &Checkpoint::open(dir)?, &map, &projection)?;
                    model.llm = loaded;
                    for (path, weight) in quantized {
                        crate::lora::install_nf4(&mut model.llm, &path, weight);
                    }
                }
            }
        }
        Ok(model)
    }

    /// All parameters under FILA checkpoint names, in PyTorch layout.
    pub fn named_tensors(&self) -> Vec<(String, TensorData)> {
        named_tensors::<B, _>(self, &fila_key_map(), "")
    }

    /// [`Fila::named_tensors`] of the parameters whose Burn path `keep` accepts, as sources read
    /// one at a time while a file is written ([`crate::weights::write_safetensors_from`]).
    pub fn named_sources(&self, keep: &dyn Fn(&str) -> bool) -> Vec<TensorSource<'static>> {
        named_sources::<B, _>(self, &fila_key_map(), "", keep)
    }

    /// The model as a model folder holds it, as sources for
    /// [`crate::weights::write_safetensors_from`]: [`Fila::named_tensors`]' names, without the LoRA
    /// adapters, and with every adapted or NF4 projection of the language model read as its merged
    /// weight ([`crate::lora::merge`]: the de-quantised base plus the adapter), computed when the
    /// writer reaches it. The values equal those of the merged model's [`Fila::named_sources`],
    /// but at most one merged weight exists at a time besides the model itself. A model without
    /// adapters or NF4 weights reads as [`Fila::named_sources`] of all its parameters.
    pub fn merged_sources(&self) -> Vec<TensorSource<'static>> {
        let map = fila_key_map();
        let mut merged: std::collections::HashMap<String, ([usize; 2], crate::lora::MergedWeight<B>)> =
            crate::lora::merged_weights(&self.llm).into_iter().map(|(path, shape, weight)| (map.file_key(&format!("llm.{path}")), (shape, weight))).collect();
        let sources = self
            .named_sources(&|path| !crate::lora::is_adapter_param(path))
            .into_iter()
            .map(|source| match merged.remove(&source.name) {
                Some(([d_in, d_out], weight)) => TensorSource::new(source.name, vec![d_out, d_in], move || weight().transpose().into_data()),
                None => source,
            })
            .collect();
        assert!(merged.is_empty(), "merged weights without a parameter: {:?}", merged.keys().collect::<Vec<_>>());
        sources
    }

    /// Visual tokens for the images, `[Σ tokens, text_dim]`, and the projector input.
    pub fn encode_images(&self, images: &[ImageInput<B>], trace: Option<&mut Trace>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let features = self.encoder.forward(images, trace);
        (self.projector.forward(features.clone()), features)
    }

    /// Token embeddings with the visual tokens written over the `<image>` positions.
    pub fn splice(&self, input_ids: Tensor<B, 2, Int>, visual: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        let [b, t] = input_ids.dims();
        let ids: Vec<i64> = input_ids.to_data().convert::<i64>().to_vec().expect("integer ids");
        let embeds = self.llm.embed(input_ids);
        let placeholders: Vec<usize> = ids.iter().enumerate().filter(|(_, &id)| id == self.image_token_id as i64).map(|(i, _)| i).collect();
        let visual_count = visual.as_ref().map(|v| v.dims()[0]).unwrap_or(0);
        assert_eq!(
            placeholders.len(),
            visual_count,
            "{} <image> placeholder tokens in the batch but {visual_count} visual tokens from its images",
            placeholders.len()
        );
        let Some(visual) = visual else { return embeds };
        let d = embeds.dims()[2];
        // Gather rows from [text; visual]: placeholder i takes visual row k, others keep their own.
        let mut index: Vec<i64> = (0..(b * t) as i64).collect();
        for (k, &pos) in placeholders.iter().enumerate() {
            index[pos] = (b * t + k) as i64;
        }
        let device = embeds.device();
        let table = Tensor::cat(vec![embeds.reshape([b * t, d]), visual], 0);
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [b * t]), &device);
        table.select(0, index).reshape([b, t, d])
    }

    /// Greedy decoding with a KV cache for one prompt (`input_ids` `[1, T]` with its images):
    /// returns the generated ids, stopping after a stop id (included) or `max_new_tokens`.
    pub fn generate(&self, input_ids: Tensor<B, 2, Int>, images: &[ImageInput<B>], max_new_tokens: usize, stop_ids: &[i64]) -> Vec<i64> {
        let visual = (!images.is_empty()).then(|| self.encode_images(images, None).0);
        let embeds = self.splice(input_ids, visual);
        let device = embeds.device();
        let mut cache = KvCache::new(self.llm.model.layers.len());
        let mut logits = self.llm.forward_cached(embeds, &mut cache);
        let mut out = Vec::new();
        for _ in 0..max_new_tokens {
            let [_, t, v] = logits.dims();
            let last = logits.slice([0..1, t - 1..t, 0..v]).reshape([v]);
            let next = last.argmax(0).into_scalar().elem::<i64>();
            out.push(next);
            if stop_ids.contains(&next) {
                break;
            }
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![next], [1, 1]), &device);
            logits = self.llm.forward_cached(self.llm.embed(ids), &mut cache);
        }
        out
    }

    /// The LLM's input embeddings for a batch: token embeddings with the images' visual tokens
    /// spliced in.
    pub fn embed_batch(&self, input_ids: Tensor<B, 2, Int>, images: &[ImageInput<B>], trace: Option<&mut Trace>) -> Tensor<B, 3> {
        let visual = if images.is_empty() { None } else { Some(self.encode_images(images, trace).0) };
        self.splice(input_ids, visual)
    }

    /// The training loss: mean cross-entropy over the scored positions, with the output
    /// projection computed for those rows only (equal to [`causal_lm_loss`] of the full logits).
    /// Returns the loss `[1]` and the number of scored positions.
    pub fn loss(&self, input: FilaInput<B>) -> (Tensor<B, 1>, usize) {
        let rows = ScoredRows::of(input.labels.as_ref().expect("the training loss needs labels"));
        self.loss_at(input, &rows)
    }

    /// [`Fila::loss`] at `rows`, the scored positions of `input`'s labels, already read.
    pub fn loss_at(&self, input: FilaInput<B>, rows: &ScoredRows) -> (Tensor<B, 1>, usize) {
        let embeds = self.embed_batch(input.input_ids, &input.images, None);
        let context = self.llm.context(&embeds, Some(input.attention_mask));
        let mut x = embeds;
        for layer in &self.llm.model.layers {
            x = layer.forward_in(x, &context);
        }
        if rows.is_empty() {
            return (x.sum().mul_scalar(0.0), 0);
        }
        let device = x.device();
        let sum = self.llm.nll_sum(rows.gather(x), rows.targets(&device));
        (sum / rows.len().max(1) as f64, rows.len())
    }

    pub fn forward(&self, input: FilaInput<B>, trace: Option<&mut Trace>) -> FilaOutput<B> {
        let embeds = self.embed_batch(input.input_ids, &input.images, trace);
        let logits = self.llm.forward_embeds(embeds, Some(input.attention_mask), false).logits;
        let (loss, scored_tokens) = match input.labels {
            Some(labels) => {
                let (loss, n) = causal_lm_loss(logits.clone(), labels);
                (Some(loss), n)
            }
            None => (None, 0),
        };
        FilaOutput { logits, loss, scored_tokens }
    }
}

/// The positions a batch is scored at: position `i` of row `b` predicts `labels[b, i + 1]` when
/// that label is not −100 (the causal shift of [`causal_lm_loss`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredRows {
    /// Flat index `b·T + i` into the `[B·T, D]` hidden states.
    pub index: Vec<i64>,
    /// The token each of those positions predicts.
    pub target: Vec<i64>,
}

impl ScoredRows {
    pub fn of<B: Backend>(labels: &Tensor<B, 2, Int>) -> Self {
        let [_, t] = labels.dims();
        Self::from_labels(&labels.to_data().convert::<i64>().to_vec::<i64>().expect("integer labels"), t)
    }

    /// From labels `[B, T]` in row-major order on the host.
    pub fn from_labels(labels: &[i64], t: usize) -> Self {
        let b = labels.len().checked_div(t).unwrap_or(0);
        let (mut index, mut target) = (Vec::new(), Vec::new());
        for row in 0..b {
            for i in 0..t.saturating_sub(1) {
                let label = labels[row * t + i + 1];
                if label != IGNORE_INDEX {
                    index.push((row * t + i) as i64);
                    target.push(label);
                }
            }
        }
        Self { index, target }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Rows `range` of the scored set.
    pub fn part(&self, range: std::ops::Range<usize>) -> Self {
        Self { index: self.index[range.clone()].to_vec(), target: self.target[range].to_vec() }
    }

    /// The scored rows of hidden states `[B, T, D]` → `[N, D]`.
    pub fn gather<B: Backend>(&self, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, t, d] = hidden.dims();
        let device = hidden.device();
        hidden.reshape([b * t, d]).select(0, Tensor::from_data(TensorData::new(self.index.clone(), [self.len()]), &device))
    }

    pub fn targets<B: Backend>(&self, device: &B::Device) -> Tensor<B, 1, Int> {
        Tensor::from_data(TensorData::new(self.target.clone(), [self.len()]), device)
    }
}

/// Mean cross-entropy of `logits[:, :-1]` against `labels[:, 1:]` over labels ≠ −100.
/// `logits`: `[B, T, V]`, `labels`: `[B, T]`. Returns the loss `[1]` and the number of scored
/// tokens (a batch with none gives a loss of 0).
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> (Tensor<B, 1>, usize) {
    let [b, t, v] = logits.dims();
    let device = logits.device();
    let targets: Vec<i64> = labels.slice([0..b, 1..t]).to_data().convert::<i64>().to_vec().expect("integer labels");
    let scored = targets.iter().filter(|&&l| l != IGNORE_INDEX).count();
    let weights: Vec<f32> = targets.iter().map(|&l| if l == IGNORE_INDEX { 0.0 } else { 1.0 }).collect();
    let safe: Vec<i64> = targets.iter().map(|&l| if l == IGNORE_INDEX { 0 } else { l }).collect();
    let n = b * (t - 1);
    let logp = activation::log_softmax(logits.slice([0..b, 0..t - 1, 0..v]).reshape([n, v]), 1);
    let index = Tensor::<B, 2, Int>::from_data(TensorData::new(safe, [n, 1]), &device);
    let picked = logp.gather(1, index).reshape([n]);
    let weights = Tensor::<B, 1>::from_data(TensorData::new(weights, [n]), &device);
    let total = (picked * weights).sum().neg();
    (total / scored.max(1) as f64, scored)
}
