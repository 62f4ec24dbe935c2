//! The attention seam against attention written out by hand (repeat the key/value heads, matmul,
//! additive −∞ mask, softmax, matmul): values and the gradients of q, k and v, on random shapes
//! with odd lengths, grouped-query heads, key padding and causal masks, under both autodiff
//! checkpointing strategies and with query chunks small enough to split every sequence.
//!
//! Tolerance 1e-5 in f32 on the CPU, relative to the tensor's largest value where that exceeds 1:
//! both sides compute the same sums in a different order (a fused kernel, chunked recomputation),
//! and a key/value gradient sums over every query of its group (up to 4 heads × 33 queries here).
//! With `--features cuda` the same tests run on the GPU (CUDA's flash kernel forward) at 1e-2:
//! Burn's CUDA matmuls round f32 operands as TF32 does.

mod common;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use common::{random, Dev};
use fila_model::attention::{attention, attention_with, AttentionConfig, AttentionMask};
use fila_model::autocast::{with_compute, Compute};

#[cfg(not(feature = "cuda"))]
const TOL: f32 = 1e-5;
#[cfg(feature = "cuda")]
const TOL: f32 = 1e-2;

/// Which keys each query may see in a case.
#[derive(Clone, Debug)]
enum Keys {
    All,
    /// Right padding: row b has `lengths[b]` real keys.
    Lengths(Vec<usize>),
    /// Per-row key validity with gaps (a padded prompt, then generated tokens).
    Valid(Vec<Vec<bool>>),
}

#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
    causal: bool,
    padding: Keys,
}

impl Case {
    fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        let causal_ok = !self.causal || j <= self.keys - self.queries + i;
        let key_ok = match &self.padding {
            Keys::All => true,
            Keys::Lengths(lengths) => j < lengths[b],
            Keys::Valid(valid) => valid[b][j],
        };
        causal_ok && key_ok
    }

    fn mask<B: Backend>(&self) -> AttentionMask<B> {
        let device = Default::default();
        let mask = if self.causal { AttentionMask::causal() } else { AttentionMask::none() };
        match &self.padding {
            Keys::All => mask,
            Keys::Lengths(lengths) => {
                let lengths: Vec<i64> = lengths.iter().map(|&l| l as i64).collect();
                mask.with_key_lengths(Tensor::from_data(TensorData::new(lengths, [self.batch]), &device), self.keys)
            }
            Keys::Valid(valid) => {
                let flat: Vec<bool> = valid.iter().flatten().copied().collect();
                mask.with_key_valid(Tensor::from_data(TensorData::new(flat, [self.batch, self.keys]), &device))
            }
        }
    }

    /// The additive bias of the explicit formula: 0 where visible, −∞ elsewhere, `[B, 1, Tq, Tk]`.
    fn bias<B: Backend>(&self) -> Tensor<B, 4> {
        let mut values = Vec::with_capacity(self.batch * self.queries * self.keys);
        for b in 0..self.batch {
            for i in 0..self.queries {
                for j in 0..self.keys {
                    values.push(if self.visible(b, i, j) { 0.0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        Tensor::from_data(TensorData::new(values, [self.batch, 1, self.queries, self.keys]), &Default::default())
    }

    fn inputs<B: Backend>(&self, seed: u64) -> [Tensor<B, 4>; 4] {
        let q = random([self.batch, self.heads, self.queries, self.head_dim], seed);
        let k = random([self.batch, self.kv_heads, self.keys, self.head_dim], seed + 1);
        let v = random([self.batch, self.kv_heads, self.keys, self.head_dim], seed + 2);
        // Weights of the scalar loss, so that the output gradient is not uniform.
        let w = random([self.batch, self.heads, self.queries, self.head_dim], seed + 3);
        [q, k, v, w]
    }
}

/// Attention written out: key/value heads repeated, full score matrix, additive bias, softmax.
fn explicit<B: Backend>(case: &Case, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    let groups = case.heads / case.kv_heads;
    let repeat = |x: Tensor<B, 4>| {
        let [b, h, t, d] = x.dims();
        x.unsqueeze_dim::<5>(2).expand([b, h, groups, t, d]).reshape([b, h * groups, t, d])
    };
    let scale = (case.head_dim as f64).powf(-0.5);
    let scores = q.matmul(repeat(k).swap_dims(2, 3)) * scale + case.bias::<B>();
    softmax(scores, 3).matmul(repeat(v))
}

fn max_diff<const D: usize>(a: Tensor<Dev, D>, b: Tensor<Dev, D>) -> f32 {
    let a = a.into_data().to_vec::<f32>().unwrap();
    let b = b.into_data().to_vec::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Output and the gradients of q, k, v for one way of computing attention.
fn run<A: AutodiffBackend<InnerBackend = Dev>>(
    case: &Case,
    seed: u64,
    f: impl Fn(Tensor<A, 4>, Tensor<A, 4>, Tensor<A, 4>) -> Tensor<A, 4>,
) -> [Tensor<Dev, 4>; 4] {
    let [q, k, v, w] = case.inputs::<A>(seed);
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let out = f(q.clone(), k.clone(), v.clone());
    let grads = (out.clone() * w).sum().backward();
    [out.inner(), q.grad(&grads).unwrap(), k.grad(&grads).unwrap(), v.grad(&grads).unwrap()]
}

fn check_case<A: AutodiffBackend<InnerBackend = Dev>>(case: &Case, seed: u64, config: AttentionConfig) {
    let expected = run::<A>(case, seed, |q, k, v| explicit(case, q, k, v));
    let got = run::<A>(case, seed, |q, k, v| attention_with(q, k, v, &case.mask(), config));
    for (name, (e, g)) in ["output", "dq", "dk", "dv"].iter().zip(expected.into_iter().zip(got)) {
        assert_eq!(e.dims(), g.dims(), "{name} shape, {case:?}");
        let scale = e.clone().abs().max().into_scalar().max(1.0);
        let diff = max_diff(e, g);
        assert!(diff <= TOL * scale, "{name} differs by {diff} (largest value {scale}, budget {}), {case:?}", config.score_budget);
    }
}

/// Each case at the default budget (one chunk) and at budgets giving chunks of 1 and 4 queries.
fn check<A: AutodiffBackend<InnerBackend = Dev>>(case: Case, seed: u64) {
    let per_query = case.batch * case.heads * case.keys;
    for budget in [AttentionConfig::default().score_budget, per_query, 4 * per_query] {
        check_case::<A>(&case, seed, AttentionConfig { score_budget: budget });
    }
}

fn lengths(seq: usize) -> Keys {
    // Three rows: full, a few short, a single key.
    Keys::Lengths(vec![seq, seq.saturating_sub(3).max(1), 1])
}

#[test]
fn causal_with_key_lengths_and_grouped_heads_equals_explicit_attention() {
    let _serial = common::autodiff_lock();
    let mut seed = 10;
    for seq in [1, 7, 33] {
        for kv_heads in [4, 2, 1] {
            let case = Case { batch: 3, heads: 4, kv_heads, queries: seq, keys: seq, head_dim: 8, causal: true, padding: lengths(seq) };
            check::<Autodiff<Dev>>(case, seed);
            seed += 10;
        }
    }
}

#[test]
fn bidirectional_with_and_without_padding_equals_explicit_attention() {
    let _serial = common::autodiff_lock();
    let mut seed = 500;
    for seq in [1, 7, 33] {
        for (kv_heads, padding) in [(4, Keys::All), (2, lengths(seq)), (1, Keys::All)] {
            let case = Case { batch: 3, heads: 4, kv_heads, queries: seq, keys: seq, head_dim: 16, causal: false, padding };
            check::<Autodiff<Dev>>(case, seed);
            seed += 10;
        }
    }
}

#[test]
fn cached_decoding_shapes_equal_explicit_attention() {
    let _serial = common::autodiff_lock();
    // Fewer queries than keys: causal masking aligns the queries with the last keys, and the
    // key mask has gaps (a right-padded prompt of width 5, then generated tokens).
    let valid = |prompt: usize, total: usize| (0..total).map(|j| j < prompt || j >= 5).collect::<Vec<_>>();
    for (queries, keys) in [(1, 9), (3, 9), (9, 9)] {
        let padding = Keys::Valid(vec![valid(5, keys), valid(2, keys), valid(4, keys)]);
        let case = Case { batch: 3, heads: 4, kv_heads: 2, queries, keys, head_dim: 8, causal: true, padding };
        check::<Autodiff<Dev>>(case, 900 + queries as u64);
    }
}

#[test]
fn balanced_checkpointing_gives_the_same_gradients() {
    let _serial = common::autodiff_lock();
    // The trainer's `--checkpointing` backend: a different strategy type, the same operation.
    let case = Case { batch: 3, heads: 4, kv_heads: 2, queries: 33, keys: 33, head_dim: 8, causal: true, padding: lengths(33) };
    check::<Autodiff<Dev, BalancedCheckpointing>>(case, 1234);
}

#[test]
fn inputs_upstream_of_the_attention_receive_gradients_through_it() {
    let _serial = common::autodiff_lock();
    // q, k, v made by tracked ops (as projections make them): gradients reach the leaf.
    type A = Autodiff<Dev>;
    let case = Case { batch: 2, heads: 4, kv_heads: 2, queries: 7, keys: 7, head_dim: 8, causal: true, padding: Keys::Lengths(vec![7, 4]) };
    let run = |fused: bool| {
        let x = random::<A, 4>([2, 4, 7, 8], 77).require_grad();
        let q = x.clone() * 0.5;
        let k = (x.clone().slice([0..2, 0..2, 0..7, 0..8]) + 1.0).exp() * 0.1;
        let v = x.clone().slice([0..2, 2..4, 0..7, 0..8]).tanh();
        let out = if fused { attention(q, k, v, &case.mask()) } else { explicit(&case, q, k, v) };
        let grads = (out * random::<A, 4>([2, 4, 7, 8], 78)).sum().backward();
        x.grad(&grads).unwrap()
    };
    let diff = max_diff(run(true), run(false));
    assert!(diff <= TOL, "input gradient differs by {diff}");
}

#[test]
fn without_autodiff_the_fused_forward_equals_explicit_attention() {
    let _serial = common::autodiff_lock();
    for (kv_heads, causal, padding) in [(4, false, Keys::All), (2, true, lengths(33)), (1, true, Keys::All)] {
        let case = Case { batch: 3, heads: 4, kv_heads, queries: 33, keys: 33, head_dim: 8, causal, padding };
        let [q, k, v, _] = case.inputs::<Dev>(42);
        let diff = max_diff(attention(q.clone(), k.clone(), v.clone(), &case.mask()), explicit(&case, q, k, v));
        assert!(diff <= TOL, "differs by {diff}, {case:?}");
    }
}

#[test]
#[cfg_attr(all(feature = "wgpu", not(feature = "cuda")), ignore = "Burn's wgpu backend has no bf16")]
fn bf16_products_stay_close_to_f32() {
    let _serial = common::autodiff_lock();
    // bf16 keeps 8 bits of mantissa: values and gradients agree to a few 1e-2 on O(1) inputs.
    let case = Case { batch: 3, heads: 4, kv_heads: 2, queries: 33, keys: 33, head_dim: 16, causal: true, padding: lengths(33) };
    let f = |q: Tensor<Autodiff<Dev>, 4>, k, v| attention(q, k, v, &case.mask());
    let exact = run::<Autodiff<Dev>>(&case, 7, f);
    let low = with_compute(Compute::Bf16, || run::<Autodiff<Dev>>(&case, 7, f));
    for (name, (e, l)) in ["output", "dq", "dk", "dv"].iter().zip(exact.into_iter().zip(low)) {
        let scale = e.clone().abs().max().into_scalar();
        let diff = max_diff(e, l);
        assert!(diff <= 3e-2 * scale.max(1.0), "{name}: bf16 differs by {diff} (scale {scale})");
    }
}
