//! Which backend a generic `B` is, asked in one place. Burn's generic code cannot specialise on a
//! backend, so the code that takes its own path on one (the attention operation and the fused
//! kernels on flex, their autodiff operations on the CubeCL backends, the fused CPU AdamW in
//! fila-train) compares types with [`same_float`] and then moves values to the type found with
//! [`same_type`]. [`float`] and [`prim`] move a float tensor to its primitive and back, which
//! the custom operations work on.

use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::TensorPrimitive;
use std::any::{Any, TypeId};

/// Whether `A` and `B` have the same float tensor type (the same backend, or autodiff over it
/// with any checkpointing strategy: the primitive names the inner backend).
pub fn same_float<A: Backend, B: Backend>() -> bool {
    TypeId::of::<FloatTensor<A>>() == TypeId::of::<FloatTensor<B>>()
}

/// Moves a value to the type it is known to have (checked with [`same_float`] or `TypeId`
/// beforehand); panics otherwise.
pub fn same_type<S: 'static, T: 'static>(value: S) -> T {
    *(Box::new(value) as Box<dyn Any>).downcast::<T>().expect("types checked equal")
}

/// The float tensor of a primitive.
pub fn float<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// The primitive of a float tensor.
pub fn prim<B: Backend, const D: usize>(x: Tensor<B, D>) -> FloatTensor<B> {
    x.into_primitive().tensor()
}
