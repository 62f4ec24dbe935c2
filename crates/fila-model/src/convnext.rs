//! ConvNeXt in the Hugging Face `ConvNextModel` layout (Liu et al. 2022,
//! <https://arxiv.org/abs/2201.03545>; reference: transformers `models/convnext/modeling_convnext.py`).
//! Returns all four stage outputs (strides 4, 8, 16, 32) for the hybrid encoder.
//! The only names that differ from the checkpoint are the two halves of the downsampling layer
//! (`downsampling_layer.{0,1}` in files), renamed in `weights::keys`.

use crate::autocast;
use crate::config::read_hf_config;
use crate::nn::{from_pixel_rows, linear, to_pixel_rows, Activation, LayerNorm};
use crate::ModelError;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, PaddingConfig2d};
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The LayerNorms inside the network use this epsilon whatever the config says.
const INNER_NORM_EPS: f64 = 1e-6;

/// `ConvNextConfig`; defaults are transformers' defaults (ConvNeXt-T).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConvNextConfig {
    pub num_channels: usize,
    pub patch_size: usize,
    pub hidden_sizes: Vec<usize>,
    pub depths: Vec<usize>,
    pub hidden_act: Activation,
    /// Epsilon of the final (pooler) LayerNorm.
    pub layer_norm_eps: f64,
    pub layer_scale_init_value: f64,
}

impl Default for ConvNextConfig {
    fn default() -> Self {
        Self {
            num_channels: 3,
            patch_size: 4,
            hidden_sizes: vec![96, 192, 384, 768],
            depths: vec![3, 3, 9, 3],
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-12,
            layer_scale_init_value: 1e-6,
        }
    }
}

impl ConvNextConfig {
    /// `facebook/convnext-large-224` (ConvNeXt-L).
    pub fn large() -> Self {
        Self { hidden_sizes: vec![192, 384, 768, 1536], depths: vec![3, 3, 27, 3], ..Self::default() }
    }

    pub fn from_hf_file(path: &Path) -> Result<Self, ModelError> {
        let config: Self = read_hf_config(path, None)?;
        if config.hidden_sizes.len() != 4 || config.depths.len() != 4 {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: "FILA needs a 4-stage ConvNeXt (hidden_sizes and depths of length 4)".into(),
            });
        }
        Ok(config)
    }

    /// Total stride of each stage's output.
    pub fn stage_strides(&self) -> [usize; 4] {
        let p = self.patch_size;
        [p, 2 * p, 4 * p, 8 * p]
    }

    /// Parameter count computed from the config alone (no classifier head).
    pub fn num_params(&self) -> usize {
        let h = &self.hidden_sizes;
        let stem = self.num_channels * self.patch_size * self.patch_size * h[0] + h[0] + 2 * h[0];
        let mut total = stem;
        for (i, (&c, &depth)) in h.iter().zip(&self.depths).enumerate() {
            if i > 0 {
                total += 2 * h[i - 1] + h[i - 1] * c * 4 + c;
            }
            let scale = if self.layer_scale_init_value > 0.0 { c } else { 0 };
            let layer = c * 49 + c + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c) + scale;
            total += depth * layer;
        }
        total + 2 * h[3]
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> ConvNextModel<B> {
        let h = &self.hidden_sizes;
        let stages = (0..4)
            .map(|i| {
                let c = h[i];
                let downsampling_layer = (i > 0).then(|| ConvNextDownsample {
                    norm: LayerNorm::new(h[i - 1], INNER_NORM_EPS, device),
                    conv: Conv2dConfig::new([h[i - 1], c], [2, 2]).with_stride([2, 2]).init(device),
                });
                let layers = (0..self.depths[i])
                    .map(|_| ConvNextLayer {
                        dwconv: Conv2dConfig::new([c, c], [7, 7])
                            .with_groups(c)
                            .with_padding(PaddingConfig2d::Explicit(3, 3, 3, 3))
                            .init(device),
                        layernorm: LayerNorm::new(c, INNER_NORM_EPS, device),
                        pwconv1: linear(c, 4 * c, true, device),
                        pwconv2: linear(4 * c, c, true, device),
                        layer_scale_parameter: (self.layer_scale_init_value > 0.0).then(|| {
                            Param::from_tensor(
                                Tensor::ones([c], device) * self.layer_scale_init_value,
                            )
                        }),
                        act: self.hidden_act,
                    })
                    .collect();
                ConvNextStage { downsampling_layer, layers }
            })
            .collect();
        ConvNextModel {
            embeddings: ConvNextEmbeddings {
                patch_embeddings: Conv2dConfig::new(
                    [self.num_channels, h[0]],
                    [self.patch_size, self.patch_size],
                )
                .with_stride([self.patch_size, self.patch_size])
                .init(device),
                layernorm: LayerNorm::new(h[0], INNER_NORM_EPS, device),
            },
            encoder: ConvNextEncoder { stages },
            layernorm: LayerNorm::new(h[3], self.layer_norm_eps, device),
        }
    }
}

#[derive(Module, Debug)]
pub struct ConvNextEmbeddings<B: Backend> {
    pub patch_embeddings: Conv2d<B>,
    pub layernorm: LayerNorm<B>,
}

/// Channels-first LayerNorm then a 2×2 stride-2 conv (`downsampling_layer.0` / `.1` in files).
#[derive(Module, Debug)]
pub struct ConvNextDownsample<B: Backend> {
    pub norm: LayerNorm<B>,
    pub conv: Conv2d<B>,
}

#[derive(Module, Debug)]
pub struct ConvNextLayer<B: Backend> {
    pub dwconv: Conv2d<B>,
    pub layernorm: LayerNorm<B>,
    pub pwconv1: Linear<B>,
    pub pwconv2: Linear<B>,
    pub layer_scale_parameter: Option<Param<Tensor<B, 1>>>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Backend> ConvNextLayer<B> {
    /// `[N, C, H, W]` → `[N, C, H, W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let dims = x.dims();
        let y = self.layernorm.forward(to_pixel_rows(autocast::conv2d(&self.dwconv, x.clone())));
        let y = autocast::linear(&self.pwconv2, self.act.apply(autocast::linear(&self.pwconv1, y)));
        let y = match &self.layer_scale_parameter {
            Some(gamma) => y * gamma.val().unsqueeze::<2>(),
            None => y,
        };
        x + from_pixel_rows(y, dims)
    }
}

#[derive(Module, Debug)]
pub struct ConvNextStage<B: Backend> {
    pub downsampling_layer: Option<ConvNextDownsample<B>>,
    pub layers: Vec<ConvNextLayer<B>>,
}

impl<B: Backend> ConvNextStage<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = match &self.downsampling_layer {
            Some(ds) => autocast::conv2d(&ds.conv, ds.norm.forward_channels_first(x)),
            None => x,
        };
        for layer in &self.layers {
            x = layer.forward(x);
        }
        x
    }
}

#[derive(Module, Debug)]
pub struct ConvNextEncoder<B: Backend> {
    pub stages: Vec<ConvNextStage<B>>,
}

/// `ConvNextModel` (reached as `convnext.*` in classification checkpoints).
#[derive(Module, Debug)]
pub struct ConvNextModel<B: Backend> {
    pub embeddings: ConvNextEmbeddings<B>,
    pub encoder: ConvNextEncoder<B>,
    /// Pooler norm; FILA uses the stage maps and not the pooled vector.
    pub layernorm: LayerNorm<B>,
}

pub struct ConvNextOutput<B: Backend> {
    /// Stem output (`hidden_states[0]` in transformers).
    pub stem: Tensor<B, 4>,
    /// Stage 1..4 outputs, `[N, C_k, H/s_k, W/s_k]`.
    pub stages: Vec<Tensor<B, 4>>,
}

impl<B: Backend> ConvNextModel<B> {
    /// `pixels`: `[N, 3, H, W]` with H and W multiples of 32.
    pub fn forward(&self, pixels: Tensor<B, 4>) -> ConvNextOutput<B> {
        let stem = self
            .embeddings
            .layernorm
            .forward_channels_first(autocast::conv2d(&self.embeddings.patch_embeddings, pixels));
        let mut stages = Vec::with_capacity(4);
        let mut x = stem.clone();
        for stage in &self.encoder.stages {
            x = stage.forward(x);
            stages.push(x.clone());
        }
        ConvNextOutput { stem, stages }
    }

    /// `ConvNextModel.pooler_output`: LayerNorm of the spatial mean of the last stage, `[N, C_4]`.
    pub fn pool(&self, last_stage: Tensor<B, 4>) -> Tensor<B, 2> {
        let [n, c, _, _] = last_stage.dims();
        let mean = last_stage.flatten::<3>(2, 3).mean_dim(2).reshape([n, c]);
        self.layernorm.forward(mean)
    }
}
