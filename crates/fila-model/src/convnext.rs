//! ConvNeXt (Liu et al. 2022, <https://arxiv.org/abs/2201.03545>) returning all four stage outputs
//! (strides 4, 8, 16, 32) for the hybrid encoder. Module fields follow the Hugging Face
//! `ConvNextModel` (transformers `models/convnext/modeling_convnext.py`); the same network also
//! loads from timm / OpenCLIP files (timm `models/convnext.py`, open_clip `timm_model.py`), the
//! layout FILA and Mini-Gemini use (`laion/CLIP-convnext_large_d_320.*`). The name differences of
//! both layouts live in `weights::keys`; [`ConvNextLayout`] says which one a folder uses.
//!
//! The two agree on the computation: patchify stem then a channels-first LayerNorm; stages 2-4
//! open with LayerNorm then a 2×2 stride-2 conv (timm `downsample.{0,1}`); blocks are depthwise
//! 7×7 conv, LayerNorm, Linear 4×, exact GELU, Linear, layer scale, residual; every inner
//! LayerNorm has eps 1e-6. timm's pooler norm is `head.norm` (eps 1e-6); FILA uses the stage maps.
//!
//! The computation runs channels-last (`[N, H, W, C]`) through [`crate::kernels`]: per-pixel
//! norms and linear layers read contiguous rows, and the patchify convolutions (stem and
//! downsampling) are one matrix product each. [`ConvNextModel::forward`] returns PyTorch's
//! `[N, C, H, W]` views of the maps.

use crate::autocast;
use crate::config::read_hf_config;
use crate::kernels;
use crate::nn::{linear, Activation, LayerNorm};
pub use crate::weights::ConvNextLayout;
use crate::weights::{Checkpoint, KeyMap};
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
    /// ConvNeXt-L: `facebook/convnext-large-224` and the trunk of OpenCLIP `convnext_large_d_320`.
    pub fn large() -> Self {
        Self { hidden_sizes: vec![192, 384, 768, 1536], depths: vec![3, 3, 27, 3], ..Self::default() }
    }

    pub fn from_hf_file(path: &Path) -> Result<Self, ModelError> {
        let config: Self = read_hf_config(path, None)?;
        if config.hidden_sizes.len() != 4 || config.depths.len() != 4 {
            return Err(ModelError::Config { path: path.to_path_buf(), message: "FILA needs a 4-stage ConvNeXt (hidden_sizes and depths of length 4)".into() });
        }
        Ok(config)
    }

    /// The architecture of a downloaded ConvNeXt folder and the layout its tensors use. Hugging
    /// Face folders are read from `config.json`; timm / OpenCLIP configs name a timm model rather
    /// than its sizes, so for them the sizes are read from the tensor shapes.
    pub fn from_pretrained(dir: &Path, layout: ConvNextLayout) -> Result<(Self, ConvNextLayout), ModelError> {
        if layout == ConvNextLayout::Hf || (layout == ConvNextLayout::Auto && is_hf_convnext_folder(dir)) {
            return Ok((Self::from_hf_file(dir)?, ConvNextLayout::Hf));
        }
        let checkpoint = Checkpoint::open(dir)?;
        match KeyMap::convnext_layout_of(&checkpoint, layout)? {
            ConvNextLayout::Hf => Ok((Self::from_hf_file(dir)?, ConvNextLayout::Hf)),
            _ => Ok((Self::from_timm_tensors(&checkpoint)?, ConvNextLayout::Timm)),
        }
    }

    /// Sizes of a timm ConvNeXt from its tensors: widths from the depthwise kernels, depths by
    /// counting blocks, the patch size from the stem. Activation (exact GELU) and norm epsilons
    /// (1e-6) are timm's defaults for ConvNeXt-T..XL; a mismatching file fails strict loading.
    pub fn from_timm_tensors(checkpoint: &Checkpoint) -> Result<Self, ModelError> {
        Self::from_timm_shapes(&|key: &str| checkpoint.shape(key)).map_err(|message| ModelError::Checkpoint { path: checkpoint.description().into(), message })
    }

    /// [`Self::from_timm_tensors`] over any source of tensor shapes (`shape_of` takes full file
    /// keys, `visual.trunk.` prefix included).
    pub fn from_timm_shapes(shape_of: &dyn Fn(&str) -> Option<Vec<usize>>) -> Result<Self, String> {
        let prefix = KeyMap::convnext_timm()
            .prefixes
            .into_iter()
            .find(|p| shape_of(&format!("{p}stem.0.weight")).is_some())
            .ok_or("no `stem.0.weight` (also looked under `visual.trunk.` and `trunk.`): not a timm ConvNeXt")?;
        let has = |key: &str| shape_of(&format!("{prefix}{key}")).is_some();
        let stem = shape_of(&format!("{prefix}stem.0.weight")).unwrap_or_default();
        if stem.len() != 4 || stem[2] != stem[3] {
            return Err(format!("`{prefix}stem.0.weight` has shape {stem:?}; FILA needs a square patchify stem [C, 3, p, p]"));
        }
        let mut hidden_sizes = Vec::with_capacity(4);
        let mut depths = Vec::with_capacity(4);
        for i in 0..4 {
            let depth = (0..).take_while(|j| has(&format!("stages.{i}.blocks.{j}.conv_dw.weight"))).count();
            let Some(dw) = shape_of(&format!("{prefix}stages.{i}.blocks.0.conv_dw.weight")) else {
                return Err(format!("no `{prefix}stages.{i}.blocks.0.conv_dw.weight`: FILA needs a 4-stage timm ConvNeXt"));
            };
            hidden_sizes.push(dw[0]);
            depths.push(depth);
        }
        if has("stages.4.blocks.0.conv_dw.weight") {
            return Err(format!("`{prefix}stages.4` exists: FILA needs a 4-stage ConvNeXt"));
        }
        Ok(Self {
            num_channels: stem[1],
            patch_size: stem[2],
            hidden_sizes,
            depths,
            hidden_act: Activation::Gelu,
            layer_norm_eps: INNER_NORM_EPS,
            // Only presence matters when loading: the file's values replace the initial ones.
            layer_scale_init_value: if has("stages.0.blocks.0.gamma") { 1e-6 } else { 0.0 },
        })
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
                        dwconv: Conv2dConfig::new([c, c], [7, 7]).with_groups(c).with_padding(PaddingConfig2d::Explicit(3, 3, 3, 3)).init(device),
                        layernorm: LayerNorm::new(c, INNER_NORM_EPS, device),
                        pwconv1: linear(c, 4 * c, true, device),
                        pwconv2: linear(4 * c, c, true, device),
                        layer_scale_parameter: (self.layer_scale_init_value > 0.0)
                            .then(|| Param::from_tensor(Tensor::ones([c], device) * self.layer_scale_init_value)),
                        act: self.hidden_act,
                    })
                    .collect();
                ConvNextStage { downsampling_layer, layers }
            })
            .collect();
        ConvNextModel {
            embeddings: ConvNextEmbeddings {
                patch_embeddings: Conv2dConfig::new([self.num_channels, h[0]], [self.patch_size, self.patch_size])
                    .with_stride([self.patch_size, self.patch_size])
                    .init(device),
                layernorm: LayerNorm::new(h[0], INNER_NORM_EPS, device),
            },
            encoder: ConvNextEncoder { stages },
            layernorm: LayerNorm::new(h[3], self.layer_norm_eps, device),
        }
    }
}

/// Whether `dir` holds a Hugging Face ConvNeXt `config.json` (timm's `config.json` has
/// `architecture` instead of `model_type`).
fn is_hf_convnext_folder(dir: &Path) -> bool {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    value.get("model_type").and_then(|t| t.as_str()) == Some("convnext")
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
    /// Channels-last `[N, H, W, C]` → `[N, H, W, C]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, h, w, c] = x.dims();
        let y = kernels::depthwise_conv2d_nhwc(x.clone(), &self.dwconv).reshape([n * h * w, c]);
        let y = norm(&self.layernorm, y);
        let y = autocast::linear(&self.pwconv2, activation(self.act, autocast::linear(&self.pwconv1, y)));
        let y = match &self.layer_scale_parameter {
            Some(gamma) => y * gamma.val().unsqueeze::<2>(),
            None => y,
        };
        x + y.reshape([n, h, w, c])
    }
}

/// LayerNorm over the channels of pixel rows, through the fused kernel.
fn norm<B: Backend, const D: usize>(ln: &LayerNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    kernels::layer_norm(x, ln.weight.val(), ln.bias.val(), ln.eps)
}

/// LayerNorm over the channels of a channels-last map `[N, H, W, C]`.
fn norm_map<B: Backend>(ln: &LayerNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, h, w, c] = x.dims();
    norm(ln, x.reshape([n * h * w, c])).reshape([n, h, w, c])
}

fn activation<B: Backend, const D: usize>(act: Activation, x: Tensor<B, D>) -> Tensor<B, D> {
    match act {
        Activation::Gelu => kernels::gelu(x),
        other => other.apply(x),
    }
}

#[derive(Module, Debug)]
pub struct ConvNextStage<B: Backend> {
    pub downsampling_layer: Option<ConvNextDownsample<B>>,
    pub layers: Vec<ConvNextLayer<B>>,
}

/// One piece of the network's chain ([`ConvNextModel::pieces`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvNextPiece {
    /// Patchify convolution and LayerNorm.
    Stem,
    /// Stage `k`'s LayerNorm and 2×2 stride-2 convolution.
    Downsample(usize),
    /// Stage `k`'s layer `j`.
    Layer(usize, usize),
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
    /// Stage 1..4 outputs, `[N, C_k, H/s_k, W/s_k]` from [`ConvNextModel::forward`] and
    /// `[N, H/s_k, W/s_k, C_k]` from [`ConvNextModel::forward_channels_last`].
    pub stages: Vec<Tensor<B, 4>>,
}

impl<B: Backend> ConvNextModel<B> {
    /// `pixels`: `[N, 3, H, W]` with H and W multiples of 32; maps in PyTorch's `[N, C, H, W]`
    /// (views of the channels-last maps).
    pub fn forward(&self, pixels: Tensor<B, 4>) -> ConvNextOutput<B> {
        let out = self.forward_channels_last(pixels);
        let nchw = |x: Tensor<B, 4>| x.permute([0, 3, 1, 2]);
        ConvNextOutput { stem: nchw(out.stem), stages: out.stages.into_iter().map(nchw).collect() }
    }

    /// `pixels`: `[N, 3, H, W]`; maps channels-last, `[N, H/s, W/s, C]`. The network runs on
    /// channels-last maps throughout: its per-pixel LayerNorms and linear layers then read
    /// contiguous rows, and its patchify convolutions become one matrix product each.
    pub fn forward_channels_last(&self, pixels: Tensor<B, 4>) -> ConvNextOutput<B> {
        let mut stem = None;
        let mut stages = Vec::with_capacity(4);
        let mut x = pixels;
        for piece in self.pieces() {
            x = self.run_piece(piece, x);
            if piece == ConvNextPiece::Stem {
                stem = Some(x.clone());
            }
            if self.ends_stage(piece).is_some() {
                stages.push(x.clone());
            }
        }
        ConvNextOutput { stem: stem.expect("the stem runs first"), stages }
    }

    /// The network as a chain of pieces, in order: the stem, then each stage's downsampling (when
    /// it has one) and layers. Activation checkpointing stores each piece's input and recomputes
    /// one piece at a time.
    pub fn pieces(&self) -> Vec<ConvNextPiece> {
        let mut pieces = vec![ConvNextPiece::Stem];
        for (k, stage) in self.encoder.stages.iter().enumerate() {
            if stage.downsampling_layer.is_some() {
                pieces.push(ConvNextPiece::Downsample(k));
            }
            pieces.extend((0..stage.layers.len()).map(|j| ConvNextPiece::Layer(k, j)));
        }
        pieces
    }

    /// The stage (0-based) whose output `piece` produces, when it is a stage's last piece.
    pub fn ends_stage(&self, piece: ConvNextPiece) -> Option<usize> {
        match piece {
            ConvNextPiece::Layer(k, j) if j + 1 == self.encoder.stages[k].layers.len() => Some(k),
            ConvNextPiece::Downsample(k) if self.encoder.stages[k].layers.is_empty() => Some(k),
            _ => None,
        }
    }

    /// One piece: the stem takes `[N, 3, H, W]` pixels, the others channels-last maps.
    pub fn run_piece(&self, piece: ConvNextPiece, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match piece {
            ConvNextPiece::Stem => {
                let patches = kernels::patchify_conv_nhwc(kernels::nchw_to_nhwc(x), &self.embeddings.patch_embeddings);
                norm_map(&self.embeddings.layernorm, patches)
            }
            ConvNextPiece::Downsample(k) => {
                let ds = self.encoder.stages[k].downsampling_layer.as_ref().expect("a stage with downsampling");
                kernels::patchify_conv_nhwc(norm_map(&ds.norm, x), &ds.conv)
            }
            ConvNextPiece::Layer(k, j) => self.encoder.stages[k].layers[j].forward(x),
        }
    }

    /// `ConvNextModel.pooler_output`: LayerNorm of the spatial mean of the last stage, `[N, C_4]`.
    pub fn pool(&self, last_stage: Tensor<B, 4>) -> Tensor<B, 2> {
        let [n, c, _, _] = last_stage.dims();
        let mean = last_stage.flatten::<3>(2, 3).mean_dim(2).reshape([n, c]);
        self.layernorm.forward(mean)
    }
}
