//! Fused CPU kernels for the operations the ConvNeXt branch, CVFM and the projector spend their
//! time on, as custom autodiff operations on the flex backend: exact GELU and CLIP's quick GELU,
//! LayerNorm over the last axis, the stride-1 depthwise convolution on a channels-last map, the
//! patchify rearrangement of a stride-`r` `r×r` convolution, and the NCHW → NHWC transpose; and the LLM's head split with
//! RoPE and its MLP's SwiGLU product. [`attention_softmax`] and [`attention_softmax_grad`] are plain
//! kernels of the attention passes.
//!
//! Why: Burn 0.21 builds these from many single-threaded element-wise ops (GELU's erf through
//! libm, LayerNorm's seven passes, the depthwise convolution's gradients through a generic
//! transposed convolution) and walks permuted views element by element. Each kernel here is one
//! multi-threaded pass forward and one backward, on contiguous rows.
//!
//! Like [`crate::attention`], each function checks what the generic backend is: on `Autodiff<Flex>`
//! it records its own backward step, on plain `Flex` it runs the forward kernel, and on any other
//! backend (CUDA, wgpu) or dtype it computes the same function from Burn's ops. Tests compare both.
//! The depthwise convolution is the exception: on the CubeCL backends under autodiff it runs the
//! operation of [`depthwise`], whose weight gradient Burn would compute one channel at a time.

pub mod depthwise;
pub mod exact_gelu;
mod math;

use crate::autocast::{self, Compute};
use crate::probe::{float, prim, same_float, same_type};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::{Autodiff, Flex};
use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{activation, Bytes, DType, TensorMetadata};
use std::fmt::Debug;

pub use math::Depthwise;
use math::{Rope, ScoreTile};

/// Exact (erf) GELU, element-wise: the fused kernel on flex, the operation of [`exact_gelu`]
/// (exact backward) on the CubeCL backends under autodiff, Burn's `gelu` otherwise.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let x = match run::<B, _, 1>(math::Activation::Gelu, [prim(x)]) {
        Ok(y) => return float(y),
        Err([x]) => float(x),
    };
    #[cfg(feature = "cuda")]
    let x = match exact_gelu::via_autodiff::<B, burn::backend::Cuda, D>(x) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(feature = "wgpu")]
    let x = match exact_gelu::via_autodiff::<B, burn::backend::Wgpu, D>(x) {
        Ok(y) => return y,
        Err(x) => x,
    };
    reference::gelu(x)
}

/// CLIP's quick GELU `x · σ(1.702 x)`, element-wise.
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match run::<B, _, 1>(math::Activation::QuickGelu, [prim(x)]) {
        Ok(y) => float(y),
        Err([x]) => reference::quick_gelu(float(x)),
    }
}

/// The SwiGLU product `silu(gate) · up` of a Llama MLP, element-wise (same shapes).
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    assert_eq!(gate.dims(), up.dims(), "swiglu: gate and up differ in shape");
    match run::<B, _, 2>(SwigluKernel, [prim(gate), prim(up)]) {
        Ok(y) => float(y),
        Err([gate, up]) => reference::swiglu(float(gate), float(up)),
    }
}

/// LayerNorm over the last axis (biased variance, as `torch.nn.LayerNorm`).
pub fn layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, bias: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    match run::<B, _, 3>(LayerNormKernel { eps: eps as f32 }, [prim(x), prim(weight), prim(bias)]) {
        Ok(y) => float(y),
        Err([x, weight, bias]) => reference::layer_norm(float(x), float(weight), float(bias), eps),
    }
}

/// `conv` (a depthwise convolution: groups = channels, stride 1, square kernel, symmetric
/// padding) on a channels-last map `[N, H, W, C]` → `[N, H', W', C]`: the fused kernel on flex in
/// f32, the tap-product operation of [`depthwise`] on the CubeCL backends under autodiff, Burn's
/// convolution otherwise.
pub fn depthwise_conv2d_nhwc<B: Backend>(x: Tensor<B, 4>, conv: &Conv2d<B>) -> Tensor<B, 4> {
    let [_, _, _, c] = x.dims();
    let [k, kw] = conv.kernel_size;
    assert_eq!(conv.weight.dims(), [c, 1, k, kw], "depthwise_conv2d_nhwc: the convolution is not depthwise over {c} channels");
    let Some((k, pad)) = depthwise::geometry(conv, c) else { return reference::depthwise_conv2d_nhwc(x, conv) };
    // Under bf16 compute the convolution runs in bf16, as every convolution does (autocast).
    let x = if autocast::current() == Compute::F32 {
        let bias = match &conv.bias {
            Some(b) => b.val(),
            None => Tensor::zeros([c], &x.device()),
        };
        match run::<B, _, 3>(DepthwiseKernel { k, pad }, [prim(x), prim(conv.weight.val()), prim(bias)]) {
            Ok(y) => return float(y),
            Err([x, _, _]) => float(x),
        }
    } else {
        x
    };
    #[cfg(feature = "cuda")]
    let x = match depthwise::via_autodiff::<B, burn::backend::Cuda>(x, conv) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(feature = "wgpu")]
    let x = match depthwise::via_autodiff::<B, burn::backend::Wgpu>(x, conv) {
        Ok(y) => return y,
        Err(x) => x,
    };
    reference::depthwise_conv2d_nhwc(x, conv)
}

/// `[N, H, W, C]` → `[N, H/r, W/r, C·r·r]`, each output pixel holding its `r×r` input patch in
/// the order of a PyTorch conv weight's `[in, r, r]` axes.
pub fn space_to_depth<B: Backend>(x: Tensor<B, 4>, r: usize) -> Tensor<B, 4> {
    let [_, h, w, _] = x.dims();
    assert!(h % r == 0 && w % r == 0, "space_to_depth: {h}x{w} is not a multiple of {r}");
    if r == 1 {
        return x;
    }
    match run::<B, _, 1>(SpaceToDepthKernel { r }, [prim(x)]) {
        Ok(y) => float(y),
        Err([x]) => reference::space_to_depth(float(x), r),
    }
}

/// A convolution whose kernel equals its stride (a patchify layer: ConvNeXt's stem and
/// downsampling, CVFM's alignment) on a channels-last map: `[N, H, W, C]` → `[N, H/r, W/r, C']`.
pub fn patchify_conv_nhwc<B: Backend>(x: Tensor<B, 4>, conv: &Conv2d<B>) -> Tensor<B, 4> {
    let [c_out, c_in, r, rw] = conv.weight.dims();
    assert!(
        r == rw
            && conv.stride == [r, r]
            && conv.groups == 1
            && conv.dilation == [1, 1]
            && matches!(conv.padding, PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0)),
        "patchify_conv_nhwc: the convolution's kernel must equal its stride, without padding or groups"
    );
    let patches = space_to_depth(x, r);
    let [n, h, w, _] = patches.dims();
    let weight = conv.weight.val().reshape([c_out, c_in * r * r]).transpose(); // [in·r·r, out]
    let y = autocast::matmul(patches.reshape([n * h * w, c_in * r * r]), weight);
    let y = match &conv.bias {
        Some(b) => y + b.val().unsqueeze(),
        None => y,
    };
    y.reshape([n, h, w, c_out])
}

/// A query or key projection `[B, T, H·hd]` split into `heads` heads with RoPE applied:
/// `[B, H, T, hd]`, `x·cos + rotate_half(x)·sin` (Hugging Face's layout), `cos`/`sin`
/// `[R, 1, T, hd]` with `R` 1 or `B`. The tables are constants: they get no gradient.
pub fn rope_heads<B: Backend>(x: Tensor<B, 3>, heads: usize, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, t, d] = x.dims();
    let [rows, _, tt, hd] = cos.dims();
    assert!(d == heads * hd && hd % 2 == 0 && tt == t && (rows == 1 || rows == b), "rope_heads: x {:?} and tables {:?} do not match", x.dims(), cos.dims());
    assert_eq!(cos.dims(), sin.dims(), "rope_heads: cos and sin differ in shape");
    let kernel = RopeKernel(Rope { b, t, heads, hd, table_rows: rows });
    match run::<B, _, 3>(kernel, [prim(x), prim(cos), prim(sin)]) {
        Ok(y) => float(y),
        Err([x, cos, sin]) => reference::rope_heads(float(x), heads, float(cos), float(sin)),
    }
}

/// The masked softmax of one query chunk of attention on a plain flex backend: from the scores
/// `s` (`[B, Hkv, G·c, keys]`, query `row % c` of the chunk in each row), `p = softmax(masked s)`
/// in one pass per row instead of a mask, a masked fill, max, exp, sum and division. Keys are
/// masked by `padding` (`[B, Tk]`, true = padding) and causally (query `i` sees keys
/// `0..=causal_first + i`); a row that sees no key gets zeros. Any other backend or dtype gets its
/// scores back.
pub fn attention_softmax<B: Backend>(
    scores: Tensor<B, 4>,
    padding: Option<&Tensor<B, 2, Bool>>,
    causal_first: Option<usize>,
    queries: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let ([scores], tile, padding) = score_tiles([scores], padding, causal_first, queries).map_err(|[scores]| scores)?;
    let probs = math::attention_softmax(&tile, values(&scores), padding.as_ref().map(|(f, s)| (f.as_slice(), *s)));
    Ok(score_tensor(probs, &scores))
}

/// What [`attention_softmax_grad`] returns: the probabilities and the score gradient.
pub type ProbsAndScoreGrad<B> = (Tensor<B, 4>, Tensor<B, 4>);

/// [`attention_softmax`] in the backward pass, with the score gradient `p · (dp − delta)` from the
/// probability gradient `dp` (shaped as the scores) and `delta` (`[B, Hkv, G·c, 1]`, rowwise dO·O),
/// in the same pass per row. Any other backend or dtype gets its inputs back.
pub fn attention_softmax_grad<B: Backend>(
    scores: Tensor<B, 4>,
    dprobs: Tensor<B, 4>,
    delta: Tensor<B, 4>,
    padding: Option<&Tensor<B, 2, Bool>>,
    causal_first: Option<usize>,
    queries: usize,
) -> Result<ProbsAndScoreGrad<B>, [Tensor<B, 4>; 3]> {
    let ([scores, dprobs, delta], tile, padding) = score_tiles([scores, dprobs, delta], padding, causal_first, queries)?;
    let (probs, dscores) =
        math::attention_softmax_grad(&tile, values(&scores), values(&dprobs), values(&delta), padding.as_ref().map(|(f, s)| (f.as_slice(), *s)));
    Ok((score_tensor(probs, &scores), score_tensor(dscores, &scores)))
}

/// Key padding flags (nonzero = padding) and their row stride.
type PaddingFlags = (Vec<u8>, usize);

/// The contiguous flex tensors of an attention softmax call (the first one the scores) and the
/// geometry of its tile, or the tensors back when `B` is not flex or one is not `f32`.
#[allow(clippy::type_complexity)]
fn score_tiles<B: Backend, const N: usize>(
    tensors: [Tensor<B, 4>; N],
    padding: Option<&Tensor<B, 2, Bool>>,
    causal_first: Option<usize>,
    queries: usize,
) -> Result<([FlexTensor; N], ScoreTile, Option<PaddingFlags>), [Tensor<B, 4>; N]> {
    if !same_float::<B, Flex>() || tensors.iter().any(|t| t.dtype() != DType::F32) {
        return Err(tensors);
    }
    let [_, hkv, rows, keys] = tensors[0].dims();
    let padding = padding.map(|p| {
        let stride = p.dims()[1];
        let flags: Vec<u8> = p.clone().into_data().iter::<bool>().map(u8::from).collect();
        (flags, stride)
    });
    let tensors = tensors.map(|t| same_type::<FloatTensor<B>, FlexTensor>(prim(t)).to_contiguous());
    Ok((tensors, ScoreTile { rows_per_batch: hkv * rows, queries, keys, causal_first }, padding))
}

/// `values` as a tensor of the scores' shape.
fn score_tensor<B: Backend>(values: Vec<f32>, scores: &FlexTensor) -> Tensor<B, 4> {
    float::<B, 4>(same_type::<FlexTensor, FloatTensor<B>>(flex(values, &dims(scores))))
}

/// `[N, C, H, W]` → a contiguous `[N, H, W, C]`.
pub fn nchw_to_nhwc<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    match run::<B, _, 1>(TransposeKernel, [prim(x)]) {
        Ok(y) => float(y),
        Err([x]) => reference::nchw_to_nhwc(float(x)),
    }
}

/// The same functions from Burn's ops: the path of every other backend and dtype, and what the
/// tests compare the kernels with.
pub mod reference {
    use super::*;

    pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
        activation::gelu(x)
    }

    pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
        x.clone() * activation::sigmoid(x * math::QUICK_GELU_SCALE)
    }

    pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
        activation::silu(gate) * up
    }

    pub fn layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, bias: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
        let last = D - 1;
        let mean = x.clone().mean_dim(last);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(last);
        let normed = centered / (var + eps).sqrt();
        normed * weight.unsqueeze() + bias.unsqueeze()
    }

    pub fn depthwise_conv2d_nhwc<B: Backend>(x: Tensor<B, 4>, conv: &Conv2d<B>) -> Tensor<B, 4> {
        autocast::conv2d(conv, x.permute([0, 3, 1, 2])).permute([0, 2, 3, 1])
    }

    pub fn space_to_depth<B: Backend>(x: Tensor<B, 4>, r: usize) -> Tensor<B, 4> {
        let [n, h, w, c] = x.dims();
        x.reshape([n * h / r, r, w / r, r, c]).permute([0, 2, 4, 1, 3]).reshape([n, h / r, w / r, c * r * r])
    }

    pub fn nchw_to_nhwc<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
        x.permute([0, 2, 3, 1])
    }

    pub fn rope_heads<B: Backend>(x: Tensor<B, 3>, heads: usize, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, t, d] = x.dims();
        let hd = d / heads;
        let x = x.reshape([b, t, heads, hd]).swap_dims(1, 2);
        let first = x.clone().slice([0..b, 0..heads, 0..t, 0..hd / 2]);
        let second = x.clone().slice([0..b, 0..heads, 0..t, hd / 2..hd]);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * cos + rotated * sin
    }
}

// ---- Routing: which backend the generic `B` is ----------------------------------------------

/// One custom operation: `N` float inputs, one output, forward and backward on contiguous
/// flex tensors of `f32`.
trait Kernel<const N: usize>: Debug + Clone + Send + 'static {
    /// What the backward step keeps.
    type Saved: Clone + Send + Debug + 'static;
    /// `save`: a backward step will follow (something upstream wants a gradient).
    fn forward(&self, inputs: [FlexTensor; N], save: bool) -> (FlexTensor, Option<Self::Saved>);
    /// Gradients of the inputs marked in `wanted`, from the output gradient `grad`.
    fn backward(&self, saved: Self::Saved, grad: FlexTensor, wanted: [bool; N]) -> [Option<FlexTensor>; N];
}

/// Runs `kernel` when `B` is flex (with or without autodiff) and every input is `f32`; otherwise
/// hands the inputs back for the caller's fallback.
fn run<B: Backend, K: Kernel<N>, const N: usize>(kernel: K, inputs: [FloatTensor<B>; N]) -> Result<FloatTensor<B>, [FloatTensor<B>; N]> {
    if inputs.iter().any(|t| t.dtype() != DType::F32) {
        return Err(inputs);
    }
    if same_float::<B, Autodiff<Flex>>() {
        // The autodiff primitive is the same type whatever the checkpointing strategy.
        Ok(same_type(autodiff_forward(kernel, inputs.map(same_type::<FloatTensor<B>, FloatTensor<Autodiff<Flex>>>))))
    } else if same_float::<B, Flex>() {
        let inner = inputs.map(|t| same_type::<FloatTensor<B>, FlexTensor>(t).to_contiguous());
        Ok(same_type(kernel.forward(inner, false).0))
    } else {
        Err(inputs)
    }
}

#[derive(Debug)]
struct KernelStep<K>(K);

impl<K: Kernel<N>, const N: usize> Backward<Flex, N> for KernelStep<K> {
    type State = K::Saved;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let wanted = ops.parents.each_ref().map(Option::is_some);
        let computed = self.0.backward(ops.state, grad, wanted);
        for (parent, g) in ops.parents.into_iter().zip(computed) {
            if let (Some(node), Some(g)) = (parent, g) {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

/// The forward half of a kernel on `Autodiff<Flex>` tensors.
fn autodiff_forward<K: Kernel<N>, const N: usize>(kernel: K, inputs: [FloatTensor<Autodiff<Flex>>; N]) -> FloatTensor<Autodiff<Flex>> {
    let nodes = inputs.each_ref().map(|t| t.node.clone());
    let inner = inputs.map(|t| t.primitive.to_contiguous());
    // Compute bound: the state is kept, never recomputed, whatever the graph's strategy.
    match KernelStep(kernel.clone()).prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (out, saved) = kernel.forward(inner, true);
            prep.finish(saved.expect("a tracked kernel saves its state"), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(kernel.forward(inner, false).0),
    }
}

// ---- Tensor helpers -------------------------------------------------------------------------

fn values(t: &FlexTensor) -> &[f32] {
    t.storage::<f32>()
}

fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

fn flex(values: Vec<f32>, dims: &[usize]) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(values), Layout::contiguous(dims.to_vec().into()), DType::F32)
}

// ---- The kernels ----------------------------------------------------------------------------

/// An element-wise activation keeps its input for the backward step.
impl Kernel<1> for math::Activation {
    type Saved = FlexTensor;

    fn forward(&self, [x]: [FlexTensor; 1], save: bool) -> (FlexTensor, Option<FlexTensor>) {
        let y = flex(math::Activation::forward(*self, values(&x)), &dims(&x));
        (y, save.then_some(x))
    }

    fn backward(&self, x: FlexTensor, grad: FlexTensor, _: [bool; 1]) -> [Option<FlexTensor>; 1] {
        [Some(flex(math::Activation::backward(*self, values(&x), values(&grad)), &dims(&x)))]
    }
}

#[derive(Debug, Clone)]
struct SwigluKernel;

impl Kernel<2> for SwigluKernel {
    type Saved = (FlexTensor, FlexTensor);

    fn forward(&self, [gate, up]: [FlexTensor; 2], save: bool) -> (FlexTensor, Option<Self::Saved>) {
        let y = flex(math::swiglu(values(&gate), values(&up)), &dims(&gate));
        (y, save.then_some((gate, up)))
    }

    fn backward(&self, (gate, up): Self::Saved, grad: FlexTensor, wanted: [bool; 2]) -> [Option<FlexTensor>; 2] {
        let (dg, du) = math::swiglu_grad(values(&gate), values(&up), values(&grad));
        let shape = dims(&gate);
        [wanted[0].then(|| flex(dg, &shape)), wanted[1].then(|| flex(du, &shape))]
    }
}

#[derive(Debug, Clone)]
struct LayerNormKernel {
    eps: f32,
}

#[derive(Debug, Clone)]
struct LayerNormSaved {
    x: FlexTensor,
    weight: FlexTensor,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl Kernel<3> for LayerNormKernel {
    type Saved = LayerNormSaved;

    fn forward(&self, [x, weight, bias]: [FlexTensor; 3], save: bool) -> (FlexTensor, Option<LayerNormSaved>) {
        let shape = dims(&x);
        let c = *shape.last().expect("rank ≥ 1");
        assert_eq!((dims(&weight), dims(&bias)), (vec![c], vec![c]), "layer_norm: weight and bias must be [{c}]");
        let (y, mean, rstd) = math::layer_norm(values(&x), c, values(&weight), values(&bias), self.eps);
        (flex(y, &shape), save.then(|| LayerNormSaved { x, weight, mean, rstd }))
    }

    fn backward(&self, s: LayerNormSaved, grad: FlexTensor, _: [bool; 3]) -> [Option<FlexTensor>; 3] {
        let shape = dims(&s.x);
        let c = *shape.last().expect("rank ≥ 1");
        let (dx, dw, db) = math::layer_norm_grad(values(&s.x), values(&grad), c, values(&s.weight), &s.mean, &s.rstd);
        [Some(flex(dx, &shape)), Some(flex(dw, &[c])), Some(flex(db, &[c]))]
    }
}

#[derive(Debug, Clone)]
struct DepthwiseKernel {
    k: usize,
    pad: usize,
}

#[derive(Debug, Clone)]
struct DepthwiseSaved {
    geo: Depthwise,
    x: FlexTensor,
    weight: FlexTensor,
}

impl Kernel<3> for DepthwiseKernel {
    type Saved = DepthwiseSaved;

    fn forward(&self, [x, weight, bias]: [FlexTensor; 3], save: bool) -> (FlexTensor, Option<DepthwiseSaved>) {
        let [n, h, w, c]: [usize; 4] = dims(&x).try_into().expect("rank 4");
        let geo = Depthwise { n, h, w, c, k: self.k, pad: self.pad };
        let y = math::depthwise_forward(&geo, values(&x), values(&weight), Some(values(&bias)));
        (flex(y, &[n, geo.out_h(), geo.out_w(), c]), save.then_some(DepthwiseSaved { geo, x, weight }))
    }

    fn backward(&self, s: DepthwiseSaved, grad: FlexTensor, wanted: [bool; 3]) -> [Option<FlexTensor>; 3] {
        let geo = s.geo;
        let dx = wanted[0].then(|| flex(math::depthwise_input_grad(&geo, values(&grad), values(&s.weight)), &[geo.n, geo.h, geo.w, geo.c]));
        let (dw, db) = if wanted[1] || wanted[2] {
            let (dw, db) = math::depthwise_weight_grad(&geo, values(&s.x), values(&grad));
            (Some(flex(dw, &[geo.c, 1, geo.k, geo.k])), Some(flex(db, &[geo.c])))
        } else {
            (None, None)
        };
        [dx, dw, db]
    }
}

#[derive(Debug, Clone)]
struct SpaceToDepthKernel {
    r: usize,
}

impl Kernel<1> for SpaceToDepthKernel {
    type Saved = [usize; 4];

    fn forward(&self, [x]: [FlexTensor; 1], _save: bool) -> (FlexTensor, Option<[usize; 4]>) {
        let [n, h, w, c]: [usize; 4] = dims(&x).try_into().expect("rank 4");
        let r = self.r;
        let y = math::space_to_depth(values(&x), n, h, w, c, r);
        (flex(y, &[n, h / r, w / r, c * r * r]), Some([n, h, w, c]))
    }

    fn backward(&self, [n, h, w, c]: [usize; 4], grad: FlexTensor, _: [bool; 1]) -> [Option<FlexTensor>; 1] {
        [Some(flex(math::depth_to_space(values(&grad), n, h, w, c, self.r), &[n, h, w, c]))]
    }
}

#[derive(Debug, Clone)]
struct TransposeKernel;

impl Kernel<1> for TransposeKernel {
    type Saved = [usize; 4];

    fn forward(&self, [x]: [FlexTensor; 1], _save: bool) -> (FlexTensor, Option<[usize; 4]>) {
        let [n, c, h, w]: [usize; 4] = dims(&x).try_into().expect("rank 4");
        (flex(math::transpose(values(&x), n, c, h * w), &[n, h, w, c]), Some([n, c, h, w]))
    }

    fn backward(&self, [n, c, h, w]: [usize; 4], grad: FlexTensor, _: [bool; 1]) -> [Option<FlexTensor>; 1] {
        [Some(flex(math::transpose(values(&grad), n, h * w, c), &[n, c, h, w]))]
    }
}

#[derive(Debug, Clone)]
struct RopeKernel(Rope);

impl Kernel<3> for RopeKernel {
    /// The cos and sin tables.
    type Saved = [FlexTensor; 2];

    fn forward(&self, [x, cos, sin]: [FlexTensor; 3], save: bool) -> (FlexTensor, Option<[FlexTensor; 2]>) {
        let geo = &self.0;
        let y = math::rope_heads(geo, values(&x), values(&cos), values(&sin));
        (flex(y, &[geo.b, geo.heads, geo.t, geo.hd]), save.then_some([cos, sin]))
    }

    fn backward(&self, [cos, sin]: [FlexTensor; 2], grad: FlexTensor, wanted: [bool; 3]) -> [Option<FlexTensor>; 3] {
        let geo = &self.0;
        let dx = wanted[0].then(|| flex(math::rope_heads_grad(geo, values(&grad), values(&cos), values(&sin)), &[geo.b, geo.t, geo.heads * geo.hd]));
        [dx, None, None]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::{Param, ParamId};
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    type A = Autodiff<Flex>;

    /// Uniform values in [-2, 2) from `seed`, drawn from a generator of its own: the backend's
    /// global one is shared with the other tests of this binary running at the same time.
    fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<A, D> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                // xorshift64*
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
                bits as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    /// Largest absolute difference, relative to the largest value when that exceeds 1.
    fn assert_close<const D: usize>(what: &str, got: Tensor<Flex, D>, want: Tensor<Flex, D>, tol: f32) {
        assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
        let scale = want.clone().abs().max().into_scalar().max(1.0);
        let diff = (got - want).abs().max().into_scalar() / scale;
        assert!(diff <= tol, "{what}: differs by {diff} (relative), tolerance {tol}");
    }

    /// Runs `f` on leaf copies of `inputs` with the kernel and with the reference, backpropagates
    /// `Σ out · weights` (weights fixed at random) and compares outputs and every input gradient.
    fn check<const D: usize, const N: usize>(what: &str, inputs: [Tensor<A, D>; N], tol: f32, f: impl Fn(bool, [Tensor<A, D>; N]) -> Tensor<A, D>) {
        let results = [true, false].map(|kernel| {
            let leaves = inputs.clone().map(|t| t.detach().require_grad());
            let out = f(kernel, leaves.clone());
            let weights = random(out.dims(), 99).detach();
            let grads = (out.clone() * weights).sum().backward();
            (out.inner(), leaves.map(|l| l.grad(&grads).expect("gradient")))
        });
        let [(out_k, grads_k), (out_r, grads_r)] = results;
        assert_close(&format!("{what} output"), out_k, out_r, tol);
        for (i, (gk, gr)) in grads_k.into_iter().zip(grads_r).enumerate() {
            assert_close(&format!("{what} gradient {i}"), gk, gr, tol);
        }
    }

    #[test]
    fn gelu_matches_burn() {
        let _serial = crate::autodiff_lock();
        // Wide inputs reach both tails of the erf approximation.
        let x = random([3, 1000], 1) * 4.0;
        check("gelu", [x], 1e-6, |kernel, [x]| if kernel { gelu(x) } else { reference::gelu(x) });
    }

    #[test]
    fn quick_gelu_matches_burn() {
        let _serial = crate::autodiff_lock();
        // Wide inputs reach both signs and the saturated tails of the sigmoid.
        let x = random([3, 1000], 7) * 8.0;
        check("quick_gelu", [x], 1e-5, |kernel, [x]| if kernel { quick_gelu(x) } else { reference::quick_gelu(x) });
    }

    #[test]
    fn swiglu_matches_burn() {
        let _serial = crate::autodiff_lock();
        // Wide inputs reach both signs and the saturated tails of the sigmoid.
        let g = random([3, 1000], 5) * 12.0;
        let u = random([3, 1000], 6) * 2.0;
        check("swiglu", [g, u], 1e-5, |kernel, [g, u]| if kernel { swiglu(g, u) } else { reference::swiglu(g, u) });
    }

    #[test]
    fn layer_norm_matches_burn() {
        let _serial = crate::autodiff_lock();
        for c in [5, 48, 67] {
            let x = random([2, 9, c], 2) * 3.0 + 1.0;
            let w = random([c], 3).reshape([1, 1, c]);
            let b = random([c], 4).reshape([1, 1, c]);
            check("layer_norm", [x, w, b], 2e-5, |kernel, [x, w, b]| {
                let (w, b) = (w.reshape([c]), b.reshape([c]));
                if kernel {
                    layer_norm(x, w, b, 1e-6)
                } else {
                    reference::layer_norm(x, w, b, 1e-6)
                }
            });
        }
    }

    #[test]
    fn depthwise_convolution_matches_burn() {
        let _serial = crate::autodiff_lock();
        for (k, pad, c, h, w) in [(7, 3, 16, 9, 11), (3, 1, 5, 4, 6), (7, 3, 8, 3, 2), (3, 0, 4, 5, 5)] {
            let conv: Conv2d<A> =
                Conv2dConfig::new([c, c], [k, k]).with_groups(c).with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad)).init(&Default::default());
            let x = random([2, h, w, c], 5);
            let weight = conv.weight.val();
            let bias = conv.bias.as_ref().unwrap().val().reshape([1, 1, 1, c]);
            check("depthwise", [x, weight, bias], 1e-5, |kernel, [x, weight, bias]| {
                let mut conv = conv.clone();
                // Not leaves: the gradients flow on to the test's inputs.
                conv.weight = Param::initialized(ParamId::new(), weight);
                conv.bias = Some(Param::initialized(ParamId::new(), bias.reshape([c])));
                if kernel {
                    depthwise_conv2d_nhwc(x, &conv)
                } else {
                    reference::depthwise_conv2d_nhwc(x, &conv)
                }
            });
        }
    }

    #[test]
    fn space_to_depth_and_transpose_match_burn() {
        let _serial = crate::autodiff_lock();
        for r in [2, 4] {
            let x = random([2, 4 * r, 3 * r, 5], 6);
            check("space_to_depth", [x], 0.0, |kernel, [x]| if kernel { space_to_depth(x, r) } else { reference::space_to_depth(x, r) });
        }
        let x = random([2, 3, 37, 41], 7);
        check("nchw_to_nhwc", [x], 0.0, |kernel, [x]| if kernel { nchw_to_nhwc(x) } else { reference::nchw_to_nhwc(x) });
    }

    #[test]
    fn rope_matches_burn() {
        let _serial = crate::autodiff_lock();
        // One table row for the batch (training) and one per batch row (padded decoding).
        for (rows, heads, hd) in [(1, 3, 8), (2, 2, 6)] {
            let (b, t) = (2, 5);
            let cos = random([rows, 1, t, hd], 10).detach();
            let sin = random([rows, 1, t, hd], 11).detach();
            let x = random([b, t, heads * hd], 12);
            check("rope", [x], 1e-5, |kernel, [x]| {
                let y = if kernel { rope_heads(x, heads, cos.clone(), sin.clone()) } else { reference::rope_heads(x, heads, cos.clone(), sin.clone()) };
                y.reshape([b, heads, t * hd])
            });
        }
    }

    #[test]
    fn attention_softmax_grad_matches_burn() {
        // Tk = 19 keys (two groups of eight lanes and three more), a chunk of c = 3 queries
        // (causal: query i sees keys 0..=2 + i or 0..=9 + i), 2 groups; batch row 1 has keys 0..3,
        // 5..7, 12 and 18 padded, so with the first causal mask its first query sees none.
        let _serial = crate::autodiff_lock();
        let (b, hkv, g, c, keys) = (2, 2, 2, 3, 19);
        let r = |seed| {
            Flex::seed(&Default::default(), seed);
            Tensor::<Flex, 4>::random([b, hkv, g * c, keys], Distribution::Uniform(-3.0, 3.0), &Default::default())
        };
        let (scores, dprobs) = (r(20), r(21));
        let delta = r(22).slice([0..b, 0..hkv, 0..g * c, 0..1]);
        let padded = |j: usize| [0, 1, 2, 5, 6, 12, 18].contains(&j);
        let padding = Tensor::<Flex, 2, Bool>::from_data(TensorData::new([[false; 19], std::array::from_fn(padded)].concat(), [b, keys]), &Default::default());
        let none = Tensor::<Flex, 2, Bool>::from_data(TensorData::new(vec![false; b * keys], [b, keys]), &Default::default());
        for (causal_first, pad) in [None, Some(2), Some(9)].into_iter().flat_map(|f| [(f, None), (f, Some(&padding))]) {
            let forward = attention_softmax(scores.clone(), pad, causal_first, c).expect("flex takes the kernel");
            let (probs, dscores) = attention_softmax_grad(scores.clone(), dprobs.clone(), delta.clone(), pad, causal_first, c).expect("flex takes the kernel");
            let mut mask = pad.unwrap_or(&none).clone().reshape([b, 1, 1, keys]).expand([b, hkv, g * c, keys]);
            if let Some(first) = causal_first {
                let rows = Tensor::<Flex, 1, Int>::arange(first as i64..(first + c) as i64, &Default::default()).reshape([1, c, 1]).expand([g, c, keys]);
                let cols = Tensor::<Flex, 1, Int>::arange(0..keys as i64, &Default::default()).reshape([1, 1, keys]).expand([g, c, keys]);
                mask = mask.bool_or(cols.greater(rows).reshape([1, 1, g * c, keys]).expand([b, hkv, g * c, keys]));
            }
            let masked = scores.clone().mask_fill(mask, f32::NEG_INFINITY);
            let max = masked.clone().max_dim(3).clamp_min(f32::MIN);
            let exp = (masked - max).exp();
            let want = exp.clone() / exp.sum_dim(3).clamp_min(f32::MIN_POSITIVE);
            let want_grad = want.clone() * (dprobs.clone() - delta.clone());
            for (what, got, want) in [("probs", probs, want.clone()), ("forward probs", forward, want), ("score gradient", dscores, want_grad)] {
                let diff: f32 = (got - want).abs().max().into_scalar();
                assert!(diff <= 1e-5, "{what} ({causal_first:?}, padding {}) differs by {diff}", pad.is_some());
            }
        }
    }

    #[test]
    fn patchify_equals_the_strided_convolution() {
        let _serial = crate::autodiff_lock();
        let device = Default::default();
        for r in [1, 2, 4] {
            let conv: Conv2d<A> = Conv2dConfig::new([6, 7], [r, r]).with_stride([r, r]).init(&device);
            let x = random([2, 6, 4 * r, 2 * r], 8);
            let want = conv.forward(x.clone()).permute([0, 2, 3, 1]);
            let got = patchify_conv_nhwc(nchw_to_nhwc(x), &conv);
            assert_close("patchify", got.inner(), want.inner(), 1e-5);
        }
    }
}
