//! Low-rank adapters (LoRA, Hu et al., 2021) for linear layers: `y = x·W + b + s·(x·Aᵀ)·Bᵀ`
//! with `A: [r, in]`, `B: [out, r]` and `s = alpha / r`, the layout and initialisation of PEFT
//! (`lora_A` Kaiming-uniform with `a = √5`, i.e. uniform in `±1/√in`; `lora_B` zeros, so a fresh
//! adapter leaves the layer unchanged). Merging adds `s·B·A` to the weight (in Burn's `[in, out]`
//! layout: `s·Aᵀ·Bᵀ`), after which the layer alone computes what layer plus adapter did.

use crate::autocast;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::Distribution;

/// One adapter: `lora_a` `[r, in]`, `lora_b` `[out, r]`, scaled by `scale = alpha / r`.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    pub lora_a: Param<Tensor<B, 2>>,
    pub lora_b: Param<Tensor<B, 2>>,
    pub scale: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// A fresh adapter of rank `r` for a layer `in → out` (PEFT's initialisation).
    pub fn new(d_in: usize, d_out: usize, r: usize, alpha: f64, device: &B::Device) -> Self {
        assert!(r > 0, "LoRA rank must be at least 1");
        let bound = 1.0 / (d_in as f64).sqrt();
        Self {
            lora_a: Param::from_tensor(Tensor::random([r, d_in], Distribution::Uniform(-bound, bound), device)),
            lora_b: Param::from_tensor(Tensor::zeros([d_out, r], device)),
            scale: alpha / r as f64,
        }
    }

    pub fn rank(&self) -> usize {
        self.lora_a.dims()[0]
    }

    /// `s·(x·Aᵀ)·Bᵀ` for `x: [..., in]` (two thin products, in the current compute dtype).
    pub fn delta<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let x = x.reshape([rows, dims[D - 1]]);
        let down = autocast::matmul(x, self.lora_a.val().transpose());
        let up = autocast::matmul(down, self.lora_b.val().transpose()).mul_scalar(self.scale);
        let mut out = dims;
        out[D - 1] = up.dims()[1];
        up.reshape(out)
    }

    /// `s·Aᵀ·Bᵀ`, the adapter as a change of a Burn `[in, out]` weight.
    pub fn weight_delta(&self) -> Tensor<B, 2> {
        self.lora_a.val().transpose().matmul(self.lora_b.val().transpose()).mul_scalar(self.scale)
    }

    /// `layer(x)` plus this adapter's update of it.
    pub fn forward<const D: usize>(&self, layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
        autocast::linear(layer, x.clone()) + self.delta(x)
    }

    /// `layer` with the adapter added into its weight.
    pub fn merge_into(&self, layer: Linear<B>) -> Linear<B> {
        let weight = layer.weight.val() + self.weight_delta();
        Linear { weight: Param::from_tensor(weight), bias: layer.bias }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::LinearConfig;

    type A = Autodiff<Flex>;

    fn max_diff<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The adapter's output and gradients (input, layer weight, A, B) equal those of the explicit
    /// `x·(W + s·(B·A)ᵀ) + b` within 1e-5.
    #[test]
    fn gradients_equal_the_explicit_formulation() {
        let _lock = crate::autodiff_lock();
        let device = Default::default();
        let layer: Linear<A> = LinearConfig::new(24, 16).init(&device);
        let mut adapter = LoraAdapter::<A>::new(24, 16, 4, 8.0, &device);
        // A non-zero B, as after some training (a fresh one has A's gradient identically zero).
        adapter.lora_b = Param::from_tensor(Tensor::random([16, 4], Distribution::Normal(0.0, 0.5), &device));
        let x_data = Tensor::<Flex, 3>::random([2, 5, 24], Distribution::Normal(0.0, 1.0), &device);
        let probe = Tensor::<Flex, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);

        let x = Tensor::<A, 3>::from_inner(x_data.clone()).require_grad();
        let y = adapter.forward(&layer, x.clone());
        let grads = (y.clone() * Tensor::from_inner(probe.clone())).sum().backward();
        let got = (y.inner(), x.grad(&grads).unwrap(), layer.weight.grad(&grads).unwrap(), adapter.lora_a.grad(&grads).unwrap(), adapter.lora_b.grad(&grads).unwrap());

        // The explicit formulation over fresh leaves holding the same values.
        let leaf = |t: Tensor<A, 2>| Tensor::<A, 2>::from_inner(t.inner()).require_grad();
        let (w, a, b) = (leaf(layer.weight.val()), leaf(adapter.lora_a.val()), leaf(adapter.lora_b.val()));
        let bias = layer.bias.as_ref().unwrap().val();
        let x2 = Tensor::<A, 3>::from_inner(x_data).require_grad();
        let full = w.clone() + b.clone().matmul(a.clone()).transpose().mul_scalar(adapter.scale);
        let y2 = x2.clone().matmul(full.unsqueeze()) + bias.unsqueeze();
        let grads2 = (y2.clone() * Tensor::from_inner(probe)).sum().backward();
        assert!(max_diff(got.0, y2.inner()) < 1e-5);
        assert!(max_diff(got.1, x2.grad(&grads2).unwrap()) < 1e-5);
        assert!(max_diff(got.2, w.grad(&grads2).unwrap()) < 1e-5);
        assert!(max_diff(got.3, a.grad(&grads2).unwrap()) < 1e-5);
        assert!(max_diff(got.4, b.grad(&grads2).unwrap()) < 1e-5);
    }

    #[test]
    fn a_merged_layer_computes_layer_plus_adapter_and_a_fresh_adapter_changes_nothing() {
        let device = Default::default();
        let layer: Linear<Flex> = LinearConfig::new(12, 8).init(&device);
        let x = Tensor::<Flex, 2>::random([3, 12], Distribution::Normal(0.0, 1.0), &device);
        let mut adapter = LoraAdapter::<Flex>::new(12, 8, 2, 4.0, &device);
        assert_eq!(adapter.rank(), 2);
        assert_eq!(max_diff(adapter.forward(&layer, x.clone()), layer.forward(x.clone())), 0.0);
        adapter.lora_b = Param::from_tensor(Tensor::random([8, 2], Distribution::Normal(0.0, 1.0), &device));
        let with_adapter = adapter.forward(&layer, x.clone());
        let merged = adapter.merge_into(layer);
        assert!(max_diff(merged.forward(x), with_adapter) < 1e-5);
    }
}
