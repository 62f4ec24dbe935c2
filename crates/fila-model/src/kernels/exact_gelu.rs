//! Exact (erf) GELU as a custom autodiff operation over any backend `I`: the path of the CubeCL
//! backends (CUDA, wgpu) under `Autodiff`. Flex runs its own fused kernel instead
//! ([`super::gelu`] routes).
//!
//! Why: Burn 0.21's `gelu` computes the exact function forward, but its default backward
//! (`burn-backend` `ActivationOps::gelu_backward`, which burn-cubecl does not override) is the
//! derivative of the tanh approximation. Against the exact derivative (what PyTorch's
//! `nn.GELU()` and transformers' ConvNeXt use) that is off by up to 1.7e-3 per element at
//! |x| ≈ 2, which the ConvNeXt parity tests see on wgpu. Here the backward is
//! `Φ(x) + x·φ(x)` from the saved input: `0.5·(1 + erf(x/√2)) + x·exp(−x²/2)/√(2π)`.

use crate::probe::{float, prim, same_float, same_type};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::ops::FloatTensor;

/// GELU of `x` through [`ExactGeluBackward`] when `B` is `Autodiff<I>`; `Err(x)` otherwise.
pub fn via_autodiff<B: Backend, I: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if !same_float::<B, Autodiff<I>>() {
        return Err(x);
    }
    let x: FloatTensor<Autodiff<I>> = same_type(prim(x));
    let out = autodiff_gelu::<I, D>(x);
    Ok(float(same_type(out)))
}

/// `dGELU/dx = Φ(x) + x·φ(x)`, times the output gradient.
pub fn gelu_grad<I: Backend, const D: usize>(x: Tensor<I, D>, grad: Tensor<I, D>) -> Tensor<I, D> {
    let cdf = (x.clone() * std::f64::consts::FRAC_1_SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5);
    let pdf = (x.clone().powi_scalar(2) * -0.5).exp().mul_scalar(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    grad * (cdf + x * pdf)
}

#[derive(Debug)]
struct ExactGeluBackward<const D: usize>;

impl<I: Backend, const D: usize> Backward<I, 1> for ExactGeluBackward<D> {
    type State = FloatTensor<I>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = float::<I, D>(grads.consume::<I>(&ops.node));
        if let [Some(node)] = ops.parents {
            let dx = gelu_grad(float::<I, D>(ops.state), grad);
            grads.register::<I>(node.id, prim(dx));
        }
    }
}

fn autodiff_gelu<I: Backend, const D: usize>(x: FloatTensor<Autodiff<I>>) -> FloatTensor<Autodiff<I>> {
    let input = x.primitive.clone();
    let out = prim(activation::gelu(float::<I, D>(input.clone())));
    match ExactGeluBackward::<D>.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(input, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
