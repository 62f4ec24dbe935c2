//! [FILA patch] Multi-threaded element-wise loops and strided copies.
//!
//! Upstream 0.21 runs every element-wise op and every N-D strided copy on the calling thread, one
//! element at a time for views that do not collapse to 2D; on a training step these were a third
//! of the CPU time with the second core idle. The helpers here split large contiguous loops into
//! fixed-size chunks for rayon (results do not depend on the thread count: each element is
//! computed on its own) and copy strided views one innermost run at a time.

use alloc::vec::Vec;

/// Elements below which a loop stays on the calling thread.
pub(crate) const PAR_MIN_ELEMENTS: usize = 1 << 16;
/// Elements per parallel task.
pub(crate) const PAR_CHUNK: usize = 1 << 14;

/// `f` on each chunk of `data` (chunks of [`PAR_CHUNK`]), in parallel when large.
pub(crate) fn for_each_chunk_mut<E: Send, F>(data: &mut [E], f: F)
where
    F: Fn(&mut [E]) + Send + Sync,
{
    #[cfg(feature = "rayon")]
    if data.len() >= PAR_MIN_ELEMENTS {
        use rayon::prelude::*;
        data.par_chunks_mut(PAR_CHUNK).for_each(f);
        return;
    }
    f(data)
}

/// `f(dst_chunk, src_chunk)` over matching chunks of two equal-length slices.
pub(crate) fn zip_chunks_mut<E: Send, S: Sync, F>(dst: &mut [E], src: &[S], f: F)
where
    F: Fn(&mut [E], &[S]) + Send + Sync,
{
    debug_assert!(src.len() >= dst.len());
    let src = &src[..dst.len()];
    #[cfg(feature = "rayon")]
    if dst.len() >= PAR_MIN_ELEMENTS {
        use rayon::prelude::*;
        dst.par_chunks_mut(PAR_CHUNK).zip(src.par_chunks(PAR_CHUNK)).for_each(|(d, s)| f(d, s));
        return;
    }
    f(dst, src)
}

/// `f` on groups of whole rows (`row_len` elements each) of `data`, in parallel when large.
pub(crate) fn for_each_rows_mut<F>(data: &mut [f32], row_len: usize, f: F)
where
    F: Fn(&mut [f32]) + Send + Sync,
{
    for_each_rows_indexed_mut(data, row_len, |_, rows| f(rows))
}

/// `f(first_row, rows)` on groups of whole rows of `data`, in parallel when large.
pub(crate) fn for_each_rows_indexed_mut<F>(data: &mut [f32], row_len: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Send + Sync,
{
    #[cfg(feature = "rayon")]
    if data.len() >= PAR_MIN_ELEMENTS && row_len > 0 {
        use rayon::prelude::*;
        let rows_per_task = (PAR_CHUNK / row_len).max(1);
        data.par_chunks_mut(rows_per_task * row_len).enumerate().for_each(|(t, rows)| f(t * rows_per_task, rows));
        return;
    }
    f(0, data)
}

/// `dst[i] = op(src[i])` into a new vector, in parallel when large.
pub(crate) fn map<S: Copy + Sync, E: Copy + Send, Op>(src: &[S], op: Op) -> Vec<E>
where
    Op: Fn(S) -> E + Send + Sync,
{
    new_vec(src.len(), |start, d| {
        for (d, &s) in d.iter_mut().zip(&src[start..]) {
            d.write(op(s));
        }
    })
}

/// `dst[i] = op(a[i], b[i])` into a new vector, in parallel when large.
pub(crate) fn map2<A: Copy + Sync, B: Copy + Sync, E: Copy + Send, Op>(a: &[A], b: &[B], op: Op) -> Vec<E>
where
    Op: Fn(A, B) -> E + Send + Sync,
{
    new_vec(a.len().min(b.len()), |start, d| {
        for ((d, &a), &b) in d.iter_mut().zip(&a[start..]).zip(&b[start..]) {
            d.write(op(a, b));
        }
    })
}

/// A new vector of `n` elements, every one written by `fill(start, chunk)` (chunks of
/// [`PAR_CHUNK`] in parallel when large). The buffer is not zeroed first: upstream's
/// `vec![zeroed; n]` cleared each output on the calling thread before the parallel loop.
fn new_vec<E: Send, F>(n: usize, fill: F) -> Vec<E>
where
    F: Fn(usize, &mut [core::mem::MaybeUninit<E>]) + Send + Sync,
{
    let mut out = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    #[cfg(feature = "rayon")]
    if n >= PAR_MIN_ELEMENTS {
        use rayon::prelude::*;
        spare.par_chunks_mut(PAR_CHUNK).enumerate().for_each(|(c, d)| fill(c * PAR_CHUNK, d));
    } else {
        fill(0, spare);
    }
    #[cfg(not(feature = "rayon"))]
    fill(0, spare);
    // SAFETY: `map` and `map2` write every element of every chunk (their sources are at least
    // `n` long), so the first `n` elements are initialised.
    unsafe { out.set_len(n) };
    out
}

/// Copies the strided view (`shape`, `strides` ≥ 0, from `offset`) of `src` into the contiguous
/// `dst`, one run of the innermost dimension at a time.
pub(crate) fn copy_nd_runs<E: Copy + Send + Sync>(dst: &mut [E], src: &[E], offset: isize, shape: &[usize], strides: &[isize]) {
    let rank = shape.len();
    let inner = shape[rank - 1];
    let inner_stride = strides[rank - 1];
    if inner == 0 || dst.is_empty() {
        return;
    }
    // Runs per task: about PAR_CHUNK elements.
    let runs_per_task = (PAR_CHUNK / inner).max(1);
    let copy_runs = |first_run: usize, dst: &mut [E]| {
        // Multi-index of the outer dimensions for `first_run`, then an odometer.
        let mut index = [0usize; 8];
        let mut rest = first_run;
        for d in (0..rank - 1).rev() {
            index[d] = rest % shape[d];
            rest /= shape[d];
        }
        let mut base: isize = offset + (0..rank - 1).map(|d| index[d] as isize * strides[d]).sum::<isize>();
        for run in dst.chunks_exact_mut(inner) {
            let start = base as usize;
            if inner_stride == 1 {
                run.copy_from_slice(&src[start..start + inner]);
            } else {
                for (i, v) in run.iter_mut().enumerate() {
                    *v = src[start + i * inner_stride as usize];
                }
            }
            for d in (0..rank - 1).rev() {
                index[d] += 1;
                base += strides[d];
                if index[d] < shape[d] {
                    break;
                }
                base -= shape[d] as isize * strides[d];
                index[d] = 0;
            }
        }
    };
    #[cfg(feature = "rayon")]
    if dst.len() >= PAR_MIN_ELEMENTS {
        use rayon::prelude::*;
        dst.par_chunks_mut(runs_per_task * inner).enumerate().for_each(|(t, d)| copy_runs(t * runs_per_task, d));
        return;
    }
    let _ = runs_per_task;
    copy_runs(0, dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FlexTensor, Layout};
    use burn_backend::DType;
    use burn_std::{Bytes, Shape};

    #[test]
    fn nd_copy_matches_strided_iteration() {
        // A [2, 3, 4, 5] buffer viewed as permute(0, 2, 1, 3) then sliced: 4-D, not collapsible.
        let data: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let t = FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(Shape::from(alloc::vec![2, 3, 4, 5])), DType::F32);
        for big in [false, true] {
            let t = if big {
                let data: Vec<f32> = (0..2 * 3 * 400 * 170).map(|i| i as f32).collect();
                FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(Shape::from(alloc::vec![2, 3, 400, 170])), DType::F32)
            } else {
                t.clone()
            };
            let view = t.permute(&[0, 2, 1, 3]).narrow(3, 1, 3);
            let want: Vec<f32> = crate::strided_index::StridedIter::new(view.layout()).map(|i| view.storage::<f32>()[i]).collect();
            let got = view.to_contiguous();
            assert_eq!(got.storage::<f32>(), &want[..]);
            // Innermost stride ≠ 1 (a transpose of the last two dims, after a permute).
            let view = t.permute(&[1, 0, 3, 2]);
            let want: Vec<f32> = crate::strided_index::StridedIter::new(view.layout()).map(|i| view.storage::<f32>()[i]).collect();
            assert_eq!(view.to_contiguous().storage::<f32>(), &want[..]);
        }
    }

    #[test]
    fn shared_rhs_batched_matmul_equals_per_batch_products() {
        let make = |shape: &[usize], seed: usize| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 - 500.0) / 250.0).collect();
            FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(Shape::from(shape.to_vec())), DType::F32)
        };
        for (b, m, k, n) in [(3, 5, 4, 6), (10, 65, 64, 96), (2, 300, 200, 150)] {
            let lhs = make(&[b, m, k], 1);
            let rhs = make(&[1, k, n], 2);
            let out = crate::ops::matmul::matmul(lhs.clone(), rhs.clone());
            let rhs2 = rhs.reshape(Shape::from(alloc::vec![k, n]));
            for i in 0..b {
                let one = lhs.narrow(0, i, 1).reshape(Shape::from(alloc::vec![m, k]));
                let want = crate::ops::matmul::matmul(one, rhs2.clone());
                let got = out.narrow(0, i, 1).to_contiguous();
                assert_eq!(got.storage::<f32>(), want.storage::<f32>(), "batch {i} of {b}x{m}x{k}x{n}");
            }
            // A transposed lhs (rows not evenly strided across the batch) keeps the batched path.
            let lhs_t = make(&[b, k, m], 3).transpose(1, 2);
            let out = crate::ops::matmul::matmul(lhs_t.clone(), rhs.clone());
            for i in 0..b {
                let one = lhs_t.narrow(0, i, 1).reshape(Shape::from(alloc::vec![m, k]));
                let want = crate::ops::matmul::matmul(one, rhs2.clone());
                assert_eq!(out.narrow(0, i, 1).to_contiguous().storage::<f32>(), want.storage::<f32>());
            }
        }
    }
}
