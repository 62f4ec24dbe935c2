//! LLaMA-3 in the Hugging Face `LlamaForCausalLM` layout (Touvron et al. 2023; Meta's Llama 3
//! report <https://arxiv.org/abs/2407.21783>; reference: transformers `models/llama/modeling_llama.py`).
//! Grouped-query attention, RoPE in `rotate_half` form (the layout Hugging Face's q/k weights
//! assume) with the `llama3` frequency scaling, RMSNorm, SwiGLU, tied or untied output embedding.

use crate::attention::{attention, AttentionMask};
use crate::autocast;
use crate::config::read_hf_config;
use crate::kernels;
use crate::lora::{project, LoraAdapter};
use crate::nf4::Nf4Tensor;
use crate::nn::{linear, merge_heads, split_heads, Activation, RmsNorm};
use crate::ModelError;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear};
use burn::prelude::*;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters` in `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    Default,
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
}

/// `config.json` as written by transformers 4 (`rope_theta`, `rope_scaling`) or 5
/// (`rope_parameters`); defaults are transformers' `LlamaConfig` defaults.
#[derive(Deserialize)]
#[serde(default)]
struct HfLlamaConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    tie_word_embeddings: bool,
    hidden_act: Activation,
    attention_bias: bool,
    mlp_bias: bool,
}

impl Default for HfLlamaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: false,
            hidden_act: Activation::Silu,
            attention_bias: false,
            mlp_bias: false,
        }
    }
}

fn parse_rope(value: &serde_json::Value, file: &Path) -> Result<Option<RopeScaling>, ModelError> {
    let kind = value.get("rope_type").or_else(|| value.get("type")).and_then(|v| v.as_str());
    let bad = |message: String| ModelError::Config { path: file.to_path_buf(), message };
    match kind {
        None | Some("default") => Ok(None),
        Some("llama3") => {
            let num = |key: &str| value.get(key).and_then(|v| v.as_f64()).ok_or_else(|| bad(format!("rope scaling llama3 needs `{key}`")));
            Ok(Some(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            }))
        }
        Some(other) => Err(bad(format!("rope type `{other}` is not supported (supported: default, llama3)"))),
    }
}

impl LlamaConfig {
    /// `meta-llama/Meta-Llama-3-8B-Instruct`.
    pub fn llama3_8b() -> Self {
        Self {
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
        }
    }

    pub fn from_hf_file(path: &Path) -> Result<Self, ModelError> {
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let raw: HfLlamaConfig = read_hf_config(&file, None)?;
        let unsupported = |what: &str| ModelError::Config { path: file.clone(), message: format!("{what} is not supported by this Llama implementation") };
        if raw.hidden_act != Activation::Silu {
            return Err(unsupported("hidden_act other than silu"));
        }
        if raw.attention_bias || raw.mlp_bias {
            return Err(unsupported("attention_bias / mlp_bias"));
        }
        let rope_source = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw.rope_theta.or_else(|| raw.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64())).unwrap_or(10000.0);
        let rope_scaling = match rope_source {
            Some(v) => parse_rope(v, &file)?,
            None => None,
        };
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads),
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings,
        })
    }

    /// Inverse RoPE frequencies (`head_dim / 2` of them), with the configured scaling applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        let hd = self.head_dim;
        (0..hd / 2)
            .map(|i| {
                let base = 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64);
                let base = base as f32 as f64; // transformers builds the table in f32
                let scaled = match &self.rope_scaling {
                    None | Some(RopeScaling::Default) => base,
                    Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                        let old = *original_max_position_embeddings as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / base;
                        let low_freq_wavelen = old / low_freq_factor;
                        let high_freq_wavelen = old / high_freq_factor;
                        if wavelen < high_freq_wavelen {
                            base
                        } else if wavelen > low_freq_wavelen {
                            base / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * base / factor + smooth * base
                        }
                    }
                };
                scaled as f32
            })
            .collect()
    }

    /// Parameter count computed from the config alone.
    pub fn num_params(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.num_hidden_layers * layer + d + head
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> LlamaForCausalLM<B> {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layers = (0..self.num_hidden_layers)
            .map(|_| LlamaDecoderLayer {
                self_attn: LlamaAttention {
                    q_proj: linear(d, q, false, device),
                    k_proj: linear(d, kv, false, device),
                    v_proj: linear(d, kv, false, device),
                    o_proj: linear(q, d, false, device),
                    q_lora: None,
                    k_lora: None,
                    v_lora: None,
                    o_lora: None,
                    q_nf4: None,
                    k_nf4: None,
                    v_nf4: None,
                    o_nf4: None,
                    num_heads: self.num_attention_heads,
                    num_kv_heads: self.num_key_value_heads,
                },
                mlp: LlamaMlp {
                    gate_proj: linear(d, self.intermediate_size, false, device),
                    up_proj: linear(d, self.intermediate_size, false, device),
                    down_proj: linear(self.intermediate_size, d, false, device),
                    gate_lora: None,
                    up_lora: None,
                    down_lora: None,
                    gate_nf4: None,
                    up_nf4: None,
                    down_nf4: None,
                },
                input_layernorm: RmsNorm::new(d, self.rms_norm_eps, device),
                post_attention_layernorm: RmsNorm::new(d, self.rms_norm_eps, device),
            })
            .collect();
        LlamaForCausalLM {
            model: LlamaModel { embed_tokens: EmbeddingConfig::new(self.vocab_size, d).init(device), layers, norm: RmsNorm::new(d, self.rms_norm_eps, device) },
            lm_head: (!self.tie_word_embeddings).then(|| linear(d, self.vocab_size, false, device)),
            inv_freq: self.inv_freq(),
        }
    }
}

/// `cos`/`sin` tables `[R, 1, T, head_dim]` for positions `start..start+len`, one row per start
/// (rows of a padded batch sit at different positions).
fn rope_tables<B: Backend>(inv_freq: &[f32], starts: &[usize], len: usize, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(starts.len() * len * half * 2);
    let mut sin = Vec::with_capacity(starts.len() * len * half * 2);
    for &start in starts {
        for pos in start..start + len {
            for _ in 0..2 {
                for &f in inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
    }
    let shape = [starts.len(), 1, len, half * 2];
    (Tensor::from_data(TensorData::new(cos, shape), device), Tensor::from_data(TensorData::new(sin, shape), device))
}

#[derive(Module, Debug)]
pub struct LlamaAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    /// LoRA adapters of the projections, when attached ([`crate::lora::attach`]).
    pub q_lora: Option<LoraAdapter<B>>,
    pub k_lora: Option<LoraAdapter<B>>,
    pub v_lora: Option<LoraAdapter<B>>,
    pub o_lora: Option<LoraAdapter<B>>,
    /// NF4 weights of the projections (QLoRA, [`crate::fila::Fila::load_quantized`]): when set,
    /// the product runs on it and the `Linear`'s weight is an empty placeholder.
    pub q_nf4: Option<Nf4Tensor<B>>,
    pub k_nf4: Option<Nf4Tensor<B>>,
    pub v_nf4: Option<Nf4Tensor<B>>,
    pub o_nf4: Option<Nf4Tensor<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
}

/// Keys and values of the positions seen so far, one entry per layer (after RoPE, one per
/// key/value head): `[B, Hkv, T_seen, hd]`.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], len: 0 }
    }

    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<B: Backend> LlamaAttention<B> {
    /// `x`: `[B, T, D]` → `[B, T, D]`, attending to keys `[T_cache + T]` as `mask` allows. With a
    /// cache entry, the new keys/values are appended to it and attention covers all cached
    /// positions.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        mask: &AttentionMask<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        // Head split and RoPE in one pass (a fused kernel on the CPU).
        let q = kernels::rope_heads(project(&self.q_proj, self.q_nf4.as_ref(), self.q_lora.as_ref(), x.clone()), self.num_heads, cos.clone(), sin.clone());
        let mut k = kernels::rope_heads(project(&self.k_proj, self.k_nf4.as_ref(), self.k_lora.as_ref(), x.clone()), self.num_kv_heads, cos, sin);
        let mut v = split_heads(project(&self.v_proj, self.v_nf4.as_ref(), self.v_lora.as_ref(), x), self.num_kv_heads);
        if let Some(entry) = cache {
            if let Some((k_old, v_old)) = entry.take() {
                k = Tensor::cat(vec![k_old, k], 2);
                v = Tensor::cat(vec![v_old, v], 2);
            }
            *entry = Some((k.clone(), v.clone()));
        }
        // Grouped-query attention: the seam takes the key/value heads unrepeated.
        project(&self.o_proj, self.o_nf4.as_ref(), self.o_lora.as_ref(), merge_heads(attention(q, k, v, mask)))
    }
}

#[derive(Module, Debug)]
pub struct LlamaMlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    /// LoRA adapters of the projections, when attached ([`crate::lora::attach`]).
    pub gate_lora: Option<LoraAdapter<B>>,
    pub up_lora: Option<LoraAdapter<B>>,
    pub down_lora: Option<LoraAdapter<B>>,
    /// NF4 weights of the projections (QLoRA), as in [`LlamaAttention`].
    pub gate_nf4: Option<Nf4Tensor<B>>,
    pub up_nf4: Option<Nf4Tensor<B>>,
    pub down_nf4: Option<Nf4Tensor<B>>,
}

impl<B: Backend> LlamaMlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = project(&self.gate_proj, self.gate_nf4.as_ref(), self.gate_lora.as_ref(), x.clone());
        project(
            &self.down_proj,
            self.down_nf4.as_ref(),
            self.down_lora.as_ref(),
            kernels::swiglu(gate, project(&self.up_proj, self.up_nf4.as_ref(), self.up_lora.as_ref(), x)),
        )
    }
}

#[derive(Module, Debug)]
pub struct LlamaDecoderLayer<B: Backend> {
    pub self_attn: LlamaAttention<B>,
    pub mlp: LlamaMlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> LlamaDecoderLayer<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        mask: &AttentionMask<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let h = x.clone() + self.self_attn.forward(self.input_layernorm.forward(x), cos, sin, mask, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }

    /// One training or prefill forward pass (no cache) with the batch's [`LayerContext`].
    pub fn forward_in(&self, x: Tensor<B, 3>, context: &LayerContext<B>) -> Tensor<B, 3> {
        self.forward(x, context.cos.clone(), context.sin.clone(), &context.mask, None)
    }
}

/// The per-batch inputs of every decoder layer ([`LlamaForCausalLM::context`]).
#[derive(Debug, Clone)]
pub struct LayerContext<B: Backend> {
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
    pub mask: AttentionMask<B>,
}

#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<LlamaDecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    pub model: LlamaModel<B>,
    /// `None` when the output embedding is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub inv_freq: Vec<f32>,
}

pub struct LlamaOutput<B: Backend> {
    /// Input embeddings, then the output of every decoder layer (before the final norm).
    pub hidden: Vec<Tensor<B, 3>>,
    /// `[B, T, vocab]`.
    pub logits: Tensor<B, 3>,
}

impl<B: Backend> LlamaForCausalLM<B> {
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.model.embed_tokens.forward(input_ids)
    }

    /// `embeds`: `[B, T, D]`; `valid`: `[B, T]` (1 = token, 0 = right padding: each row's tokens
    /// come first, so the mask is causal plus a key length per row).
    pub fn forward_embeds(&self, embeds: Tensor<B, 3>, valid: Option<Tensor<B, 2>>, keep_hidden: bool) -> LlamaOutput<B> {
        let context = self.context(&embeds, valid);
        let mut hidden = Vec::new();
        let mut x = embeds;
        for layer in &self.model.layers {
            if keep_hidden {
                hidden.push(x.clone());
            }
            x = layer.forward_in(x, &context);
        }
        if keep_hidden {
            hidden.push(x.clone());
        }
        let logits = self.logits(self.model.norm.forward(x));
        LlamaOutput { hidden, logits }
    }

    /// What every decoder layer of a forward pass over `embeds` (`[B, T, D]`) takes: RoPE tables for
    /// positions `0..T` and the causal mask with each row's key length from `valid` (`[B, T]`, 1 =
    /// token, right padding after).
    pub fn context(&self, embeds: &Tensor<B, 3>, valid: Option<Tensor<B, 2>>) -> LayerContext<B> {
        let [b, t, _] = embeds.dims();
        let (cos, sin) = rope_tables::<B>(&self.inv_freq, &[0], t, &embeds.device());
        let mask = match valid {
            Some(valid) => AttentionMask::causal().with_key_lengths(valid.sum_dim(1).int().reshape([b]), t),
            None => AttentionMask::causal(),
        };
        LayerContext { cos, sin, mask }
    }

    /// Summed negative log-likelihood of `targets` from final hidden states `rows` (`[N, D]`,
    /// before the final norm; one row per scored position, as [`crate::fila::ScoredRows`] picks
    /// them): the output projection runs on the scored rows only, never on the whole sequence.
    pub fn nll_sum(&self, rows: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        let [n, _] = rows.dims();
        let logits = self.logits(self.model.norm.forward(rows.unsqueeze::<3>())).squeeze_dim::<2>(0);
        let logp = burn::tensor::activation::log_softmax(logits, 1);
        logp.gather(1, targets.reshape([n, 1])).sum().neg()
    }

    /// Incremental decoding: runs `embeds` (`[B, T, D]`, no padding) at the positions after those
    /// already in `cache`, appends their keys/values, and returns their logits `[B, T, vocab]`.
    pub fn forward_cached(&self, embeds: Tensor<B, 3>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        let [_, t, _] = embeds.dims();
        let device = embeds.device();
        let past = cache.len;
        let (cos, sin) = rope_tables::<B>(&self.inv_freq, &[past], t, &device);
        let mask = AttentionMask::causal();
        let mut x = embeds;
        for (layer, entry) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, cos.clone(), sin.clone(), &mask, Some(entry));
        }
        cache.len = past + t;
        self.logits(self.model.norm.forward(x))
    }

    /// Incremental decoding of a right-padded batch: row b's `T` new embeddings (`[B, T, D]`) sit at
    /// positions `starts[b]..starts[b]+T`, and `valid` (`[B, past + T]`) marks which cached and new
    /// key columns are tokens (1) or padding (0). Appends the new keys/values to `cache` and returns
    /// the final-norm hidden states `[B, T, D]`: pass the rows you need to `logits`, since a long
    /// prompt's logits over the whole vocabulary are mostly not needed.
    pub fn forward_cached_padded(&self, embeds: Tensor<B, 3>, cache: &mut KvCache<B>, starts: &[usize], valid: Tensor<B, 2>) -> Tensor<B, 3> {
        let [b, t, _] = embeds.dims();
        assert_eq!(starts.len(), b, "one start position per row");
        let device = embeds.device();
        let past = cache.len;
        let (cos, sin) = rope_tables::<B>(&self.inv_freq, starts, t, &device);
        // The padding of each row's prompt sits between real keys: a validity mask, not lengths.
        let mask = AttentionMask::causal().with_key_valid(valid.not_equal_elem(0.0));
        let mut x = embeds;
        for (layer, entry) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, cos.clone(), sin.clone(), &mask, Some(entry));
        }
        cache.len = past + t;
        self.model.norm.forward(x)
    }

    /// Output projection; with tied embeddings it reuses `embed_tokens.weight` (`[V, D]`).
    pub fn logits(&self, normed: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => autocast::linear(head, normed),
            None => {
                let w = self.model.embed_tokens.weight.val(); // [V, D]
                autocast::matmul(normed, w.transpose().unsqueeze::<3>())
            }
        }
    }
}
