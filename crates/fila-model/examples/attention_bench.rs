//! Forward + backward time of one attention call on the CPU: the seam (`fila_model::attention`)
//! against attention written out with matmul, an additive `[B, 1, T, T]` bias and softmax (what
//! the model ran before, and what Burn's autodiff does with its own `attention`).
//!
//! `cargo run -p fila-model --example attention_bench [-- B H T D [bf16]]` (defaults 2 8 512 64,
//! f32). The dev profile builds dependencies with opt-level 3, so the tensor kernels run at full
//! speed. With `--features cuda` it runs on CUDA device 0 (`--features wgpu`: wgpu's default adapter); `bf16` runs the products in bf16.

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::{Distribution, TensorData};
use fila_model::attention::{attention, AttentionMask};
use fila_model::autocast::{self, with_compute, Compute};
use std::time::Instant;

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
type Dev = burn::backend::Flex;
#[cfg(feature = "cuda")]
type Dev = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
type Dev = burn::backend::Wgpu;
type A = Autodiff<Dev>;

/// The attention the model computed before the seam: GQA heads repeated, full score matrix.
fn explicit(q: Tensor<A, 4>, k: Tensor<A, 4>, v: Tensor<A, 4>, bias: Option<Tensor<A, 4>>) -> Tensor<A, 4> {
    let [b, h, _, d] = q.dims();
    let [_, hkv, t, _] = k.dims();
    let repeat = |x: Tensor<A, 4>| x.unsqueeze_dim::<5>(2).expand([b, hkv, h / hkv, t, d]).reshape([b, h, t, d]);
    let mut scores = autocast::matmul(q, repeat(k).swap_dims(2, 3)) * (d as f64).powf(-0.5);
    if let Some(bias) = bias {
        scores = scores + bias;
    }
    autocast::matmul(softmax(scores, 3), repeat(v))
}

/// Causal + right-padding bias `[B, 1, T, T]` for key lengths `lengths`.
fn bias(lengths: &[usize], t: usize) -> Tensor<A, 4> {
    let b = lengths.len();
    let values: Vec<f32> = (0..b * t * t)
        .map(|n| {
            let (row, i, j) = (n / (t * t), n / t % t, n % t);
            if j > i || j >= lengths[row] {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [b, 1, t, t]), &Default::default())
}

/// Median wall time in ms of `runs` forward + backward passes after two warm-up passes.
fn time(runs: usize, mut step: impl FnMut()) -> f64 {
    step();
    step();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            step();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let compute = if args.last().map(String::as_str) == Some("bf16") {
        args.pop();
        Compute::Bf16
    } else {
        Compute::F32
    };
    let sizes: Vec<usize> = args.iter().map(|a| a.parse().expect("B H T D as integers")).collect();
    let [b, h, t, d] = match sizes.as_slice() {
        [] => [2, 8, 512, 64],
        [b, h, t, d] => [*b, *h, *t, *d],
        _ => panic!("usage: attention_bench [B H T D] [bf16]"),
    };
    with_compute(compute, || bench(b, h, t, d, compute));
}

fn bench(b: usize, h: usize, t: usize, d: usize, compute: Compute) {
    let runs = 9;
    let device = Default::default();
    let lengths: Vec<usize> = (0..b).map(|i| t - i * t / 4).collect();
    let lengths_tensor = Tensor::<A, 1, Int>::from_data(TensorData::new(lengths.iter().map(|&l| l as i64).collect::<Vec<_>>(), [b]), &device);
    println!("B={b} H={h} T={t} D={d} {compute:?}, {runs} runs, median ms (key lengths {lengths:?} where padded)");
    for (name, kv, causal) in [("causal + padding (Llama)", h, true), ("causal + padding, GQA kv=H/4", (h / 4).max(1), true), ("no mask (CLIP)", h, false)] {
        let q = Tensor::<A, 4>::random([b, h, t, d], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<A, 4>::random([b, kv, t, d], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<A, 4>::random([b, kv, t, d], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<A, 4>::random([b, h, t, d], Distribution::Normal(0.0, 1.0), &device);
        let additive = causal.then(|| bias(&lengths, t));
        let mask = if causal { AttentionMask::causal().with_key_lengths(lengths_tensor.clone(), t) } else { AttentionMask::none() };
        let step = |fused: bool| {
            let (q, k, v) = (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad());
            let out = if fused { attention(q.clone(), k.clone(), v.clone(), &mask) } else { explicit(q.clone(), k.clone(), v.clone(), additive.clone()) };
            let grads = (out * w.clone()).sum().backward();
            // Reading the gradients waits for the backward pass to finish.
            let _ = q.grad(&grads).unwrap().sum().into_scalar();
        };
        let forward = |fused: bool| {
            let (q, k, v) = (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad());
            let out = if fused { attention(q, k, v, &mask) } else { explicit(q, k, v, additive.clone()) };
            let _ = out.sum().into_scalar();
        };
        let before = time(runs, || step(false));
        let after = time(runs, || step(true));
        let before_fwd = time(runs, || forward(false));
        let after_fwd = time(runs, || forward(true));
        println!(
            "{name:<30} fwd+bwd: explicit {before:7.1}  seam {after:7.1}  ({:.2}x)   fwd only: explicit {before_fwd:6.1}  seam {after_fwd:6.1}",
            before / after
        );
    }
}
