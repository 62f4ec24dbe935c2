//! The depthwise convolution of ConvNeXt blocks: the tap-product autodiff operation the CubeCL
//! backends run under autodiff (`kernels::depthwise::via_autodiff`, here called on
//! `Autodiff<Flex>`) and the fused flex kernel against Burn's grouped convolution on the CPU:
//! values and the input, weight and bias gradients, on odd map sizes, a map smaller than the
//! kernel, padding 3 with kernel 7, no padding, padding larger than half the kernel, and batches
//! of 1 to 3.
//!
//! Tolerance 1e-5 in f32, relative to the tensor's largest value where that exceeds 1: the sides
//! sum the same products in different orders (a weight gradient sums up to N·H'·W' = 198 products
//! here). In a `cuda` or `wgpu` build one more test runs the operation and the router on the GPU
//! (`common::Dev`) against the CPU reference, at 1e-4: the GPU sums in other orders again.

mod common;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, Flex};
use burn::module::{Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, TensorData};
use common::random;
use fila_model::autocast::{with_compute, Compute};
use fila_model::kernels::{self, depthwise, reference};

type Cpu = Autodiff<Flex>;

const TOL: f32 = 1e-5;

/// A batch of `n` maps `h×w` with `c` channels, a `k×k` kernel and `pad` zeros on each side.
#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    pad: usize,
}

const CASES: [Case; 5] = [
    // ConvNeXt's kernel on odd sizes.
    Case { n: 2, h: 9, w: 11, c: 16, k: 7, pad: 3 },
    // A map smaller than the kernel: some taps never meet the input.
    Case { n: 3, h: 3, w: 2, c: 5, k: 7, pad: 3 },
    Case { n: 2, h: 4, w: 7, c: 6, k: 3, pad: 1 },
    // No padding: the output is smaller than the input.
    Case { n: 2, h: 5, w: 6, c: 4, k: 3, pad: 0 },
    // Padding k − 1: the output is larger than the input, the input gradient needs no padding.
    Case { n: 1, h: 6, w: 8, c: 3, k: 5, pad: 4 },
];

/// Which inputs are leaves that want a gradient.
#[derive(Debug, Clone, Copy)]
struct Wants {
    input: bool,
    params: bool,
}

const ALL: Wants = Wants { input: true, params: true };

/// The output and the input, weight and bias gradients (`None` where not wanted) of the loss
/// `Σ out · r` (`r` fixed random values) with `conv` one of the convolution paths, on `B`.
fn run<B: AutodiffBackend>(case: Case, wants: Wants, conv: impl Fn(Tensor<B, 4>, &Conv2d<B>) -> Tensor<B, 4>) -> [Option<TensorData>; 4] {
    let Case { n, h, w, c, k, pad } = case;
    let x = random::<B, 4>([n, h, w, c], 1).set_require_grad(wants.input);
    let mut layer: Conv2d<B> =
        Conv2dConfig::new([c, c], [k, k]).with_groups(c).with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad)).init(&Default::default());
    layer.weight = Param::initialized(ParamId::new(), random::<B, 4>([c, 1, k, k], 2).set_require_grad(wants.params));
    layer.bias = Some(Param::initialized(ParamId::new(), random::<B, 1>([c], 3).set_require_grad(wants.params)));
    let out = conv(x.clone(), &layer);
    let r = random::<B, 4>(out.dims(), 4);
    let grads = (out.clone() * r).sum().backward();
    let grad = |t: Tensor<B, 4>| t.grad(&grads).map(Tensor::into_data);
    let bias = layer.bias.as_ref().expect("a bias").val().grad(&grads).map(Tensor::into_data);
    [Some(out.into_data()), grad(x), grad(layer.weight.val()), bias]
}

const NAMES: [&str; 4] = ["output", "input gradient", "weight gradient", "bias gradient"];

/// Largest absolute difference relative to the largest value of `want` where that exceeds 1.
fn relative_diff(got: &TensorData, want: &TensorData) -> f32 {
    assert_eq!(got.shape, want.shape, "shapes differ");
    let (got, want) = (got.to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) / scale
}

fn assert_close(what: &str, case: Case, got: &[Option<TensorData>; 4], want: &[Option<TensorData>; 4], tol: f32) {
    for ((name, g), w) in NAMES.iter().zip(got).zip(want) {
        match (g, w) {
            (Some(g), Some(w)) => {
                let diff = relative_diff(g, w);
                assert!(diff <= tol, "{what}, {name}: differs by {diff} (tolerance {tol}), {case:?}");
            }
            (None, None) => {}
            _ => panic!("{what}, {name}: present on one side only ({}), {case:?}", g.is_some()),
        }
    }
}

fn tap_operation<B: AutodiffBackend, I: Backend>(x: Tensor<B, 4>, conv: &Conv2d<B>) -> Tensor<B, 4> {
    depthwise::via_autodiff::<B, I>(x, conv).unwrap_or_else(|_| panic!("the operation takes autodiff tensors over its backend"))
}

#[test]
fn the_tap_operation_and_the_fused_kernel_match_burns_convolution() {
    let _serial = common::autodiff_lock();
    for case in CASES {
        let want = run::<Cpu>(case, ALL, reference::depthwise_conv2d_nhwc);
        assert_close("tap operation", case, &run::<Cpu>(case, ALL, tap_operation::<Cpu, Flex>), &want, TOL);
        assert_close("fused flex kernel", case, &run::<Cpu>(case, ALL, kernels::depthwise_conv2d_nhwc), &want, TOL);
    }
}

#[test]
fn the_tap_operation_computes_only_the_wanted_gradients() {
    let _serial = common::autodiff_lock();
    let case = CASES[0];
    for wants in [Wants { input: true, params: false }, Wants { input: false, params: true }] {
        let got = run::<Cpu>(case, wants, tap_operation::<Cpu, Flex>);
        assert_eq!(got[1].is_some(), wants.input, "input gradient, {wants:?}");
        assert_eq!(got[2].is_some(), wants.params, "weight gradient, {wants:?}");
        assert_close("tap operation", case, &got, &run::<Cpu>(case, wants, reference::depthwise_conv2d_nhwc), TOL);
    }
}

#[test]
fn the_tap_operation_takes_only_autodiff_tensors_over_its_backend_and_depthwise_convolutions() {
    let _serial = common::autodiff_lock();
    let device = Default::default();
    let depthwise_conv = |c| Conv2dConfig::new([c, c], [7, 7]).with_groups(c).with_padding(PaddingConfig2d::Explicit(3, 3, 3, 3));
    let x = || random::<Flex, 4>([1, 5, 5, 4], 5);
    assert!(depthwise::via_autodiff::<Flex, Flex>(x(), &depthwise_conv(4).init(&device)).is_err(), "no autodiff, no graph to extend");
    let x = Tensor::<Autodiff<Flex, BalancedCheckpointing>, 4>::from_inner(x());
    assert!(depthwise::via_autodiff::<_, Flex>(x.clone(), &depthwise_conv(4).init(&device)).is_ok(), "any checkpointing strategy");
    let dense = Conv2dConfig::new([4, 4], [7, 7]).with_padding(PaddingConfig2d::Explicit(3, 3, 3, 3)).init(&device);
    assert!(depthwise::via_autodiff::<_, Flex>(x.clone(), &dense).is_err(), "groups = 1 is not depthwise");
    let strided = depthwise_conv(4).with_stride([2, 2]).init(&device);
    assert!(depthwise::via_autodiff::<_, Flex>(x, &strided).is_err(), "stride 2");
}

#[test]
fn under_bf16_compute_the_tap_operation_returns_f32_near_the_f32_values() {
    let _serial = common::autodiff_lock();
    // bf16 keeps 8 bits of mantissa: the output and the input gradient (sums of up to 49 bf16
    // products) came within 3.8e-3 of f32 relative to their largest value, the weight gradient
    // (f32 sums over the bf16 input) within 1.3e-3; the bias gradient is the f32 sum of the f32
    // output gradient.
    for case in [CASES[0], CASES[1]] {
        let exact = run::<Cpu>(case, ALL, reference::depthwise_conv2d_nhwc);
        let low = with_compute(Compute::Bf16, || run::<Cpu>(case, ALL, tap_operation::<Cpu, Flex>));
        for (name, data) in NAMES.iter().zip(&low) {
            assert_eq!(data.as_ref().expect("every gradient").dtype, DType::F32, "{name} comes back in f32");
        }
        let bias_diff = relative_diff(low[3].as_ref().unwrap(), exact[3].as_ref().unwrap());
        assert!(bias_diff <= TOL, "bias gradient: differs by {bias_diff}");
        let output_diff = relative_diff(low[0].as_ref().unwrap(), exact[0].as_ref().unwrap());
        assert!(output_diff > 1e-4, "bf16 was not used: the output differs by {output_diff} only");
        assert_close("bf16 tap operation", case, &low, &exact, 1e-2);
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[test]
fn on_the_gpu_the_tap_operation_and_the_router_match_the_cpu() {
    use common::Dev;
    type Gpu = Autodiff<Dev>;
    let _serial = common::autodiff_lock();
    for case in CASES {
        let want = run::<Cpu>(case, ALL, reference::depthwise_conv2d_nhwc);
        assert_close("tap operation", case, &run::<Gpu>(case, ALL, tap_operation::<Gpu, Dev>), &want, 1e-4);
        assert_close("router", case, &run::<Gpu>(case, ALL, kernels::depthwise_conv2d_nhwc), &want, 1e-4);
    }
}
