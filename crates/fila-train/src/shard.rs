//! How the trainable parameters are cut across ranks (ZeRO-1/2 layout).
//!
//! The trainable parameters, flattened in name order, are laid end to end and cut into buckets
//! of [`BUCKET_ELEMENTS`]; each bucket is padded to a multiple of the world size and every rank
//! owns one equal piece of every bucket. A rank keeps optimizer state (and the f32 master
//! values) for its pieces only: its *slice*. Gradients are reduce-scattered bucket by bucket into
//! the slice, and the updated slice is all-gathered back into full parameters. With one rank the
//! slice is everything. The layout depends only on the names, shapes, world size and rank, so a
//! checkpoint written at one world size is re-cut by name at another.

use crate::trainable::TrainableSet;
use burn::prelude::*;
use burn::tensor::FloatDType;

/// Elements per bucket by default (128 MiB of f32; `distributed.bucket_elements`): bounds the
/// extra memory of one collective and of the buckets in flight.
pub const BUCKET_ELEMENTS: usize = 1 << 25;

/// One rank's piece of one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// First flat element of the bucket.
    pub start: usize,
    /// Real elements in the bucket (the rest of `padded` is zeros).
    pub len: usize,
    /// `len` rounded up to a multiple of the world size.
    pub padded: usize,
    /// Where this rank's piece (`padded / world` elements) sits in its slice.
    pub at: usize,
}

impl Bucket {
    pub fn piece(&self, world: usize) -> usize {
        self.padded / world
    }
}

/// A run of one parameter's flat elements inside a rank's slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Index into [`FlatLayout::names`].
    pub param: usize,
    /// First element within the parameter (flattened).
    pub start: usize,
    pub len: usize,
    /// Offset in the slice.
    pub at: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FlatLayout {
    /// Trainable parameter paths in name order, with their shapes and flat offsets.
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub offsets: Vec<usize>,
    pub total: usize,
    pub world: usize,
    pub rank: usize,
    pub buckets: Vec<Bucket>,
    /// This rank's parameter runs, in slice order.
    pub segments: Vec<Segment>,
    /// Elements in this rank's slice (padding included).
    pub slice_len: usize,
    /// The group of each bucket's parameters ([`FlatLayout::with_groups`]; all 0 otherwise).
    pub bucket_groups: Vec<u32>,
}

impl FlatLayout {
    pub fn new(set: &TrainableSet, world: usize, rank: usize, bucket_elements: usize) -> Self {
        Self::with_groups(set, world, rank, bucket_elements, &|_| 0)
    }

    /// [`FlatLayout::new`] with no bucket spanning two groups (`group(name)`; parameters of a
    /// group are contiguous in name order or not, each bucket holds one group's parameters only):
    /// ZeRO-3 gathers one group's buckets at a time.
    pub fn with_groups(set: &TrainableSet, world: usize, rank: usize, bucket_elements: usize, group: &dyn Fn(&str) -> u32) -> Self {
        assert!(rank < world && bucket_elements > 0);
        let names: Vec<String> = set.params.keys().cloned().collect();
        let shapes: Vec<Vec<usize>> = set.params.values().map(|p| p.shape.clone()).collect();
        let mut offsets = Vec::with_capacity(names.len());
        let mut total = 0;
        for s in &shapes {
            offsets.push(total);
            total += s.iter().product::<usize>();
        }
        let groups: Vec<u32> = names.iter().map(|n| group(n)).collect();
        // The flat offsets where the group changes, then the end: no bucket crosses one.
        let mut breaks: Vec<usize> = (1..names.len()).filter(|&q| groups[q] != groups[q - 1]).map(|q| offsets[q]).collect();
        breaks.push(total);
        let mut layout =
            Self { names, shapes, offsets, total, world, rank, buckets: Vec::new(), segments: Vec::new(), slice_len: 0, bucket_groups: Vec::new() };
        let mut start = 0;
        while start < total {
            let len = bucket_elements.min(breaks[breaks.partition_point(|&b| b <= start)] - start);
            let group = groups[layout.offsets.partition_point(|&o| o <= start) - 1];
            layout.bucket_groups.push(group);
            let padded = len.div_ceil(world) * world;
            let piece = padded / world;
            layout.buckets.push(Bucket { start, len, padded, at: layout.slice_len });
            // This rank's piece covers flat [start + rank·piece, …) clipped to the real elements.
            let lo = start + rank * piece;
            let hi = (lo + piece).min(start + len);
            if lo < hi {
                let at = layout.slice_len;
                layout.segments.extend(layout.runs(lo, hi - lo).into_iter().map(|(param, s, n, off)| Segment { param, start: s, len: n, at: at + off }));
            }
            layout.slice_len += piece;
            start += len;
        }
        layout
    }

    pub fn numel(&self, param: usize) -> usize {
        self.shapes[param].iter().product()
    }

    /// The parameter runs of flat `[from, from + len)`: (param, start in param, len, offset from `from`).
    pub fn runs(&self, from: usize, len: usize) -> Vec<(usize, usize, usize, usize)> {
        let mut out = Vec::new();
        let end = from + len;
        let first = self.offsets.partition_point(|&o| o <= from).saturating_sub(1);
        for p in first..self.names.len() {
            let (ps, pe) = (self.offsets[p], self.offsets[p] + self.numel(p));
            if ps >= end {
                break;
            }
            let (s, e) = (ps.max(from), pe.min(end));
            if s < e {
                out.push((p, s - ps, e - s, s - from));
            }
        }
        out
    }

    /// Bucket `b` as one padded flat f32 tensor, built from each parameter's flat values in any
    /// float dtype, cast run by run (`None`: zeros, e.g. a parameter that got no gradient).
    pub fn bucket_tensor<I: Backend>(&self, b: usize, value: &dyn Fn(usize) -> Option<Tensor<I, 1>>, device: &I::Device) -> Tensor<I, 1> {
        let bucket = &self.buckets[b];
        let mut parts = Vec::new();
        for (p, s, n, _) in self.runs(bucket.start, bucket.len) {
            parts.push(match value(p) {
                Some(t) if s == 0 && n == self.numel(p) => t.cast(FloatDType::F32),
                Some(t) => t.slice(s..s + n).cast(FloatDType::F32),
                None => Tensor::zeros([n], device),
            });
        }
        if bucket.padded > bucket.len {
            parts.push(Tensor::zeros([bucket.padded - bucket.len], device));
        }
        Tensor::cat(parts, 0)
    }

    /// This rank's slice of flat values as f32 (no communication: every rank holds the full
    /// values), built from this rank's runs alone, each cast after it is cut and then joined
    /// into one new tensor: no whole bucket, and no f32 copy of a whole parameter, is made.
    pub fn own_slice<I: Backend>(&self, value: &dyn Fn(usize) -> Option<Tensor<I, 1>>, device: &I::Device) -> Tensor<I, 1> {
        let mut parts = Vec::with_capacity(2 * self.segments.len() + 1);
        let mut at = 0;
        for s in &self.segments {
            if s.at > at {
                parts.push(Tensor::zeros([s.at - at], device));
            }
            parts.push(match value(s.param) {
                Some(t) => t.slice(s.start..s.start + s.len).cast(FloatDType::F32),
                None => Tensor::zeros([s.len], device),
            });
            at = s.at + s.len;
        }
        if self.slice_len > at {
            parts.push(Tensor::zeros([self.slice_len - at], device));
        }
        Tensor::cat(parts, 0)
    }

    /// Whole flat parameters from the gathered buckets `buckets` (in that order), one bucket at a
    /// time: `gather(b)` gives bucket `b` in full (f32), whose runs are cast to the parameter's
    /// `dtypes` entry at once, so at most one f32 bucket is alive besides the result (the
    /// parameters in their own dtypes). A parameter split over buckets is joined when its last
    /// run arrives; one with runs outside `buckets` stays `None`.
    pub fn params_from_buckets<I: Backend, E>(
        &self,
        dtypes: &[FloatDType],
        buckets: &[usize],
        mut gather: impl FnMut(usize) -> Result<Tensor<I, 1>, E>,
    ) -> Result<Vec<Option<Tensor<I, 1>>>, E> {
        let mut done: Vec<Option<Tensor<I, 1>>> = vec![None; self.names.len()];
        let mut partial: Vec<Vec<(usize, Tensor<I, 1>)>> = vec![Vec::new(); self.names.len()];
        for &b in buckets {
            let bucket = &self.buckets[b];
            let full = gather(b)?;
            for (p, start, n, off) in self.runs(bucket.start, bucket.len) {
                let run = full.clone().slice(off..off + n).cast(dtypes[p]);
                if start == 0 && n == self.numel(p) {
                    done[p] = Some(run);
                } else {
                    partial[p].push((start, run));
                    if partial[p].iter().map(|(_, r)| r.dims()[0]).sum::<usize>() == self.numel(p) {
                        let mut runs = std::mem::take(&mut partial[p]);
                        runs.sort_by_key(|(s, _)| *s);
                        done[p] = Some(Tensor::cat(runs.into_iter().map(|(_, r)| r).collect(), 0));
                    }
                }
            }
        }
        Ok(done)
    }

    /// A per-element vector of the slice from a per-parameter value (padding gets `pad`), filled
    /// on the device run by run (runs of one value merged): no host copy of the slice is made.
    pub fn per_element<I: Backend>(&self, value: impl Fn(usize) -> f32, pad: f32, device: &I::Device) -> Tensor<I, 1> {
        self.per_element_in(0..self.slice_len, value, pad, device)
    }

    /// [`FlatLayout::per_element`] for the elements `range` of the slice.
    pub fn per_element_in<I: Backend>(&self, range: std::ops::Range<usize>, value: impl Fn(usize) -> f32, pad: f32, device: &I::Device) -> Tensor<I, 1> {
        let mut runs: Vec<(std::ops::Range<usize>, f32)> = Vec::new();
        for s in &self.segments {
            let (lo, hi) = (s.at.max(range.start), (s.at + s.len).min(range.end));
            if lo >= hi {
                continue;
            }
            let v = value(s.param);
            let (lo, hi) = (lo - range.start, hi - range.start);
            match runs.last_mut() {
                Some((run, w)) if run.end == lo && w.to_bits() == v.to_bits() => run.end = hi,
                _ => runs.push((lo..hi, v)),
            }
        }
        let mut out = Tensor::full([range.len()], pad, device);
        for (run, v) in runs.into_iter().filter(|(_, v)| v.to_bits() != pad.to_bits()) {
            out = out.slice_fill(run, v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainable::TrainableParam;

    fn set(sizes: &[(&str, usize)]) -> TrainableSet {
        TrainableSet {
            params: sizes.iter().map(|(n, s)| (n.to_string(), TrainableParam { shape: vec![*s], lr_multiplier: 1.0, decay: false })).collect(),
            total_params: sizes.len(),
        }
    }

    #[test]
    fn every_element_is_owned_by_exactly_one_rank() {
        // 3 + 7 + 4 = 14 elements, buckets of 6: [0,6) [6,12) [12,14); 3 ranks pad to 6, 12→… 2→3.
        let s = set(&[("a", 3), ("b", 7), ("c", 4)]);
        for world in 1..=4 {
            let mut owned = vec![0u32; 14];
            for rank in 0..world {
                let l = FlatLayout::new(&s, world, rank, 6);
                assert_eq!(l.total, 14);
                assert_eq!(l.buckets.len(), 3);
                assert_eq!(l.slice_len, l.buckets.iter().map(|b| b.piece(world)).sum::<usize>());
                for seg in &l.segments {
                    assert!(seg.start + seg.len <= l.numel(seg.param));
                    for i in 0..seg.len {
                        owned[l.offsets[seg.param] + seg.start + i] += 1;
                    }
                }
            }
            assert!(owned.iter().all(|&c| c == 1), "world {world}: {owned:?}");
        }
        // Rank 1 of 2: bucket 0 piece [3,6) = b[0..3]; bucket 1 piece [9,12) = b[6..7], c[0..2]; bucket 2 [13,14) = c[3..4].
        let l = FlatLayout::new(&s, 2, 1, 6);
        let segs: Vec<(usize, usize, usize, usize)> = l.segments.iter().map(|s| (s.param, s.start, s.len, s.at)).collect();
        assert_eq!(segs, vec![(1, 0, 3, 0), (1, 6, 1, 3), (2, 0, 2, 4), (2, 3, 1, 6)]);
    }

    #[test]
    fn no_bucket_spans_two_groups() {
        // a, b in group 0 (10 elements), c in group 1: buckets of 6 are cut at b's end.
        let s = set(&[("a", 3), ("b", 7), ("c", 4)]);
        let l = FlatLayout::with_groups(&s, 2, 0, 6, &|n| u32::from(n == "c"));
        let cuts: Vec<(usize, usize)> = l.buckets.iter().map(|b| (b.start, b.len)).collect();
        assert_eq!(cuts, vec![(0, 6), (6, 4), (10, 4)]);
        assert_eq!(l.bucket_groups, vec![0, 0, 1]);
        assert_eq!(FlatLayout::new(&s, 2, 0, 6).bucket_groups, vec![0, 0, 0]);
    }

    #[test]
    fn buckets_round_trip_to_parameters() {
        use burn::backend::Flex;
        let s = set(&[("a", 3), ("b", 7), ("c", 4)]);
        let l = FlatLayout::new(&s, 3, 0, 6);
        let dev = Default::default();
        let value = |p: usize| -> Option<Tensor<Flex, 1>> {
            let n = l.numel(p);
            Some(Tensor::from_data(burn::tensor::TensorData::new((0..n).map(|i| (100 * p + i) as f32).collect::<Vec<f32>>(), [n]), &dev))
        };
        let buckets: Vec<Tensor<Flex, 1>> = (0..l.buckets.len()).map(|b| l.bucket_tensor(b, &value, &dev)).collect();
        assert_eq!(buckets.iter().map(|b| b.dims()[0]).collect::<Vec<_>>(), vec![6, 6, 3]);
        let mut asked = Vec::new();
        let params = l
            .params_from_buckets(&[FloatDType::F32; 3], &[0, 1, 2], |b| {
                asked.push(b);
                Ok::<_, ()>(buckets[b].clone())
            })
            .unwrap();
        assert_eq!(asked, vec![0, 1, 2]);
        for (p, t) in params.into_iter().enumerate() {
            assert_eq!(t.unwrap().into_data().to_vec::<f32>().unwrap(), value(p).unwrap().into_data().to_vec::<f32>().unwrap());
        }
        // Buckets 1 and 2 only, in another order: `c` (elements 10..14) is whole, `b` (3..10)
        // is not, `a` (0..3) absent.
        let params = l.params_from_buckets(&[FloatDType::F32; 3], &[2, 1], |b| Ok::<_, ()>(buckets[b].clone())).unwrap();
        assert!(params[0].is_none() && params[1].is_none());
        assert_eq!(params[2].clone().unwrap().into_data().to_vec::<f32>().unwrap(), vec![200.0, 201.0, 202.0, 203.0]);
        // Rank 0's slice: bucket pieces of 2, 2, 1: a0 a1 | b3 b4 | c2.
        let slice: Vec<f32> = l.own_slice(&value, &dev).into_data().to_vec().unwrap();
        assert_eq!(slice, vec![0.0, 1.0, 103.0, 104.0, 202.0]);
    }
}
