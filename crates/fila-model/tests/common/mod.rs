//! Helpers shared by the parity tests: fixture paths, reference tensors, tolerance checks.
#![allow(dead_code)]

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorData;
use fila_model::weights::Checkpoint;
use std::path::PathBuf;

/// The backend the tests run on: the CPU backend; CUDA device 0 in a build with `--features
/// cuda` (`cargo test -p fila-model --features cuda` checks parity on the GPU); wgpu's default
/// adapter in a build with `--features wgpu` only (CI runs it on Mesa's software Vulkan driver).
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
pub type Dev = burn::backend::Flex;
#[cfg(feature = "cuda")]
pub type Dev = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub type Dev = burn::backend::Wgpu;
pub type DevAutodiff = Autodiff<Dev>;

/// Whether [`Dev`] is CUDA, whose f32 products round their operands (see [`TOL`]).
pub const ON_CUDA: bool = cfg!(feature = "cuda");

/// f32 parity tolerance on CPU and wgpu, absolute: the fixtures' own f32-vs-f64 error is below
/// 4e-6 (fixtures/README.md); wgpu's kernels compute in full f32, in another order.
#[cfg(not(feature = "cuda"))]
pub const TOL: f32 = 1e-4;
/// On CUDA, relative to the tensor's largest value: Burn's CUDA backend multiplies f32 matrices
/// with reduced internal precision (errors of 1e-3 to 5e-3 after one transformer layer, as with
/// TF32 tensor cores).
#[cfg(feature = "cuda")]
pub const TOL: f32 = 1e-2;

/// `tests/fixtures/<name>` of this crate, in the checkout `FILA_REPO_DIR` when set (test binaries
/// built in one checkout and run from another, e.g. on a GPU machine).
pub fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("FILA_REPO_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), |d| PathBuf::from(d).join("crates/fila-model"));
    dir.join("tests/fixtures").join(name)
}

pub struct Reference(Checkpoint);

impl Reference {
    pub fn open(name: &str) -> Self {
        Reference(Checkpoint::open(&fixture(name).join("reference.safetensors")).expect("reference file"))
    }

    pub fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        self.0.read_f32(key).unwrap_or_else(|e| panic!("reference `{key}`: {e}"))
    }

    pub fn tensor<B: Backend, const D: usize>(&self, key: &str) -> Tensor<B, D> {
        self.0.tensor::<B, D>(key, &Default::default()).unwrap()
    }

    /// Integer tensors (ids, masks, labels) are stored as int64.
    pub fn ints<B: Backend>(&self, key: &str) -> Tensor<B, 2, Int> {
        let data = self.raw_i64(key);
        Tensor::from_data(TensorData::new(data.1, data.0), &Default::default())
    }

    pub fn raw_i64(&self, key: &str) -> (Vec<usize>, Vec<i64>) {
        let path = fixture_path_of(&self.0);
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(key).unwrap();
        let values = view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
        (view.shape().to_vec(), values)
    }

    pub fn keys(&self) -> Vec<String> {
        self.0.keys().map(String::from).collect()
    }
}

fn fixture_path_of(checkpoint: &Checkpoint) -> PathBuf {
    PathBuf::from(checkpoint.description())
}

/// Largest absolute difference; panics naming the tensor if shapes differ or it exceeds `tol`.
pub fn assert_close(name: &str, actual: TensorData, expected: &(Vec<usize>, Vec<f32>), tol: f32) -> f32 {
    let shape = actual.shape.to_vec();
    assert_eq!(shape, expected.0, "{name}: shape");
    let values: Vec<f32> = actual.convert::<f32>().to_vec().unwrap();
    let max = values.iter().zip(&expected.1).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    // On CUDA the tolerance scales with the tensor (see `TOL`).
    let scale = if ON_CUDA { expected.1.iter().fold(1.0f32, |m, v| m.max(v.abs())) } else { 1.0 };
    let tol = tol * scale;
    assert!(max <= tol, "{name}: max abs error {max:e} > {tol:e}");
    eprintln!("{name}: max abs error {max:.2e}");
    max
}

/// Serializes the tests of this binary that run autodiff: in Burn 0.21 a `backward()` on one
/// thread may free the steps of a graph another thread is still building (tracel-ai/burn#5573),
/// silently dropping gradients there. The trainer runs one autodiff thread per process; tests
/// that run in parallel threads take this lock so their graphs never overlap.
pub fn autodiff_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Deterministic values in [-2, 2) from a 64-bit LCG: the same on every backend, so failures
/// reproduce and GPU runs compare with CPU runs.
pub fn random<B: Backend, const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}
