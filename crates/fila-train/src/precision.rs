//! The precision policy, in one place.
//!
//! - `f32`: everything in f32. The only mode on CPU, and the default.
//! - `bf16_mixed` (CUDA only): the intended policy is bf16 compute with f32 master weights and f32
//!   optimizer state for the trainable parameters, frozen towers held in bf16, and norms, softmax
//!   and the loss in f32. **What this build does:** the switch is parsed, validated (refused on
//!   CPU) and recorded with the run, and the memory plan (`--plan`) counts it; the training step
//!   itself still runs in f32 and says so at start-up. Burn 0.21 has no autocast, so the bf16 path
//!   needs casts inside fila-model's blocks (norm/softmax/loss back to f32), which that crate
//!   does not offer yet.

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
    pub fn check_device(self, device: &str) -> Result<(), String> {
        match (self, device) {
            (Precision::Bf16Mixed, "cpu") => Err("`bf16_mixed` is for CUDA devices; on `cpu` use `f32`".into()),
            _ => Ok(()),
        }
    }

    /// Bytes per element of the compute copy of a weight (trainable or frozen).
    pub fn compute_bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16Mixed => 2,
        }
    }

    /// Bytes per element of the f32 master copy kept for trainable weights (0 if the compute copy
    /// is the master).
    pub fn master_bytes(self) -> usize {
        match self {
            Precision::F32 => 0,
            Precision::Bf16Mixed => 4,
        }
    }

    /// Bytes per gradient element (gradients come out in the compute dtype).
    pub fn grad_bytes(self) -> usize {
        self.compute_bytes()
    }

    /// Optimizer state is f32 in every mode: two moments per trainable element.
    pub fn optimizer_bytes(self) -> usize {
        8
    }

    /// What the training step actually runs, for the start-up line.
    pub fn effective_note(self) -> &'static str {
        match self {
            Precision::F32 => "f32 weights, compute and optimizer state",
            Precision::Bf16Mixed => {
                "bf16_mixed requested: this build still computes in f32 (bf16 casts are not implemented yet; see precision.rs)"
            }
        }
    }
}
