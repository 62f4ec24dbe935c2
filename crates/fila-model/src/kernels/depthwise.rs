//! The stride-1 depthwise convolution of ConvNeXt blocks (`groups = channels`, a square kernel,
//! the same padding on every side) on a channels-last map, as a custom autodiff operation over any
//! backend `I`: the path of the CubeCL backends (CUDA, wgpu) under `Autodiff`. Flex in f32 runs
//! its own fused kernel instead ([`super::depthwise_conv2d_nhwc`] routes).
//!
//! Why: burn-cubecl 0.21 (`kernel/conv/`) runs a grouped convolution as follows, with or without
//! its `autotune` feature (on in our `cuda` and `wgpu` builds):
//! - forward: `conv_direct`, one kernel. With autotune, the implicit-GEMM and `im2col_1x1`
//!   candidates refuse `groups ≠ 1` (`ConvSetupError::Groups`), so the direct kernel is the only one
//!   left; without autotune the default strategy is the direct kernel.
//! - input gradient: `conv_data_backward` → `backward_data/fallback.rs`, one transposed convolution
//!   (its direct kernel, or with autotune possibly col2im with one matmul batched over the groups);
//!   the implicit-GEMM candidates refuse groups. A few launches.
//! - weight gradient: `conv_weight_backward` → `backward_weight/fallback.rs`, which for
//!   `groups ≠ 1` loops over the groups on the host (with autotune too: its implicit-GEMM
//!   candidates refuse groups, the fallback is the one left). Per channel: two slices, a whole
//!   convolution of the `[1, H, W, N]` input with the `[1, H', W', N]` output gradient as its
//!   kernel (k² outputs, each a sum of N·H'·W' products; autotuned per shape under autotune), a
//!   transpose and a `slice_assign` into the result. ConvNeXt-L's 36 blocks have 27 072 channels
//!   in all: that many host iterations, and several times as many launches, in every backward pass.
//!
//! Here the forward pass is Burn's convolution (the direct kernel), the input gradient the same
//! depthwise convolution of the output gradient with the kernel turned by 180° (padding
//! `k − 1 − pad`), the bias gradient one sum, and the weight gradient k² shifted products: for tap
//! `(i, j)`, the zero-padded input shifted by `(i, j)` (a slice: a view on CubeCL where its byte
//! offsets are aligned, as with ConvNeXt's channel counts, else a copy) times the output gradient,
//! summed over N, H', W'. About 2k² launches instead of several per channel. Each product is
//! freed before the next: the backward pass holds one padded f32 copy of the input and one product
//! at a time, and the forward pass keeps nothing but the input (only when the weight wants a
//! gradient) and the weight (only when the input does).
//!
//! Precision follows [`autocast`]: under [`Compute::Bf16`] the convolutions run in bf16 and the
//! output is f32; the weight and bias gradients are summed in f32 from the bf16 input the forward
//! pass used; each gradient comes back in its input's dtype.

use crate::autocast::{self, Compute};
use crate::probe::{float, prim, same_float, same_type};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::ops::{ConvOptions, FloatTensor};
use burn::tensor::{DType, FloatDType, TensorMetadata, TensorPrimitive};

/// `conv` (depthwise: groups = channels, stride 1, a square `k×k` kernel, the same padding
/// `pad < k` on every side) on a channels-last map `[N, H, W, C]` → `[N, H + 2·pad − k + 1,
/// W + 2·pad − k + 1, C]`, as the custom operation, when `B`'s float tensors are autodiff tensors
/// over `I` (whatever the checkpointing strategy) and the convolution has that geometry;
/// otherwise `x` comes back. Computes in the current [`autocast`] mode.
pub fn via_autodiff<B: Backend, I: Backend>(x: Tensor<B, 4>, conv: &Conv2d<B>) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [_, _, _, c] = x.dims();
    let Some((k, pad)) = geometry(conv, c) else { return Err(x) };
    if !same_float::<B, Autodiff<I>>() {
        return Err(x);
    }
    let bias = match &conv.bias {
        Some(b) => b.val(),
        None => Tensor::zeros([c], &x.device()),
    };
    let float = |t: FloatTensor<B>| -> FloatTensor<Autodiff<I>> { same_type(t) };
    let spec = Spec { k, pad, compute: autocast::current() };
    let out = autodiff_depthwise::<I>(float(prim(x)), float(prim(conv.weight.val())), float(prim(bias)), spec);
    Ok(Tensor::from_primitive(TensorPrimitive::Float(same_type(out))))
}

/// Everything the operation needs besides its tensors; kept for the backward pass.
/// `(k, pad)` of a depthwise convolution over `c` channels that the depthwise kernels take (stride
/// 1, a square `k×k` kernel, the same padding `pad < k` on every side); `None` for any other.
pub(super) fn geometry<B: Backend>(conv: &Conv2d<B>, c: usize) -> Option<(usize, usize)> {
    let [k, kw] = conv.kernel_size;
    let pad = match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == left && left == bottom && bottom == right => top,
        PaddingConfig2d::Valid => 0,
        _ => return None,
    };
    let depthwise = conv.weight.dims() == [c, 1, k, kw] && conv.groups == c;
    (depthwise && k == kw && conv.stride == [1, 1] && conv.dilation == [1, 1] && pad < k).then_some((k, pad))
}

#[derive(Debug, Clone, Copy)]
struct Spec {
    k: usize,
    pad: usize,
    compute: Compute,
}

/// Stride 1, `pad` zeros on each side, one group per channel.
fn options(channels: usize, pad: usize) -> ConvOptions<2> {
    ConvOptions::new([1, 1], [pad, pad], [1, 1], channels)
}

impl Spec {
    /// `x` in the compute dtype (bf16 under [`Compute::Bf16`], unchanged under f32).
    fn low<I: Backend, const D: usize>(&self, x: Tensor<I, D>) -> Tensor<I, D> {
        match self.compute {
            Compute::F32 => x,
            Compute::Bf16 => x.cast(FloatDType::BF16),
        }
    }
}

/// The convolution on `I`: `x` `[N, H, W, C]`, `weight` `[C, 1, k, k]` and `bias` `[C]`, all in
/// the compute dtype → `[N, H', W', C]` (f32 under bf16 compute, as [`autocast::conv2d`]).
fn forward<I: Backend>(x: Tensor<I, 4>, weight: Tensor<I, 4>, bias: Tensor<I, 1>, spec: Spec) -> Tensor<I, 4> {
    let c = x.dims()[3];
    let y = burn::tensor::module::conv2d(x.permute([0, 3, 1, 2]), weight, Some(bias), options(c, spec.pad)).permute([0, 2, 3, 1]);
    match spec.compute {
        Compute::F32 => y,
        Compute::Bf16 => y.cast(FloatDType::F32),
    }
}

/// `[N, H', W', C]` output gradient → `[N, H, W, C]`: the correlation of the output gradient with
/// the kernel turned by 180°, padded by `k − 1 − pad`, in the compute dtype.
fn input_grad<I: Backend>(grad: Tensor<I, 4>, weight: Tensor<I, 4>, spec: Spec) -> Tensor<I, 4> {
    let c = grad.dims()[3];
    let turned = weight.flip([2, 3]);
    burn::tensor::module::conv2d(spec.low(grad).permute([0, 3, 1, 2]), turned, None, options(c, spec.k - 1 - spec.pad)).permute([0, 2, 3, 1])
}

/// `[C, 1, k, k]` weight gradient from the input `x` `[N, H, W, C]` and the output gradient
/// `[N, H', W', C]`, in f32: tap `(i, j)` is `Σ_{n,y,x} grad[n,y,x,c] · x_padded[n,y+i,x+j,c]`.
fn weight_grad<I: Backend>(x: Tensor<I, 4>, grad: Tensor<I, 4>, spec: Spec) -> Tensor<I, 4> {
    let [n, h, w, c] = x.dims();
    let [_, oh, ow, _] = grad.dims();
    let (k, p) = (spec.k, spec.pad);
    let x = x.cast(FloatDType::F32);
    let grad = grad.cast(FloatDType::F32);
    let padded = if p == 0 { x } else { Tensor::zeros([n, h + 2 * p, w + 2 * p, c], &x.device()).slice_assign([0..n, p..p + h, p..p + w, 0..c], x) };
    let mut taps = Vec::with_capacity(k * k);
    for i in 0..k {
        for j in 0..k {
            let shifted = padded.clone().slice([0..n, i..i + oh, j..j + ow, 0..c]);
            taps.push((grad.clone() * shifted).reshape([n * oh * ow, c]).sum_dim(0));
            // [1, C]
        }
    }
    Tensor::cat(taps, 0).transpose().reshape([c, 1, k, k]) // [k², C] → [C, k²]
}

/// `[C]` bias gradient from the output gradient, in f32.
fn bias_grad<I: Backend>(grad: Tensor<I, 4>) -> Tensor<I, 1> {
    let [n, oh, ow, c] = grad.dims();
    grad.cast(FloatDType::F32).reshape([n * oh * ow, c]).sum_dim(0).reshape([c])
}

/// The backward step of the custom operation; its parents are the input, the weight and the bias.
#[derive(Debug)]
struct DepthwiseBackward;

/// What the backward step keeps: the input in the compute dtype when the weight wants a gradient,
/// the weight when the input does, and the dtype of each input.
#[derive(Debug, Clone)]
struct SavedDepthwise<I: Backend> {
    x: Option<FloatTensor<I>>,
    weight: Option<FloatTensor<I>>,
    dtypes: [DType; 3],
    spec: Spec,
}

impl<I: Backend> Backward<I, 3> for DepthwiseBackward {
    type State = SavedDepthwise<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let s = ops.state;
        let grad = float::<I, 4>(grads.consume::<I>(&ops.node));
        let [px, pw, pb] = ops.parents;
        if let (Some(node), Some(weight)) = (px, s.weight) {
            let dx = input_grad(grad.clone(), float(weight), s.spec).cast(s.dtypes[0]);
            grads.register::<I>(node.id, prim(dx));
        }
        if let (Some(node), Some(x)) = (pw, s.x) {
            let dw = weight_grad(float(x), grad.clone(), s.spec).cast(s.dtypes[1]);
            grads.register::<I>(node.id, prim(dw));
        }
        if let Some(node) = pb {
            grads.register::<I>(node.id, prim(bias_grad(grad).cast(s.dtypes[2])));
        }
    }
}

/// The forward half of the custom operation on `Autodiff<I>` tensors.
fn autodiff_depthwise<I: Backend>(
    x: FloatTensor<Autodiff<I>>,
    weight: FloatTensor<Autodiff<I>>,
    bias: FloatTensor<Autodiff<I>>,
    spec: Spec,
) -> FloatTensor<Autodiff<I>> {
    let dtypes = [x.dtype(), weight.dtype(), bias.dtype()];
    let wants_grad = [&x, &weight].map(|t| !t.node.requirement.is_none());
    let xc = spec.low(float::<I, 4>(x.primitive.clone()));
    let wc = spec.low(float::<I, 4>(weight.primitive.clone()));
    let bc = spec.low(float::<I, 1>(bias.primitive.clone()));
    let out = prim(forward(xc.clone(), wc.clone(), bc, spec));
    // Compute bound: the state is kept, never recomputed, whatever the graph's strategy.
    match DepthwiseBackward.prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone(), bias.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let state = SavedDepthwise { x: wants_grad[1].then(|| prim(xc)), weight: wants_grad[0].then(|| prim(wc)), dtypes, spec };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
