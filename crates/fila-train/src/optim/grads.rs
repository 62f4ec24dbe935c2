//! The gradients the optimizer takes: flat tensors on the inner backend by parameter path.

use crate::trainable::TrainableSet;
use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::FloatDType;
use fila_model::weights::{visit_params, ParamPath, PathVisitor};
use std::collections::BTreeMap;

/// Gradients by parameter path, flattened.
pub type Grads<I> = BTreeMap<String, Tensor<I, 1>>;

/// Adds the gradients of the trainable parameters in `grads` to `acc` (one entry per parameter,
/// summed where a parameter is reached more than once).
pub fn accumulate_grads<B: AutodiffBackend, M: Module<B>>(model: &M, grads: &B::Gradients, set: &TrainableSet, acc: &mut Grads<B::InnerBackend>) {
    struct Collector<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        set: &'a TrainableSet,
        acc: &'a mut Grads<B::InnerBackend>,
    }
    impl<B: AutodiffBackend> PathVisitor<B> for Collector<'_, B> {
        fn visit<const D: usize>(&mut self, at: &ParamPath, param: &Param<Tensor<B, D>>) {
            let path = at.path();
            if !self.set.contains(&path) {
                return;
            }
            if let Some(g) = param.val().grad(self.grads) {
                let n = g.shape().num_elements();
                // Kept in the weight's dtype (the map holds a whole micro-batch's gradients);
                // a parameter reached twice (tied weights, or two segments) sums in f32.
                let g = g.reshape([n]);
                let sum = match self.acc.remove(&path) {
                    Some(prev) => prev.cast(FloatDType::F32) + g.cast(FloatDType::F32),
                    None => g,
                };
                self.acc.insert(path, sum);
            }
        }
    }
    visit_params(model, &mut Collector::<B> { grads, set, acc });
}
