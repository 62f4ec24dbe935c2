//! The compute dtype of the model's matrix products and convolutions.
//!
//! Burn has no automatic mixed precision, so the model routes every matrix product and
//! convolution through this module. Weights stay in f32: they are the master copy that the
//! optimizer updates. Under [`Compute::Bf16`] each product casts its operands to bf16, computes
//! in bf16 and returns f32, so layer norms, RMS norms, softmax, activations, residual sums and
//! the loss stay in f32. Gradients flow back through the casts and reach the weights in f32.
//!
//! The mode is a per-thread setting held for the duration of a closure ([`with_compute`]), like
//! PyTorch's `autocast` context; code outside such a closure computes in f32.

use burn::module::{Param, ParamId};
use burn::nn::conv::Conv2d;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::FloatDType;
use std::cell::Cell;

/// Which dtype matrix products and convolutions compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compute {
    #[default]
    F32,
    Bf16,
}

thread_local! {
    static COMPUTE: Cell<Compute> = const { Cell::new(Compute::F32) };
}

/// The mode of the calling thread.
pub fn current() -> Compute {
    COMPUTE.with(Cell::get)
}

/// Runs `f` with matrix products and convolutions in `mode`; the previous mode is restored
/// afterwards, also when `f` panics.
pub fn with_compute<R>(mode: Compute, f: impl FnOnce() -> R) -> R {
    struct Restore(Compute);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPUTE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(COMPUTE.with(|c| c.replace(mode)));
    f()
}

fn low<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.cast(FloatDType::BF16)
}

fn high<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.cast(FloatDType::F32)
}

/// `layer(x)` in the current compute dtype; returns f32. `x`: `[…, in]` → `[…, out]`.
pub fn linear<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    if D > 2 {
        // One `[rows, in] @ [in, out]` product: Burn's weight gradient for a batched input is a
        // product per batch entry and a sum over a `[batch, in, out]` temporary.
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product();
        let y = linear(layer, x.reshape([rows, dims[D - 1]]));
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        return y.reshape(out);
    }
    match current() {
        Compute::F32 => layer.forward(x),
        Compute::Bf16 => {
            let bias = layer.bias.as_ref().map(|b| low(b.val()));
            high(burn::tensor::module::linear(low(x), low(layer.weight.val()), bias))
        }
    }
}

/// `layer(x)` in the current compute dtype; returns f32.
pub fn conv2d<B: Backend>(layer: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    match current() {
        Compute::F32 => layer.forward(x),
        Compute::Bf16 => {
            // A bf16 view of the layer: the same geometry, its parameters cast (not leaves, so
            // their gradients go on to the f32 weights).
            let view = Conv2d {
                weight: Param::initialized(ParamId::new(), low(layer.weight.val())),
                bias: layer.bias.as_ref().map(|b| Param::initialized(ParamId::new(), low(b.val()))),
                stride: layer.stride,
                kernel_size: layer.kernel_size,
                dilation: layer.dilation,
                groups: layer.groups,
                padding: layer.padding.clone(),
            };
            high(view.forward(low(x)))
        }
    }
}

/// `a @ b` in the current compute dtype; returns f32.
pub fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    match current() {
        Compute::F32 => a.matmul(b),
        Compute::Bf16 => high(low(a).matmul(low(b))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_is_scoped_and_restored_after_a_panic() {
        assert_eq!(current(), Compute::F32);
        with_compute(Compute::Bf16, || {
            assert_eq!(current(), Compute::Bf16);
            with_compute(Compute::F32, || assert_eq!(current(), Compute::F32));
            assert_eq!(current(), Compute::Bf16);
        });
        assert_eq!(current(), Compute::F32);
        let caught = std::panic::catch_unwind(|| with_compute(Compute::Bf16, || panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(current(), Compute::F32);
    }
}
