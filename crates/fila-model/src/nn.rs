//! Small building blocks shared by the towers, with parameter names as in PyTorch checkpoints.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation;
use serde::{Deserialize, Serialize};

/// LayerNorm over the last dimension, named `weight`/`bias` like `torch.nn.LayerNorm`.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        Self { weight: Param::from_tensor(Tensor::ones([dim], device)), bias: Param::from_tensor(Tensor::zeros([dim], device)), eps }
    }

    /// `x`: `[..., dim]`, normalised over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let last = D - 1;
        let mean = x.clone().mean_dim(last);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(last);
        let normed = centered / (var + self.eps).sqrt();
        normed * self.weight.val().unsqueeze() + self.bias.val().unsqueeze()
    }

    /// `x`: `[N, C, H, W]`, normalised over channels (ConvNeXt's `channels_first`).
    pub fn forward_channels_first(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let dims = x.dims();
        from_pixel_rows(self.forward(to_pixel_rows(x)), dims)
    }
}

/// `[N, C, H, W]` → a contiguous `[N·H·W, C]` matrix, one row per pixel. Per-pixel work (norms,
/// pointwise layers) runs on it: element-wise ops over a permuted view walk it with strided
/// indexing, several times slower on the CPU backend.
pub fn to_pixel_rows<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 2> {
    let [n, c, h, w] = x.dims();
    x.permute([0, 2, 3, 1]).reshape([n * h * w, c])
}

/// The inverse of [`to_pixel_rows`] for a map of `dims` (`[N, C, H, W]`).
pub fn from_pixel_rows<B: Backend>(rows: Tensor<B, 2>, dims: [usize; 4]) -> Tensor<B, 4> {
    let [n, c, h, w] = dims;
    rows.reshape([n, h, w, c]).permute([0, 3, 1, 2])
}

/// RMSNorm as in `LlamaRMSNorm`: `x / sqrt(mean(x²) + eps) * weight`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        Self { weight: Param::from_tensor(Tensor::ones([dim], device)), eps }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let rms = (x.clone().square().mean_dim(D - 1) + self.eps).sqrt();
        (x / rms) * self.weight.val().unsqueeze()
    }
}

/// Activation functions named as in Hugging Face configs (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, the original CLIP activation.
    QuickGelu,
    /// Exact (erf) GELU.
    #[default]
    Gelu,
    /// `x * sigmoid(x)`.
    Silu,
}

impl Activation {
    pub fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Activation::QuickGelu => crate::kernels::quick_gelu(x),
            Activation::Gelu => crate::kernels::gelu(x),
            Activation::Silu => activation::silu(x),
        }
    }
}

/// A `Linear` layer; Burn stores the weight as `[d_in, d_out]`, the transpose of PyTorch's
/// layout, and the weight loader transposes at the file boundary. A fresh bias starts at zero, as
/// in transformers: Burn's default draws it at random, which adds a large input-independent
/// component to every residual stream of a freshly initialised tower.
pub fn linear<B: Backend>(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Linear<B> {
    let mut layer = LinearConfig::new(d_in, d_out).with_bias(bias).init(device);
    if bias {
        layer.bias = Some(Param::from_tensor(Tensor::zeros([d_out], device)));
    }
    layer
}

/// A linear layer whose weight and bias start at zero (residual branches that must be inert at
/// initialisation).
pub fn zero_linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out).with_initializer(burn::nn::Initializer::Zeros).init(device)
}

/// `[B, T, H*hd]` → `[B, H, T, hd]`.
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, t, d] = x.dims();
    x.reshape([b, t, heads, d / heads]).swap_dims(1, 2)
}

/// `[B, H, T, hd]` → `[B, T, H*hd]`.
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, t, hd] = x.dims();
    x.swap_dims(1, 2).reshape([b, t, h * hd])
}
