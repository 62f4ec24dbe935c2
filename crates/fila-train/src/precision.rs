//! The precision policy, in one place.
//!
//! - `f32`: everything in f32. The default, and the mode for training on the CPU.
//! - `bf16_mixed` (for CUDA; on the CPU for testing that path, [`Precision::device_note`]; not
//!   on wgpu, which has no bf16): matrix products and convolutions compute in bf16
//!   ([`fila_model::autocast`]); norms, softmax, activations, residual sums and the loss are f32.
//!   The weights read only by products are *stored* in bf16 ([`Precision::store_frozen`],
//!   [`Precision::store_trainable`]): the products read them as they are, so no bf16 copy is
//!   made per forward or kept for the backward. The f32 values of the trainable ones live in the
//!   optimizer's master slice (sharded across ranks, saved with its state); the model holds
//!   their bf16 rounding, which is exactly what a product of the f32 weight would read. Gradients
//!   come out of the backward in bf16 and are summed over micro-batches and ranks in f32 in the
//!   optimizer's slice; AdamW's moments are f32. A step computes what per-product casts of f32 weights compute: the same bits, but
//!   for the summation order of some kernels, which depends on the weights' memory layout.
use crate::backend::Device;
use crate::trainable::TrainableSet;
use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::FloatDType;
use fila_model::autocast::Compute;
use fila_model::weights::{map_params, ParamPath, PathMapper};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    Bf16Mixed,
}

impl Precision {
    /// Refuses combinations the policy does not allow.
    pub fn check_device(self, device: Device) -> Result<(), String> {
        match (self, device) {
            (Precision::Bf16Mixed, Device::Wgpu(_)) => {
                Err("`bf16_mixed` needs bf16 tensors, which Burn's wgpu backend does not have; on `wgpu` use `f32`".into())
            }
            _ => Ok(()),
        }
    }

    /// A start-up line for an allowed combination that is not what this mode is for: `bf16_mixed`
    /// on the CPU runs the GPUs' precision path (bf16 weights, f32 master slices, their
    /// checkpoints, several ranks) so tests can check it, but saves no time there.
    pub fn device_note(self, device: Device) -> Option<&'static str> {
        match (self, device) {
            (Precision::Bf16Mixed, Device::Cpu) => Some(
                "`bf16_mixed` on `cpu` is for testing the GPU precision path, not for speed: the CPU backend computes bf16 products through f32 copies (train on the CPU in `f32`)",
            ),
            _ => None,
        }
    }

    /// The compute mode the model's forward runs under.
    pub fn compute(self) -> Compute {
        match self {
            Precision::F32 => Compute::F32,
            Precision::Bf16Mixed => Compute::Bf16,
        }
    }

    /// Runs the model's forward (and with it the recorded graph for backward) under this policy.
    pub fn forward<R>(self, f: impl FnOnce() -> R) -> R {
        fila_model::autocast::with_compute(self.compute(), f)
    }

    /// Bytes per element of a stored weight (trainable or frozen): bf16 under `bf16_mixed`,
    /// counting every element as a product weight (norms, biases and embeddings, kept in f32,
    /// are a small share).
    pub fn weight_bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16Mixed => 2,
        }
    }

    /// Bytes per trainable element of the gradients one backward pass produces (the weights'
    /// dtype); their sum over micro-batches is f32 in the optimizer's slice.
    pub fn grad_bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16Mixed => 2,
        }
    }

    /// Whether the model holds trainable weights in a lower precision than the optimizer's
    /// master values, which checkpoints must then carry.
    pub fn master_apart(self) -> bool {
        self == Precision::Bf16Mixed
    }

    /// Saved activations relative to an all-16-bit model: 2 in f32; 1.5 under `bf16_mixed`, where
    /// the operands of matrix products are saved in bf16 and the rest (norm inputs, softmax
    /// outputs, activations) in f32 — an estimate, taking about half of them to be bf16.
    pub fn activation_scale(self) -> f64 {
        match self {
            Precision::F32 => 2.0,
            Precision::Bf16Mixed => 1.5,
        }
    }

    /// Optimizer state is f32 in every mode: two moments per trainable element.
    pub fn optimizer_bytes(self) -> usize {
        8
    }

    /// Stores the frozen weights read only by matrix products and convolutions in bf16 under
    /// `bf16_mixed`; nothing changes in `f32`.
    pub fn store_frozen<B: Backend, M: Module<B>>(self, model: M, set: &TrainableSet) -> M {
        self.store_product_weights(model, |path| !set.contains(path))
    }

    /// Stores the trainable weights read only by products in bf16 under `bf16_mixed`: call it
    /// after the optimizer took their f32 values as its master copy.
    pub fn store_trainable<B: Backend, M: Module<B>>(self, model: M, set: &TrainableSet) -> M {
        self.store_product_weights(model, |path| set.contains(path))
    }

    fn store_product_weights<B: Backend, M: Module<B>>(self, model: M, select: impl Fn(&str) -> bool) -> M {
        struct ToBf16<F> {
            select: F,
        }
        impl<B: Backend, F: Fn(&str) -> bool> PathMapper<B> for ToBf16<F> {
            fn map<const D: usize>(&mut self, at: &ParamPath, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                let path = at.path();
                if !is_product_weight(&path, D) || !(self.select)(&path) {
                    return param;
                }
                let (id, tensor, mapper) = param.consume();
                // A trainable weight stays a leaf of the graph in its new dtype.
                let trainable = tensor.is_require_grad();
                let stored = tensor.cast(FloatDType::BF16);
                let stored = if trainable { stored.detach().require_grad() } else { stored };
                Param::from_mapped_value(id, stored, mapper)
            }
        }
        match self {
            Precision::F32 => model,
            Precision::Bf16Mixed => map_params(model, &mut ToBf16 { select }),
        }
    }

    /// What the training step actually runs, for the start-up line.
    pub fn effective_note(self) -> &'static str {
        match self {
            Precision::F32 => "f32 weights, compute and optimizer state",
            Precision::Bf16Mixed => {
                "bf16 matrix products and convolutions with weights stored in bf16; f32 master weights, gradient sums, optimizer state, norms, softmax and loss"
            }
        }
    }
}

/// Whether `bf16_mixed` stores the parameter at `path` (of rank `rank`) in bf16: the weights read
/// only by matrix products and convolutions, rank ≥ 2 `….weight` tensors that are not embedding
/// tables (those are read by lookups and sums, and stay f32 like norms and biases).
pub fn is_product_weight(path: &str, rank: usize) -> bool {
    rank >= 2 && path.ends_with(".weight") && !path.contains("embed")
}
