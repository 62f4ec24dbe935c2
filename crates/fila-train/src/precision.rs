//! The precision policy, in one place.
//!
//! - `f32`: everything in f32. The only mode on CPU, and the default.
//! - `bf16_mixed` (CUDA only): matrix products and convolutions compute in bf16
//!   ([`fila_model::autocast`]); trainable weights stay in f32 as the master copy, gradients
//!   arrive in f32, optimizer state is f32; norms, softmax, activations, residual sums and the
//!   loss are f32. Frozen matrix and convolution weights are *stored* in bf16
//!   ([`Precision::store_frozen`]): the products read them as they are, so no bf16 copy is made per
//!   forward or kept for the backward, and they take half the memory. Products compute the same
//!   bits either way (a weight rounded once equals one rounded at every use).

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
    pub fn check_device(self, device: crate::backend::Device) -> Result<(), String> {
        match (self, device) {
            (Precision::Bf16Mixed, crate::backend::Device::Cpu) => Err("`bf16_mixed` is for CUDA devices; on `cpu` use `f32`".into()),
            _ => Ok(()),
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

    /// Bytes per element of a stored trainable weight: f32 in every mode.
    pub fn weight_bytes(self) -> usize {
        4
    }

    /// Bytes per element of a stored frozen weight: bf16 under `bf16_mixed` (taking all frozen
    /// elements as matrices: norms, biases and embeddings, kept in f32, are a small share).
    pub fn frozen_weight_bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16Mixed => 2,
        }
    }

    /// Bytes per trainable element of the bf16 copies made during a forward and kept for the
    /// backward (0 in f32; frozen weights are stored in bf16 and need none).
    pub fn cast_copy_bytes(self) -> usize {
        match self {
            Precision::F32 => 0,
            Precision::Bf16Mixed => 2,
        }
    }

    /// Bytes per gradient element: gradients reach the f32 weights in f32.
    pub fn grad_bytes(self) -> usize {
        4
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

    /// Stores the frozen weights that only matrix products and convolutions read (rank ≥ 2,
    /// `….weight`, not an embedding table) in bf16 under `bf16_mixed`; nothing changes in `f32`.
    /// Embeddings stay f32 because they are read by lookups and sums, not products.
    pub fn store_frozen<B: Backend, M: Module<B>>(self, model: M, set: &TrainableSet) -> M {
        struct ToBf16<'a> {
            set: &'a TrainableSet,
        }
        impl<B: Backend> PathMapper<B> for ToBf16<'_> {
            fn map<const D: usize>(&mut self, at: &ParamPath, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                let path = at.path();
                let product_weight = D >= 2 && path.ends_with(".weight") && !path.contains("embed");
                if !product_weight || self.set.contains(&path) {
                    return param;
                }
                let (id, tensor, mapper) = param.consume();
                Param::from_mapped_value(id, tensor.cast(FloatDType::BF16), mapper)
            }
        }
        match self {
            Precision::F32 => model,
            Precision::Bf16Mixed => map_params(model, &mut ToBf16 { set }),
        }
    }

    /// What the training step actually runs, for the start-up line.
    pub fn effective_note(self) -> &'static str {
        match self {
            Precision::F32 => "f32 weights, compute and optimizer state",
            Precision::Bf16Mixed => {
                "bf16 matrix products and convolutions; frozen matrix weights stored in bf16; f32 trainable weights, gradients, optimizer state, norms, softmax and loss"
            }
        }
    }
}
