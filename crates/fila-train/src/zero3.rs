//! ZeRO-3 (`distributed.zero_stage = 3`): every rank keeps only its slice of the trainable weights.
//!
//! The slice is the optimizer's f32 master slice, which every rank holds anyway (ZeRO-2); the
//! model keeps a one-element placeholder of each trainable parameter's dtype instead of its
//! values ([`strip`]). The layout's buckets never span two segments of the checkpointed pass
//! ([`crate::shard::FlatLayout::with_groups`] over [`crate::recompute::segment_of`]), so a segment's
//! weights are its buckets: all-gathered just before the segment runs, cast to the parameters'
//! dtypes, and dropped after it ([`Gathered`]), the next segment's gather started while the
//! current one computes. Under activation checkpointing that holds the embeddings' weights
//! (whose graph the pass keeps), one decoder layer's and the next one's at a time; each layer is
//! gathered twice per micro-batch (its forward without a graph, its recomputation). Without
//! checkpointing the whole pass is one graph, so the whole model is gathered for the step.
//!
//! Frozen parameters are not sharded: they never change and never travel, and in stage 1 they
//! are the ViT and the language model, which the forward pass needs whole on every rank anyway.
//! Checkpoints and `final/` gather the whole model first: the files are those of ZeRO-2.

use crate::dist::Comm;
use crate::optim::{AdamW, Gathering};
use crate::recompute::{pass_events, PassEvent, Weights};
use crate::shard::FlatLayout;
use anyhow::Result;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::FloatDType;
use fila_model::fila::Fila;
use fila_model::weights::{map_params, ParamPath, PathMapper};
use std::cell::RefCell;
use std::collections::BTreeMap;

/// `model` with each trainable parameter of `layout` replaced by a one-element placeholder of its
/// dtype (keeping its id and its gradient flag): the values live in the optimizer's slices.
pub fn strip<B: AutodiffBackend>(model: Fila<B>, layout: &FlatLayout) -> Fila<B> {
    struct Strip<'a>(&'a FlatLayout);
    impl<B: AutodiffBackend> PathMapper<B> for Strip<'_> {
        fn map<const D: usize>(&mut self, at: &ParamPath, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if self.0.names.binary_search(&at.path()).is_err() {
                return param;
            }
            let (id, tensor, mapper) = param.consume();
            let inner = tensor.inner();
            let dtype: FloatDType = inner.dtype().into();
            let placeholder = Tensor::<B::InnerBackend, D>::zeros([1; D], &inner.device()).cast(dtype);
            Param::from_mapped_value(id, Tensor::from_inner(placeholder).require_grad(), mapper)
        }
    }
    map_params(model, &mut Strip(layout))
}

/// The buckets of each segment (by [`crate::recompute::segment_of`] number).
pub fn segment_buckets(layout: &FlatLayout) -> BTreeMap<u32, Vec<usize>> {
    let mut out: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (b, g) in layout.bucket_groups.iter().enumerate() {
        out.entry(*g).or_default().push(b);
    }
    out
}

/// The checkpointed pass's weights under ZeRO-3: each segment's buckets all-gathered from the
/// optimizer's slices when asked for, the next request's gather started at once. The optimizer
/// sits in a cell it shares with the pass's gradient callback (which starts reduce-scatters).
pub struct Gathered<'a, 'o, I: Backend, S: Backend> {
    optimizer: &'a RefCell<&'o mut AdamW<I, S>>,
    comm: &'a Comm,
    buckets: BTreeMap<u32, Vec<usize>>,
    /// The segments the pass will ask for, in order, and how many it asked for so far.
    requests: Vec<u32>,
    asked: usize,
    prefetched: Option<(u32, Gathering<I>)>,
}

impl<'a, 'o, I: Backend, S: Backend> Gathered<'a, 'o, I, S> {
    /// For one micro-batch's pass over `model` (its placeholders tell which parts train).
    pub fn new<B: AutodiffBackend<InnerBackend = I>>(model: &Fila<B>, optimizer: &'a RefCell<&'o mut AdamW<I, S>>, comm: &'a Comm) -> Self {
        let buckets = segment_buckets(&optimizer.borrow().layout);
        let requests = pass_events(model)
            .into_iter()
            .filter_map(|e| match e {
                PassEvent::Weights(s) => Some(s),
                PassEvent::Done(_) => None,
            })
            .collect();
        Self { optimizer, comm, buckets, requests, asked: 0, prefetched: None }
    }

    fn start(&self, segment: u32) -> Result<Gathering<I>> {
        let none = Vec::new();
        self.optimizer.borrow().start_gather(self.buckets.get(&segment).unwrap_or(&none), self.comm)
    }
}

impl<B: AutodiffBackend<InnerBackend = I>, I: Backend, S: Backend> Weights<B> for Gathered<'_, '_, I, S> {
    fn with(&mut self, model: &Fila<B>, segment: u32) -> Result<Fila<B>> {
        let expected = self.requests.get(self.asked).copied();
        assert_eq!(expected, Some(segment), "the checkpointed pass asked for its segments out of the order every rank follows");
        let gathering = match self.prefetched.take() {
            Some((s, g)) if s == segment => g,
            _ => self.start(segment)?,
        };
        self.asked += 1;
        if let Some(&next) = self.requests.get(self.asked) {
            self.prefetched = Some((next, self.start(next)?));
        }
        self.optimizer.borrow().install_gathered(model.clone(), gathering)
    }
}
