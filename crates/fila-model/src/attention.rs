//! Scaled dot-product attention, the one seam every attention layer of the model goes through.
//!
//! The forward pass runs Burn's `attention` op on the CubeCL backends (CUDA, wgpu), where Burn's
//! autotune (on in both builds) times its flash kernels against its unfused fallback per shape
//! and keeps the fastest (`fila bench` and `metrics.jsonl` list the picks), and, on flex,
//! products by query chunk around a one-pass masked softmax ([`kernels::attention_softmax`]; f32
//! compute). Under `Autodiff`, Burn 0.21 would replace that kernel by plain matmul +
//! softmax and keep several `[B, H, Tq, Tk]` tensors for the backward pass; here a custom
//! autodiff operation keeps only `q`, `k`, `v` and the output, and the backward pass recomputes
//! the attention probabilities one chunk of queries at a time (FlashAttention's backward, with
//! chunks instead of tiles), so its scratch memory is bounded by [`AttentionConfig`].
//!
//! Grouped-query attention (fewer key/value heads than query heads) is native: the backward pass
//! folds each group of query heads onto its shared key/value head instead of repeating `k`/`v`,
//! so their gradients come out summed over the group. Masks are a causal flag plus per-row key
//! padding (from key lengths, or a key-validity mask for batched decoding with gaps), the form
//! fused kernels take, instead of an additive `[B, 1, Tq, Tk]` bias.
//!
//! Why a function and not a backend trait: Burn 0.21 has no way to override one operation of
//! `Autodiff<B>` from outside, and a project backend trait (Burn's custom-kernel examples) would
//! put its bound on every generic model, trainer and CLI function. The model needs the choice in
//! one place only, so [`attention`] picks the custom operation when the tensor primitive is an
//! autodiff tensor over a backend the project runs on (flex, CUDA with the `cuda` feature, wgpu with `wgpu`),
//! the fused kernel alone when there is no autodiff, and plain differentiable ops otherwise.

use crate::autocast::{self, Compute};
use crate::kernels;
use crate::probe::{same_float, same_type};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::ops::{AttentionModuleOptions, BoolTensor, FloatTensor};
use burn::tensor::{FloatDType, TensorPrimitive};

/// Which keys each query may see.
///
/// With `Tq` queries and `Tk` keys, causal masking aligns the queries with the *last* `Tq` keys
/// (query `i` sees keys `0..=Tk - Tq + i`), as in incremental decoding with a cache.
#[derive(Debug, Clone)]
pub struct AttentionMask<B: Backend> {
    causal: bool,
    /// `[B, Tk]`, true where a key is padding and no query may see it.
    padding: Option<Tensor<B, 2, Bool>>,
}

impl<B: Backend> AttentionMask<B> {
    /// Every query sees every key (CLIP).
    pub fn none() -> Self {
        Self { causal: false, padding: None }
    }

    /// Each query sees the keys at or before its own position (Llama).
    pub fn causal() -> Self {
        Self { causal: true, padding: None }
    }

    /// Row `b` has `lengths[b]` real keys followed by padding (right padding); `keys` is `Tk`.
    pub fn with_key_lengths(self, lengths: Tensor<B, 1, Int>, keys: usize) -> Self {
        let [batch] = lengths.dims();
        let positions = Tensor::<B, 1, Int>::arange(0..keys as i64, &lengths.device()).reshape([1, keys]).expand([batch, keys]);
        let padding = positions.greater_equal(lengths.reshape([batch, 1]).expand([batch, keys]));
        self.with_padding(padding)
    }

    /// `valid`: `[B, Tk]`, true for keys that may be seen. For padding that is not a suffix (a
    /// right-padded prompt followed by generated tokens); prefer key lengths where they apply.
    pub fn with_key_valid(self, valid: Tensor<B, 2, Bool>) -> Self {
        self.with_padding(valid.bool_not())
    }

    fn with_padding(mut self, padding: Tensor<B, 2, Bool>) -> Self {
        self.padding = Some(match self.padding.take() {
            Some(previous) => previous.bool_or(padding),
            None => padding,
        });
        self
    }

    pub fn is_causal(&self) -> bool {
        self.causal
    }
}

/// How much scratch memory the backward pass may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionConfig {
    /// Most elements of one `[B, H, chunk, Tk]` score tile in the backward pass; the query chunk
    /// is the largest that fits (at least one query). About five such f32 tiles are alive at once.
    pub score_budget: usize,
}

impl Default for AttentionConfig {
    fn default() -> Self {
        // 2^26 elements: 256 MiB per f32 tile, small next to a GPU's memory and large enough that
        // a 4k-token sequence at 32 heads still takes chunks of hundreds of queries.
        Self { score_budget: 1 << 26 }
    }
}

/// Everything the operation needs besides its tensors; kept for the backward pass.
#[derive(Debug, Clone, Copy)]
struct Spec {
    causal: bool,
    scale: f64,
    compute: Compute,
    score_budget: usize,
}

/// `softmax(q kᵀ / √hd + mask) v` with the default [`AttentionConfig`].
///
/// `q`: `[B, H, Tq, hd]`, `k`/`v`: `[B, Hkv, Tk, hd]` with `H` a multiple of `Hkv` (key/value
/// head `j` serves query heads `j·H/Hkv .. (j+1)·H/Hkv`) → `[B, H, Tq, hd]`. A query that sees
/// no key gets zeros. Products run in the current [`autocast`] mode; softmax in f32.
pub fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: &AttentionMask<B>) -> Tensor<B, 4> {
    attention_with(q, k, v, mask, AttentionConfig::default())
}

/// [`attention`] with an explicit backward-pass memory budget.
pub fn attention_with<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: &AttentionMask<B>, config: AttentionConfig) -> Tensor<B, 4> {
    let [b, h, tq, hd] = q.dims();
    let [bk, hkv, tk, hdk] = k.dims();
    assert_eq!(k.dims(), v.dims(), "attention: keys {:?} and values {:?} differ in shape", k.dims(), v.dims());
    assert!(bk == b && hdk == hd, "attention: queries {:?} and keys {:?} do not match", q.dims(), k.dims());
    assert!(hkv > 0 && h % hkv == 0, "attention: {h} query heads are not a multiple of {hkv} key/value heads");
    assert!(!mask.causal || tq <= tk, "attention: causal masking needs at least as many keys ({tk}) as queries ({tq})");
    if let Some(padding) = &mask.padding {
        assert_eq!(padding.dims(), [b, tk], "attention: key padding must be [batch, keys]");
    }
    let spec = Spec { causal: mask.causal, scale: (hd as f64).powf(-0.5), compute: autocast::current(), score_budget: config.score_budget };
    let padding = mask.padding.clone();

    let args = match via_autodiff::<B, burn::backend::Flex>(q, k, v, padding, spec) {
        Ok(out) => return out,
        Err(args) => args,
    };
    #[cfg(feature = "cuda")]
    let args = match via_autodiff::<B, burn::backend::Cuda>(args.0, args.1, args.2, args.3, spec) {
        Ok(out) => return out,
        Err(args) => args,
    };
    #[cfg(feature = "wgpu")]
    let args = match via_autodiff::<B, burn::backend::Wgpu>(args.0, args.1, args.2, args.3, spec) {
        Ok(out) => return out,
        Err(args) => args,
    };
    let (q, k, v, padding) = args;
    if B::ad_enabled(&q.device()) {
        // An autodiff backend the project does not build: differentiable ops, unfused.
        plain_forward(q, k, v, padding, spec)
    } else {
        fused_forward(q, k, v, padding, spec)
    }
}

type Args<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 2, Bool>>);

/// Runs the custom operation when `B`'s float tensors are autodiff tensors over `I`; otherwise
/// hands the arguments back. The primitive identifies `I` whatever the checkpointing strategy.
fn via_autodiff<B: Backend, I: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    padding: Option<Tensor<B, 2, Bool>>,
    spec: Spec,
) -> Result<Tensor<B, 4>, Args<B>> {
    if !same_float::<B, Autodiff<I>>() {
        return Err((q, k, v, padding));
    }
    let float = |x: Tensor<B, 4>| -> FloatTensor<Autodiff<I>> { same_type(x.into_primitive().tensor()) };
    // Autodiff keeps bool tensors as the inner backend's.
    let padding = padding.map(|p| Tensor::<I, 2, Bool>::from_primitive(same_type::<BoolTensor<B>, BoolTensor<I>>(p.into_primitive())));
    let out = autodiff_attention::<I>(float(q), float(k), float(v), padding, spec);
    Ok(Tensor::from_primitive(TensorPrimitive::Float(same_type(out))))
}

/// `[B, Hkv, T, hd]` → `[B, Hkv·groups, T, hd]`, each key/value head repeated for its group.
fn repeat_heads<B: Backend>(x: Tensor<B, 4>, groups: usize) -> Tensor<B, 4> {
    if groups == 1 {
        return x;
    }
    let [b, h, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, h, groups, t, hd]).reshape([b, h * groups, t, hd])
}

/// The same values with a row-major layout: CUDA's flash kernel indexes `(batch, head)` pairs
/// with the head stride alone, which a head-split view (`[B, T, H, hd]` transposed) breaks.
fn contiguous<B: Backend, K: burn::tensor::BasicOps<B>>(x: Tensor<B, 4, K>) -> Tensor<B, 4, K> {
    let [b, h, t, d] = x.dims();
    x.reshape([b * h * t * d]).reshape([b, h, t, d])
}

/// `[Tq, Tk]` (as `[1, 1, Tq, Tk]`), true where key `j` lies after query `i` shifted by
/// `offset` (`j > i + offset`).
fn causal_block<B: Backend>(tq: usize, tk: usize, offset: i64, device: &B::Device) -> Tensor<B, 4, Bool> {
    let rows = Tensor::<B, 1, Int>::arange(offset..offset + tq as i64, device).reshape([tq, 1]).expand([tq, tk]);
    let cols = Tensor::<B, 1, Int>::arange(0..tk as i64, device).reshape([1, tk]).expand([tq, tk]);
    cols.greater(rows).reshape([1, 1, tq, tk])
}

/// `mask` (`[B, 1, Tq, Tk]`) in the layout the backend's kernel reads: flex broadcasts it over
/// the heads itself (expanding it would cost a strided copy of `[B, H, Tq, Tk]`), CUDA's flash
/// kernel wants one contiguous `[Tq, Tk]` block per (batch, head) pair.
fn kernel_mask<I: Backend>(mask: Tensor<I, 4, Bool>, heads: usize) -> Tensor<I, 4, Bool> {
    let mask = contiguous(mask);
    if same_float::<I, burn::backend::Flex>() {
        return mask;
    }
    let [b, _, tq, tk] = mask.dims();
    contiguous(mask.expand([b, heads, tq, tk]))
}

/// The forward kernel: [`chunked_forward`] on flex in f32, else Burn's fused kernel, for which GQA
/// heads are repeated and the mask materialised (only what the kernel cannot take as its causal
/// flag). Nothing here is kept after the call.
fn fused_forward<I: Backend>(q: Tensor<I, 4>, k: Tensor<I, 4>, v: Tensor<I, 4>, padding: Option<Tensor<I, 2, Bool>>, spec: Spec) -> Tensor<I, 4> {
    if same_float::<I, burn::backend::Flex>() && spec.compute == Compute::F32 {
        return chunked_forward(q, k, v, padding.as_ref(), spec);
    }
    let [b, h, tq, _] = q.dims();
    let [_, hkv, tk, _] = k.dims();
    let device = q.device();
    // The flash kernel's causal flag aligns queries with the first keys, Burn's fallback with
    // the last: with Tq < Tk the causal part goes into the bool mask instead.
    let causal_flag = spec.causal && tq == tk;
    let causal_in_mask = spec.causal && tq < tk && tq > 1;
    let mut mask: Option<Tensor<I, 4, Bool>> = padding.map(|p| p.reshape([b, 1, 1, tk]).expand([b, 1, tq, tk]));
    if causal_in_mask {
        let causal = causal_block::<I>(tq, tk, (tk - tq) as i64, &device).expand([b, 1, tq, tk]);
        mask = Some(match mask {
            Some(m) => m.bool_or(causal),
            None => causal,
        });
    }
    let mask = mask.map(|m| kernel_mask(m, h));
    let (q, k, v) = (contiguous(q), contiguous(repeat_heads(k, h / hkv)), contiguous(repeat_heads(v, h / hkv)));
    // A custom scale would send CUDA to its unfused fallback; the default is 1/√hd, ours.
    let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: causal_flag };
    match spec.compute {
        Compute::F32 => burn::tensor::module::attention(q, k, v, mask, None, options),
        Compute::Bf16 => {
            let low = |x: Tensor<I, 4>| x.cast(FloatDType::BF16);
            burn::tensor::module::attention(low(q), low(k), low(v), mask, None, options).cast(FloatDType::F32)
        }
    }
}

/// Queries per chunk: one `[B, H, chunk, Tk]` score tile within the budget. A causal pass takes at
/// least four chunks (of 64 queries or more): each stops at its last visible key, which skips
/// about 3/8 of the products, where one chunk would compute the whole square.
fn query_chunk(spec: Spec, b: usize, h: usize, tq: usize, tk: usize) -> usize {
    let chunk = (spec.score_budget / (b * h * tk).max(1)).clamp(1, tq.max(1));
    if spec.causal {
        chunk.min(tq.div_ceil(4).max(64))
    } else {
        chunk
    }
}

/// Keys a causal chunk of queries `t0..t0 + c` sees (all `tk` otherwise).
fn chunk_keys(spec: Spec, tq: usize, tk: usize, t0: usize, c: usize) -> usize {
    if spec.causal {
        (tk - tq + t0 + c).min(tk)
    } else {
        tk
    }
}

/// The masked softmax of one chunk's scores `[B, Hkv, G·c, keys]`: the fused kernel on flex, plain
/// ops elsewhere.
#[allow(clippy::too_many_arguments)]
fn chunk_probs<I: Backend>(scores: Tensor<I, 4>, padding: Option<&Tensor<I, 2, Bool>>, spec: Spec, tq: usize, tk: usize, t0: usize, c: usize) -> Tensor<I, 4> {
    let causal_first = spec.causal.then_some(tk - tq + t0);
    kernels::attention_softmax(scores, padding, causal_first, c).unwrap_or_else(|scores| {
        let [b, hkv, gc, keys] = scores.dims();
        let scores = scores.reshape([b, hkv, gc / c, c, keys]);
        let scores = match chunk_mask::<I>(padding, spec, tq, tk, t0, c, keys, &scores.device()) {
            Some(m) => scores.mask_fill(m.expand([b, hkv, gc / c, c, keys]), f32::NEG_INFINITY),
            None => scores,
        };
        safe_softmax(scores).reshape([b, hkv, gc, keys])
    })
}

/// Queries `rows` of `x` (`[B, Hkv, G, Tq, d]`), each group folded into the rows: `[B, Hkv, G·c, d]`.
fn chunk_rows<I: Backend>(x: &Tensor<I, 5>, rows: std::ops::Range<usize>) -> Tensor<I, 4> {
    let [b, hkv, g, _, d] = x.dims();
    let c = rows.len();
    x.clone().slice([0..b, 0..hkv, 0..g, rows, 0..d]).reshape([b, hkv, g * c, d])
}

/// The forward pass one chunk of queries at a time, each group of query heads folded onto its
/// key/value head (no repeated `k`/`v`), with the fused masked softmax: flex's path (its own
/// attention kernel takes the softmax one element at a time through `exp`).
fn chunked_forward<I: Backend>(q: Tensor<I, 4>, k: Tensor<I, 4>, v: Tensor<I, 4>, padding: Option<&Tensor<I, 2, Bool>>, spec: Spec) -> Tensor<I, 4> {
    let [b, h, tq, hd] = q.dims();
    let [_, hkv, tk, _] = k.dims();
    let g = h / hkv;
    let chunk = query_chunk(spec, b, h, tq, tk);
    let q5 = (q * spec.scale).reshape([b, hkv, g, tq, hd]);
    let mut out = Vec::with_capacity(tq.div_ceil(chunk));
    for t0 in (0..tq).step_by(chunk) {
        let c = chunk.min(tq - t0);
        let keys = chunk_keys(spec, tq, tk, t0, c);
        let qc = chunk_rows(&q5, t0..t0 + c);
        let kc = k.clone().slice([0..b, 0..hkv, 0..keys, 0..hd]);
        let vc = v.clone().slice([0..b, 0..hkv, 0..keys, 0..hd]);
        let probs = chunk_probs(autocast::matmul(qc, kc.swap_dims(2, 3)), padding, spec, tq, tk, t0, c);
        out.push(autocast::matmul(probs, vc).reshape([b, hkv, g, c, hd]));
    }
    let out = if out.len() == 1 { out.pop().expect("one chunk") } else { Tensor::cat(out, 3) };
    out.reshape([b, h, tq, hd])
}

/// Mask for queries `t0..t0+c` against keys `0..keys`: `[B, 1, 1, c, keys]`, or `None`.
#[allow(clippy::too_many_arguments)]
fn chunk_mask<I: Backend>(
    padding: Option<&Tensor<I, 2, Bool>>,
    spec: Spec,
    tq: usize,
    tk: usize,
    t0: usize,
    c: usize,
    keys: usize,
    device: &I::Device,
) -> Option<Tensor<I, 5, Bool>> {
    let padding = padding.map(|p| {
        let b = p.dims()[0];
        p.clone().slice([0..b, 0..keys]).reshape([b, 1, 1, 1, keys]).expand([b, 1, 1, c, keys])
    });
    let causal = spec.causal.then(|| causal_block::<I>(c, keys, (tk - tq + t0) as i64, device).reshape([1, 1, 1, c, keys]));
    match (padding, causal) {
        (Some(p), Some(c5)) => {
            let shape = p.dims();
            Some(p.bool_or(c5.expand(shape)))
        }
        (p, c5) => p.or(c5),
    }
}

/// Softmax over the last axis where masked scores are −∞; a row with no visible score gives
/// zeros instead of NaN (the max and the sum are clamped, as in Burn's own fallback).
fn safe_softmax<I: Backend, const D: usize>(scores: Tensor<I, D>) -> Tensor<I, D> {
    let last = D - 1;
    let max = scores.clone().max_dim(last).clamp_min(f32::MIN);
    let exp = (scores - max).exp();
    let sum = exp.clone().sum_dim(last).clamp_min(f32::MIN_POSITIVE);
    exp / sum
}

/// Differentiable attention from plain ops, for autodiff backends without the custom operation.
fn plain_forward<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, padding: Option<Tensor<B, 2, Bool>>, spec: Spec) -> Tensor<B, 4> {
    let [b, h, tq, hd] = q.dims();
    let [_, hkv, tk, _] = k.dims();
    let g = h / hkv;
    // A group of query heads shares one key/value head: fold it into the query axis.
    let qg = q.reshape([b, hkv, g * tq, hd]);
    let scores = autocast::matmul(qg, k.swap_dims(2, 3)).reshape([b, hkv, g, tq, tk]) * spec.scale;
    let scores = match chunk_mask::<B>(padding.as_ref(), spec, tq, tk, 0, tq, tk, &scores.device()) {
        Some(m) => scores.mask_fill(m.expand([b, hkv, g, tq, tk]), f32::NEG_INFINITY),
        None => scores,
    };
    let probs = safe_softmax(scores).reshape([b, hkv, g * tq, tk]);
    autocast::matmul(probs, v).reshape([b, h, tq, hd])
}

/// Gradients of the attention output `d_out` with respect to `q`, `k`, `v`, recomputing the
/// probabilities one chunk of queries at a time. Causal chunks stop at their last visible key.
#[allow(clippy::too_many_arguments)]
fn chunked_backward<I: Backend>(
    q: Tensor<I, 4>,
    k: Tensor<I, 4>,
    v: Tensor<I, 4>,
    out: Tensor<I, 4>,
    d_out: Tensor<I, 4>,
    padding: Option<Tensor<I, 2, Bool>>,
    spec: Spec,
) -> (Tensor<I, 4>, Tensor<I, 4>, Tensor<I, 4>) {
    let [b, h, tq, hd] = q.dims();
    let [_, hkv, tk, _] = k.dims();
    let g = h / hkv;
    let device = q.device();
    let chunk = query_chunk(spec, b, h, tq, tk);
    autocast::with_compute(spec.compute, || {
        // Rowwise dO·O: the softmax Jacobian's correction term, [B, Hkv, G, Tq, 1].
        let delta = (d_out.clone() * out).sum_dim(3).reshape([b, hkv, g, tq, 1]);
        // The scale goes on q (and on the q and k gradients), not on the larger score tiles.
        let q5 = (q * spec.scale).reshape([b, hkv, g, tq, hd]);
        let d_out5 = d_out.reshape([b, hkv, g, tq, hd]);
        let mut dq_chunks = Vec::with_capacity(tq.div_ceil(chunk));
        let mut dk = Tensor::<I, 4>::zeros([b, hkv, tk, hd], &device);
        let mut dv = Tensor::<I, 4>::zeros([b, hkv, tk, hd], &device);
        for t0 in (0..tq).step_by(chunk) {
            let c = chunk.min(tq - t0);
            let rows = t0..t0 + c;
            let keys = chunk_keys(spec, tq, tk, t0, c);
            let (qc, doc, deltac) = (chunk_rows(&q5, rows.clone()), chunk_rows(&d_out5, rows.clone()), chunk_rows(&delta, rows));
            let kc = k.clone().slice([0..b, 0..hkv, 0..keys, 0..hd]);
            let vc = v.clone().slice([0..b, 0..hkv, 0..keys, 0..hd]);

            let scores = autocast::matmul(qc.clone(), kc.clone().swap_dims(2, 3)); // [B, Hkv, G·c, keys]
            let dprobs = autocast::matmul(doc.clone(), vc.swap_dims(2, 3)); // [B, Hkv, G·c, keys]
            let causal_first = spec.causal.then_some(tk - tq + t0);
            // probs, and the gradient of the unscaled scores q·k
            let (probs, dscores) = match kernels::attention_softmax_grad(scores, dprobs, deltac, padding.as_ref(), causal_first, c) {
                Ok(fused) => fused,
                Err([scores, dprobs, deltac]) => {
                    let probs = chunk_probs(scores, padding.as_ref(), spec, tq, tk, t0, c);
                    (probs.clone(), probs * (dprobs - deltac))
                }
            };
            let dv_part = autocast::matmul(probs.swap_dims(2, 3), doc); // [B, Hkv, keys, hd]
            let dq_part = autocast::matmul(dscores.clone(), kc) * spec.scale; // [B, Hkv, G·c, hd]
            let dk_part = autocast::matmul(dscores.swap_dims(2, 3), qc); // [B, Hkv, keys, hd], q already scaled
            dq_chunks.push(dq_part.reshape([b, hkv, g, c, hd]));
            if keys == tk {
                dk = dk + dk_part;
                dv = dv + dv_part;
            } else {
                // The sums are formed before the assignment so that `dk` and `dv` hold the only
                // reference to their buffers and are updated in place (a shared buffer is copied whole).
                let range = [0..b, 0..hkv, 0..keys, 0..hd];
                let dk_sum = dk.clone().slice(range.clone()) + dk_part;
                let dv_sum = dv.clone().slice(range.clone()) + dv_part;
                dk = dk.slice_assign(range.clone(), dk_sum);
                dv = dv.slice_assign(range, dv_sum);
            }
        }
        let dq = Tensor::cat(dq_chunks, 3).reshape([b, h, tq, hd]);
        (dq, dk, dv)
    })
}

/// The backward step of the custom operation; its parents are `q`, `k`, `v`.
#[derive(Debug)]
struct FusedAttentionBackward;

/// What the backward step keeps: the inputs (as checkpointed graph nodes), the output, the key
/// padding and the settings. No `[B, H, Tq, Tk]` tensor.
#[derive(Debug, Clone)]
struct SavedAttention<I: Backend> {
    q: NodeId,
    k: NodeId,
    v: NodeId,
    out: FloatTensor<I>,
    padding: Option<BoolTensor<I>>,
    spec: Spec,
}

impl<I: Backend> Backward<I, 3> for FusedAttentionBackward {
    type State = SavedAttention<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let state = ops.state;
        let float = |x: FloatTensor<I>| Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(x));
        let q = float(checkpointer.retrieve_node_output(state.q));
        let k = float(checkpointer.retrieve_node_output(state.k));
        let v = float(checkpointer.retrieve_node_output(state.v));
        let d_out = float(grads.consume::<I>(&ops.node));
        let padding = state.padding.map(Tensor::<I, 2, Bool>::from_primitive);
        let (dq, dk, dv) = chunked_backward(q, k, v, float(state.out), d_out, padding, state.spec);
        let [pq, pk, pv] = ops.parents;
        for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = parent {
                grads.register::<I>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

/// The forward half of the custom operation on `Autodiff<I>` tensors.
fn autodiff_attention<I: Backend>(
    q: FloatTensor<Autodiff<I>>,
    k: FloatTensor<Autodiff<I>>,
    v: FloatTensor<Autodiff<I>>,
    padding: Option<Tensor<I, 2, Bool>>,
    spec: Spec,
) -> FloatTensor<Autodiff<I>> {
    let inner = |x: &FloatTensor<Autodiff<I>>| Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
    let out = fused_forward(inner(&q), inner(&k), inner(&v), padding.clone(), spec).into_primitive().tensor();
    // The checkpointing strategy only matters for memory-bound operations; this one is compute
    // bound, so any strategy type gives the same graph node.
    match FusedAttentionBackward.prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            let state = SavedAttention {
                q: prep.checkpoint(&q),
                k: prep.checkpoint(&k),
                v: prep.checkpoint(&v),
                out: out.clone(),
                padding: padding.map(Tensor::into_primitive),
                spec,
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    fn spec(causal: bool) -> Spec {
        Spec { causal, scale: 0.5, compute: Compute::F32, score_budget: 40 }
    }

    fn qkv<B: Backend>() -> [Tensor<B, 4>; 3] {
        let device = Default::default();
        let r = |shape: [usize; 4]| Tensor::<B, 4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
        [r([2, 4, 5, 4]), r([2, 2, 5, 4]), r([2, 2, 5, 4])]
    }

    #[test]
    fn the_project_backends_take_the_custom_operation() {
        let _serial = crate::autodiff_lock();
        let run = |spec| {
            let [q, k, v] = qkv::<Flex>();
            via_autodiff::<Flex, Flex>(q, k, v, None, spec).is_ok()
        };
        assert!(!run(spec(false)), "a backend without autodiff has no graph to extend");
        let [q, k, v] = qkv::<Autodiff<Flex>>();
        assert!(via_autodiff::<_, Flex>(q, k, v, None, spec(true)).is_ok());
        let [q, k, v] = qkv::<Autodiff<Flex, BalancedCheckpointing>>();
        assert!(via_autodiff::<_, Flex>(q, k, v, None, spec(true)).is_ok());
    }

    #[test]
    fn the_plain_fallback_equals_the_custom_operation() {
        let _serial = crate::autodiff_lock();
        type A = Autodiff<Flex>;
        let [q, k, v] = qkv::<A>();
        let padding =
            Tensor::<A, 2, Bool>::from_data(TensorData::from([[false, false, false, false, false], [false, false, true, true, true]]), &Default::default());
        let results = [true, false].map(|custom| {
            let (q, k, v) = (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad());
            let out = if custom {
                via_autodiff::<A, Flex>(q.clone(), k.clone(), v.clone(), Some(padding.clone()), spec(true)).unwrap()
            } else {
                plain_forward(q.clone(), k.clone(), v.clone(), Some(padding.clone()), spec(true))
            };
            let grads = (out.clone() * out.clone()).sum().backward();
            [out.inner(), q.grad(&grads).unwrap(), k.grad(&grads).unwrap(), v.grad(&grads).unwrap()]
        });
        let [custom, plain] = results;
        for (a, b) in custom.into_iter().zip(plain) {
            let diff: f32 = (a - b).abs().max().into_scalar();
            assert!(diff < 1e-5, "differs by {diff}");
        }
    }

    #[test]
    fn a_query_that_sees_no_key_gets_zeros_and_zero_gradients() {
        let _serial = crate::autodiff_lock();
        type A = Autodiff<Flex>;
        let [q, k, v] = qkv::<A>();
        let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
        let lengths = Tensor::<A, 1, Int>::from_data(TensorData::from([5i64, 0]), &Default::default());
        let out = attention(q.clone(), k.clone(), v.clone(), &AttentionMask::none().with_key_lengths(lengths, 5));
        let grads = out.clone().sum().backward();
        let row = |x: Tensor<Flex, 4>| x.narrow(0, 1, 1).into_data().to_vec::<f32>().unwrap();
        assert!(row(out.inner()).iter().all(|&x| x == 0.0));
        for grad in [q.grad(&grads).unwrap(), k.grad(&grads).unwrap(), v.grad(&grads).unwrap()] {
            assert!(row(grad).iter().all(|&x| x == 0.0));
        }
    }
}
