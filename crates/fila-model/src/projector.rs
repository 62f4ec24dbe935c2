//! The vision-language projector (LLaVA's `mm_projector_type`: `linear` or `mlp{N}x_gelu`).

use crate::autocast;
use crate::kernels;
use crate::nn::linear;
use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Projector architecture; written in configs as `linear` or `mlp2x_gelu` (any depth N ≥ 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ProjectorKind {
    Linear,
    /// `depth` linear layers with GELU between them.
    Mlp {
        depth: usize,
    },
}

impl TryFrom<String> for ProjectorKind {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        if value == "linear" {
            return Ok(Self::Linear);
        }
        let depth = value.strip_prefix("mlp").and_then(|rest| rest.strip_suffix("x_gelu")).and_then(|n| n.parse::<usize>().ok()).filter(|&n| n >= 1);
        depth.map(|depth| Self::Mlp { depth }).ok_or_else(|| format!("unknown projector `{value}`; expected `linear` or `mlp<N>x_gelu` such as `mlp2x_gelu`"))
    }
}

impl From<ProjectorKind> for String {
    fn from(kind: ProjectorKind) -> String {
        kind.to_string()
    }
}

impl fmt::Display for ProjectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProjectorKind::Linear => write!(f, "linear"),
            ProjectorKind::Mlp { depth } => write!(f, "mlp{depth}x_gelu"),
        }
    }
}

impl ProjectorKind {
    pub fn depth(&self) -> usize {
        match self {
            ProjectorKind::Linear => 1,
            ProjectorKind::Mlp { depth } => *depth,
        }
    }

    pub fn num_params(&self, vision_dim: usize, text_dim: usize) -> usize {
        (vision_dim * text_dim + text_dim) + (self.depth() - 1) * (text_dim * text_dim + text_dim)
    }

    pub fn init<B: Backend>(&self, vision_dim: usize, text_dim: usize, device: &B::Device) -> Projector<B> {
        let layers = (0..self.depth()).map(|i| linear(if i == 0 { vision_dim } else { text_dim }, text_dim, true, device)).collect();
        Projector { layers }
    }
}

#[derive(Module, Debug)]
pub struct Projector<B: Backend> {
    pub layers: Vec<Linear<B>>,
}

impl<B: Backend> Projector<B> {
    /// `[N, vision_dim]` → `[N, text_dim]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let last = self.layers.len() - 1;
        self.layers.iter().enumerate().fold(x, |x, (i, layer)| {
            let y = autocast::linear(layer, x);
            if i < last {
                kernels::gelu(y)
            } else {
                y
            }
        })
    }
}
