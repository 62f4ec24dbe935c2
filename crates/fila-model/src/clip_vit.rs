//! CLIP vision transformer in the Hugging Face `CLIPVisionModel` layout
//! (Radford et al. 2021, <https://arxiv.org/abs/2103.00020>; reference: transformers
//! `models/clip/modeling_clip.py`). Field names equal checkpoint tensor names, so the struct
//! tree is the key map: `embeddings.patch_embedding.weight`, `encoder.layers.{i}.self_attn.q_proj`.

use crate::attention::{attention, AttentionMask};
use crate::autocast;
use crate::config::read_hf_config;
use crate::nn::{linear, merge_heads, split_heads, Activation, LayerNorm};
use crate::ModelError;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Linear};
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `CLIPVisionConfig`; defaults are transformers' defaults, since `config.json` omits them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// `openai/clip-vit-large-patch14-336`.
    pub fn vit_large_patch14_336() -> Self {
        Self { hidden_size: 1024, intermediate_size: 4096, num_hidden_layers: 24, num_attention_heads: 16, image_size: 336, patch_size: 14, ..Self::default() }
    }

    /// Reads a `CLIPVisionModel` or whole `CLIPModel` `config.json` (its `vision_config`).
    pub fn from_hf_file(path: &Path) -> Result<Self, ModelError> {
        read_hf_config(path, Some("vision_config"))
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    /// Parameter count computed from the config alone.
    pub fn num_params(&self) -> usize {
        let d = self.hidden_size;
        let f = self.intermediate_size;
        let embeddings = d + self.num_channels * self.patch_size * self.patch_size * d + self.num_positions() * d;
        let layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d;
        embeddings + 2 * 2 * d + self.num_hidden_layers * layer
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipVisionTransformer<B> {
        let d = self.hidden_size;
        ClipVisionTransformer {
            embeddings: ClipVisionEmbeddings {
                class_embedding: Param::from_tensor(Tensor::random([d], burn::tensor::Distribution::Normal(0.0, 0.02), device)),
                patch_embedding: Conv2dConfig::new([self.num_channels, d], [self.patch_size, self.patch_size])
                    .with_stride([self.patch_size, self.patch_size])
                    .with_bias(false)
                    .init(device),
                // transformers' CLIP initialisation (initializer_range 0.02): a unit-variance
                // table would drown the patch content of a fresh tower.
                position_embedding: EmbeddingConfig::new(self.num_positions(), d)
                    .with_initializer(burn::nn::Initializer::Normal { mean: 0.0, std: 0.02 })
                    .init(device),
                patch_size: self.patch_size,
            },
            pre_layrnorm: LayerNorm::new(d, self.layer_norm_eps, device),
            encoder: ClipEncoder {
                layers: (0..self.num_hidden_layers)
                    .map(|_| ClipEncoderLayer {
                        self_attn: ClipAttention {
                            q_proj: linear(d, d, true, device),
                            k_proj: linear(d, d, true, device),
                            v_proj: linear(d, d, true, device),
                            out_proj: linear(d, d, true, device),
                            num_heads: self.num_attention_heads,
                        },
                        layer_norm1: LayerNorm::new(d, self.layer_norm_eps, device),
                        mlp: ClipMlp {
                            fc1: linear(d, self.intermediate_size, true, device),
                            fc2: linear(self.intermediate_size, d, true, device),
                            act: self.hidden_act,
                        },
                        layer_norm2: LayerNorm::new(d, self.layer_norm_eps, device),
                    })
                    .collect(),
            },
            post_layernorm: LayerNorm::new(d, self.layer_norm_eps, device),
        }
    }
}

#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings<B: Backend> {
    pub class_embedding: Param<Tensor<B, 1>>,
    pub patch_embedding: Conv2d<B>,
    pub position_embedding: Embedding<B>,
    pub patch_size: usize,
}

impl<B: Backend> ClipVisionEmbeddings<B> {
    /// `pixels`: `[N, 3, S, S]` → `[N, 1 + (S/p)², D]` (class token first, patches row-major).
    pub fn forward(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        let [n, _, h, w] = pixels.dims();
        let patches = autocast::conv2d(&self.patch_embedding, pixels); // [N, D, g, g]
        let d = patches.dims()[1];
        let patches = patches.flatten::<3>(2, 3).swap_dims(1, 2); // [N, g², D]
        let cls = self.class_embedding.val().reshape([1, 1, d]).expand([n, 1, d]);
        let tokens = Tensor::cat(vec![cls, patches], 1);
        let positions = self.position_embedding.weight.val();
        let expected = positions.dims()[0];
        assert_eq!(1 + (h / self.patch_size) * (w / self.patch_size), expected, "CLIP input {h}x{w} does not match the position table ({expected} positions)");
        tokens + positions.unsqueeze::<3>()
    }
}

#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub num_heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    /// `x`: `[N, T, D]` → `[N, T, D]`; bidirectional, no mask.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let q = split_heads(autocast::linear(&self.q_proj, x.clone()), self.num_heads);
        let k = split_heads(autocast::linear(&self.k_proj, x.clone()), self.num_heads);
        let v = split_heads(autocast::linear(&self.v_proj, x), self.num_heads);
        autocast::linear(&self.out_proj, merge_heads(attention(q, k, v, &AttentionMask::none())))
    }
}

#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    pub self_attn: ClipAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: ClipMlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

impl<B: Backend> ClipEncoderLayer<B> {
    /// Pre-LN block: `[N, T, D]` → `[N, T, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        let h = autocast::linear(&self.mlp.fc1, self.layer_norm2.forward(x.clone()));
        x + autocast::linear(&self.mlp.fc2, self.mlp.act.apply(h))
    }
}

#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// The vision tower (`CLIPVisionTransformer`, reached as `vision_model.*` in CLIP checkpoints).
#[derive(Module, Debug)]
pub struct ClipVisionTransformer<B: Backend> {
    pub embeddings: ClipVisionEmbeddings<B>,
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: ClipEncoder<B>,
    pub post_layernorm: LayerNorm<B>,
}

/// Outputs of a plain CLIP forward, as transformers returns them.
pub struct ClipVisionOutput<B: Backend> {
    /// `hidden[0]` is the embedding output after `pre_layrnorm`; `hidden[i]` the output of layer i.
    pub hidden: Vec<Tensor<B, 3>>,
    /// `post_layernorm` of the class token: `[N, D]`.
    pub pooled: Tensor<B, 2>,
}

impl<B: Backend> ClipVisionTransformer<B> {
    /// Embeddings and `pre_layrnorm`: the input of layer 1.
    pub fn embed(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        self.pre_layrnorm.forward(self.embeddings.forward(pixels))
    }

    pub fn num_layers(&self) -> usize {
        self.encoder.layers.len()
    }

    /// The whole tower: `pixels` `[N, 3, S, S]`.
    pub fn forward(&self, pixels: Tensor<B, 4>) -> ClipVisionOutput<B> {
        let mut hidden = vec![self.embed(pixels)];
        for layer in &self.encoder.layers {
            let next = layer.forward(hidden.last().unwrap().clone());
            hidden.push(next);
        }
        let last = hidden.last().unwrap().clone();
        let [n, _, d] = last.dims();
        let cls = last.slice([0..n, 0..1, 0..d]).reshape([n, d]);
        ClipVisionOutput { hidden, pooled: self.post_layernorm.forward(cls) }
    }
}
