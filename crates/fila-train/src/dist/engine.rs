//! What a collective engine is: something that starts a tensor collective ([`Op`]) on a flat
//! f32 tensor of any backend ([`Flat`]) and hands back the operation in flight ([`InFlight`]).
//! The TCP engine ([`super::tcp::Tcp`]) and the NCCL engine (`super::nccl::Nccl`, the `cuda`
//! feature) are the two; [`super::Comm`] holds one and knows nothing of either.

use anyhow::{anyhow, Result};
use burn::prelude::*;
use burn::tensor::{TensorData, TensorPrimitive};
use std::any::Any;

/// A tensor collective over all ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The element-wise sum, on every rank.
    AllReduce,
    /// The sum, of which rank r keeps elements `[r·n/W, (r+1)·n/W)` (`n` a multiple of `W`).
    ReduceScatter,
    /// Every rank's equal-length input, concatenated in rank order, on every rank.
    AllGather,
    /// Rank `root`'s input on every rank.
    Broadcast { root: usize },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::AllReduce => "all-reduce",
            Op::ReduceScatter => "reduce-scatter",
            Op::AllGather => "all-gather",
            Op::Broadcast { .. } => "broadcast",
        }
    }

    /// Elements of the result for `n` input elements over `world` ranks.
    pub fn out_len(&self, n: usize, world: usize) -> usize {
        match self {
            Op::ReduceScatter => n / world,
            Op::AllGather => n * world,
            Op::AllReduce | Op::Broadcast { .. } => n,
        }
    }
}

/// A flat f32 tensor as an engine sees it, whatever its backend.
pub trait Flat: Send + 'static {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Its values on the host (waits for the device).
    fn to_host(&self) -> Result<Vec<f32>>;
    /// `values` as a tensor of the same backend, on the same device.
    fn with_values(&self, values: Vec<f32>) -> Box<dyn Flat>;
    /// An uninitialised tensor of `len` elements on the same device.
    fn empty_like(&self, len: usize) -> Box<dyn Flat>;
    /// Waits until the device's queued work (which may write this tensor) is done.
    fn sync(&self) -> Result<()>;
    /// The backend's type name (for messages).
    fn backend_name(&self) -> &'static str;
    /// The backend's float primitive (a device engine finds its memory through it).
    fn primitive(&self) -> Box<dyn Any>;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

impl<I: Backend> Flat for Tensor<I, 1> {
    fn len(&self) -> usize {
        self.dims()[0]
    }

    fn to_host(&self) -> Result<Vec<f32>> {
        self.to_data().convert::<f32>().to_vec().map_err(|e| anyhow!("reading a tensor for a collective: {e:?}"))
    }

    fn with_values(&self, values: Vec<f32>) -> Box<dyn Flat> {
        let n = values.len();
        Box::new(Tensor::<I, 1>::from_data(TensorData::new(values, [n]), &self.device()))
    }

    fn empty_like(&self, len: usize) -> Box<dyn Flat> {
        Box::new(Tensor::<I, 1>::empty([len], &self.device()))
    }

    fn sync(&self) -> Result<()> {
        I::sync(&self.device()).map_err(|e| anyhow!("synchronising the device before a collective: {e:?}"))
    }

    fn backend_name(&self) -> &'static str {
        std::any::type_name::<I>()
    }

    fn primitive(&self) -> Box<dyn Any> {
        match self.clone().into_primitive() {
            TensorPrimitive::Float(p) => Box::new(p),
            TensorPrimitive::QFloat(p) => Box::new(p),
        }
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// A collective started and not yet waited for.
pub trait InFlight {
    /// Its result, once every rank's part has arrived.
    fn wait(self: Box<Self>) -> Result<Box<dyn Flat>>;
}

/// A collective whose result is already there (a world of one).
pub struct Ready(pub Box<dyn Flat>);

impl InFlight for Ready {
    fn wait(self: Box<Self>) -> Result<Box<dyn Flat>> {
        Ok(self.0)
    }
}

/// An engine of tensor collectives. Every rank starts the same operations in the same order;
/// an engine runs them in that order.
pub trait Engine {
    fn start(&self, op: Op, t: Box<dyn Flat>) -> Result<Box<dyn InFlight>>;
}
