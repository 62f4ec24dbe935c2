//! The FILA model: a CLIP-ViT + ConvNeXt hybrid vision encoder fused by CVFM, an MLP projector and
//! a LLaMA-3 language model, with strict loading of Hugging Face safetensors checkpoints.
//!
//! The crate holds the modules, their weight I/O and the operations they run: fused CPU kernels
//! and the CubeCL backends' autodiff operations (`kernels`, `attention`), with `probe` the one
//! place that asks which backend a generic `B` is. It knows nothing of data or training.

pub mod attention;
pub mod autocast;
pub mod clip_vit;
pub mod config;
pub mod convnext;
pub mod cvfm;
pub mod fila;
pub mod hybrid_encoder;
pub mod kernels;
pub mod llama;
pub mod lora;
pub mod nf4;
pub mod nn;
pub mod probe;
pub mod projector;
pub mod spec;
pub mod weights;

use std::path::PathBuf;

/// Errors from reading configs and checkpoints. Each names the file and, where there is one, the
/// tensor.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("loading {family} weights from {source_desc}:\n{problems}\nhint: {hint}")]
    Weights { family: String, source_desc: String, problems: String, hint: String },
}

#[cfg(test)]
/// Serializes the unit tests that run autodiff: in Burn 0.21 a `backward()` on one
/// thread may free the steps of a graph another thread is still building (tracel-ai/burn#5573),
/// silently dropping gradients there. The trainer runs one autodiff thread per process; tests
/// that run in parallel threads take this lock so their graphs never overlap.
pub(crate) fn autodiff_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
