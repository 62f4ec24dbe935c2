//! The optimizer's memory at the seams that scale with the model, counted byte for byte: every
//! heap allocation of this test binary goes through a counting allocator (one test, so nothing
//! else runs beside it).
//!
//! The weights are bf16 (as under `bf16_mixed`) and two ranks (threads) share the work over TCP
//! with the small buckets of the real layout's shape (64 Ki elements instead of 64 Mi, ~33 of
//! them). Building a rank's f32 slice makes the slice and its runs, never a whole bucket or an
//! f32 copy of the model; writing the updated slice back all-gathers one bucket at a time and
//! keeps the new bf16 parameters only: no gathered f32 bucket survives, and at most a few are
//! alive at once (the ZeRO write-back the GPU backends run as well; the fused CPU update only
//! changes the arithmetic before it).

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::{Distribution, FloatDType};
use fila_train::config::OptimizerConfig;
use fila_train::dist::{world::Launcher, Comm, Fingerprint, World};
use fila_train::optim::AdamW;
use fila_train::shard::FlatLayout;
use fila_train::trainable::{param_shapes, TrainableParam, TrainableSet};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::Duration;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, SeqCst) + by;
    PEAK.fetch_max(now, SeqCst);
}

// SAFETY: every call is passed to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size(), SeqCst);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = System.realloc(p, layout, new_size);
        if !q.is_null() {
            LIVE.fetch_sub(layout.size(), SeqCst);
            grew(new_size);
        }
        q
    }
}

#[global_allocator]
static COUNTER: Counting = Counting;

/// Starts a measurement: the bytes alive now, with the peak reset to them.
fn start() -> usize {
    let now = LIVE.load(SeqCst);
    PEAK.store(now, SeqCst);
    now
}

/// (peak above `base`, bytes still alive above `base`).
fn since(base: usize) -> (usize, isize) {
    (PEAK.load(SeqCst) - base, LIVE.load(SeqCst) as isize - base as isize)
}

type B = Autodiff<Flex>;
const BUCKET: usize = 1 << 16;
const WORLD: usize = 2;
/// Tensor headers, shapes and the like, per measurement.
const SMALL: usize = 64 << 10;

#[derive(Module, Debug)]
struct Net<B: Backend> {
    w: Vec<Param<Tensor<B, 1>>>,
}

fn bf16_model() -> Net<B> {
    let dev = Default::default();
    B::seed(&dev, 5);
    // Sizes that straddle buckets and ranks, plus tiny ones; ~2.1 M elements in all.
    let sizes = [300_001, 3 * BUCKET + 17, 5, 123_457, 400_000, 77_777, 1_000_000];
    let w = sizes.iter().map(|&n| Param::from_tensor(Tensor::<B, 1>::random([n], Distribution::Uniform(-1.0, 1.0), &dev).cast(FloatDType::BF16))).collect();
    Net { w }
}

fn trainable(model: &Net<B>) -> TrainableSet {
    let params = param_shapes(model).into_iter().map(|(name, shape)| (name, TrainableParam { shape, lr_multiplier: 1.0, decay: true })).collect();
    TrainableSet { params, total_params: model.w.len() }
}

fn values(model: &Net<B>) -> Vec<Vec<f32>> {
    model.w.iter().map(|p| p.val().into_data().convert::<f32>().to_vec().unwrap()).collect()
}

#[test]
fn the_slice_is_built_and_written_back_bucket_by_bucket() {
    let model = bf16_model();
    let set = trainable(&model);
    let total = set.num_elements();
    let layout = FlatLayout::new(&set, WORLD, 1, BUCKET);
    assert!(layout.buckets.len() > 30, "{} buckets", layout.buckets.len());
    assert_eq!(model.w[0].val().dtype(), burn::tensor::DType::BF16);

    // 1. Rank 1's f32 slice from the bf16 weights: the slice and its runs, nothing bucket-sized
    //    (the f32 copy of one bucket alone would be 256 KiB).
    let dev = Default::default();
    let flat: Vec<Tensor<Flex, 1>> = model.w.iter().map(|p| p.val().inner().reshape([-1])).collect();
    let names = &layout.names;
    let by_layout: Vec<Tensor<Flex, 1>> = names.iter().map(|n| flat[n.trim_start_matches("w.").parse::<usize>().unwrap()].clone()).collect();
    let _ = layout.own_slice(&|p| Some(by_layout[p].clone()), &dev); // warms up the thread pool
    let base = start();
    let slice = layout.own_slice(&|p| Some(by_layout[p].clone()), &dev);
    let (peak, kept) = since(base);
    let slice_bytes = layout.slice_len * 4;
    println!("own_slice: slice {slice_bytes} B, peak +{peak} B, kept +{kept} B");
    assert!(peak <= 2 * slice_bytes + SMALL, "building the slice peaked at {peak} B for a slice of {slice_bytes} B");
    assert!((kept - slice_bytes as isize).unsigned_abs() <= SMALL, "the slice keeps {kept} B for {slice_bytes} B of values");
    assert_eq!(slice.dims(), [layout.slice_len]);
    drop(slice);

    // 2. Both ranks write their master slices back into the bf16 model at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let gate = Arc::new(Barrier::new(WORLD + 1));
    let ranks: Vec<_> = (0..WORLD)
        .map(|rank| {
            let (model, set, gate) = (model.clone(), set.clone(), gate.clone());
            std::thread::spawn(move || {
                let world = World { rank, size: WORLD, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port, launcher: Launcher::Torchrun };
                let comm = Comm::connect(world, &Fingerprint { binary: 0, config: 0 }, Duration::from_secs(30)).unwrap();
                let config = OptimizerConfig { lr: 1e-3, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0, offload: Default::default() };
                let opt = AdamW::new(config, &set, FlatLayout::new(&set, WORLD, rank, BUCKET), &model, &Default::default());
                drop(opt.write_back(model.clone(), &comm).unwrap()); // warm-up
                gate.wait(); // measured from here
                gate.wait();
                let written = opt.write_back(model, &comm).unwrap();
                gate.wait(); // until here
                gate.wait();
                written
            })
        })
        .collect();
    gate.wait();
    let base = start();
    gate.wait();
    gate.wait();
    let (peak, kept) = since(base);
    gate.wait();
    let written: Vec<Net<B>> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    let new_params = WORLD * total * 2; // each rank's new bf16 parameters
    let bucket_f32 = BUCKET * 4;
    println!("write_back on {WORLD} ranks: {total} elements, new bf16 parameters {new_params} B, peak +{peak} B, kept +{kept} B");
    // Kept: the new parameters alone (the old ones are shared with `model` here, so not freed).
    assert!((kept - new_params as isize).unsigned_abs() <= SMALL, "{kept} B kept for {new_params} B of new parameters");
    // Peak: besides them, per rank one gathered bucket and the TCP engine's copies of it (its
    // send buffer, the packed exchange, the unpacked parts, the result) — not the ~33 buckets
    // (8.7 MB per rank) that gathering everything first would hold.
    let allowed = new_params + WORLD * 8 * bucket_f32 + SMALL;
    assert!(peak <= allowed, "writing back peaked at {peak} B, allowed {allowed} B");
    // And the values: bf16 → f32 master → bf16 is exact.
    let want = values(&model);
    for (rank, m) in written.iter().enumerate() {
        assert_eq!(m.w[0].val().dtype(), burn::tensor::DType::BF16, "rank {rank}");
        assert_eq!(values(m), want, "rank {rank}");
    }
}
