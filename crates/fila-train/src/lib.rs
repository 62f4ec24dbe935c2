//! FILA-train: the training framework of FILA (a LLaVA-style VLM with a CLIP-ViT + ConvNeXt hybrid
//! encoder), with a custom loop: TOML configs with `--set` overrides, per-stage
//! trainable sets, AdamW with warmup-cosine, gradient accumulation, global-norm clipping, atomic
//! step checkpoints with exact resume, TensorBoard scalars and a `final/` export.

pub mod alloc;
pub mod backend;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod dist;
#[cfg(feature = "cuda")]
pub mod dylib;
pub mod hf_export;
pub mod kernel_events;
pub mod logging;
pub mod lora;
pub mod optim;
pub mod plan;
pub mod precision;
pub mod recompute;
pub mod shard;
pub mod step;
pub mod trainable;
pub mod trainer;
pub mod zero3;

pub use config::{LoadedConfig, TrainConfig};
pub use trainer::{run, Resume, RunOptions, RunOutcome};
