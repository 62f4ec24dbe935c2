//! Exact GELU's gradient on every path: the custom operation the CubeCL backends run under
//! autodiff (`kernels::exact_gelu::via_autodiff`, here called on `Autodiff<Flex>`) against the
//! fused flex kernel, whose values and gradients the parity tests check against transformers. In
//! a `cuda` or `wgpu` build one more test runs the router on the GPU (`common::Dev`) against the
//! CPU: Burn's own GELU backward there is the tanh approximation's derivative, 1.7e-3 off.

mod common;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use fila_model::kernels::{self, exact_gelu};

type Cpu = Autodiff<Flex>;

/// Inputs over [-6, 6] (where the derivative changes fastest) and an output gradient.
fn inputs<B: Backend>() -> (Tensor<B, 2>, Tensor<B, 2>) {
    let x = common::random::<B, 2>([37, 65], 1).mul_scalar(3.0);
    let g = common::random::<B, 2>([37, 65], 2);
    (x, g)
}

/// `(gelu(x), d(Σ gelu(x)·g)/dx)` through `f`.
fn value_and_grad<B: AutodiffBackend>(f: impl Fn(Tensor<B, 2>) -> Tensor<B, 2>) -> (TensorData, TensorData) {
    let (x, g) = inputs::<B>();
    let x = x.require_grad();
    let y = f(x.clone());
    let grads = (y.clone() * g).sum().backward();
    (y.into_data(), x.grad(&grads).unwrap().into_data())
}

fn max_diff(a: &TensorData, b: &TensorData) -> f32 {
    let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn the_custom_operation_matches_the_fused_kernel() {
    let _serial = common::autodiff_lock();
    let (want_y, want_dx) = value_and_grad::<Cpu>(kernels::gelu);
    let (y, dx) = value_and_grad::<Cpu>(|x| exact_gelu::via_autodiff::<Cpu, Flex, 2>(x).unwrap());
    assert!(max_diff(&y, &want_y) <= 1e-6, "values: {}", max_diff(&y, &want_y));
    assert!(max_diff(&dx, &want_dx) <= 2e-6, "gradients: {}", max_diff(&dx, &want_dx));
    // The derivative of the tanh approximation, as Burn's default backward computes it, is what
    // this operation replaces: it differs by more than the tolerance above.
    let (x, g) = inputs::<Flex>();
    let c = (x.clone().powi_scalar(3) * 0.044715 + x.clone()) * (2.0 / std::f64::consts::PI).sqrt();
    let t = c.tanh();
    let sech2 = t.clone().powi_scalar(2).neg().add_scalar(1.0);
    let inner = (x.clone().powi_scalar(2) * (3.0 * 0.044715) + 1.0) * (2.0 / std::f64::consts::PI).sqrt();
    let approx = (t.add_scalar(1.0) * 0.5 + x * sech2 * inner * 0.5) * g;
    assert!(max_diff(&approx.into_data(), &want_dx) > 1e-3);
}

#[test]
fn only_autodiff_tensors_over_its_backend_are_taken() {
    let (x, _) = inputs::<Flex>();
    assert!(exact_gelu::via_autodiff::<Flex, Flex, 2>(x).is_err());
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[test]
fn on_the_gpu_the_router_matches_the_cpu() {
    let _serial = common::autodiff_lock();
    let (want_y, want_dx) = value_and_grad::<Cpu>(kernels::gelu);
    let (y, dx) = value_and_grad::<common::DevAutodiff>(kernels::gelu);
    assert!(max_diff(&y, &want_y) <= 1e-5, "values: {}", max_diff(&y, &want_y));
    assert!(max_diff(&dx, &want_dx) <= 1e-5, "gradients: {}", max_diff(&dx, &want_dx));
}
