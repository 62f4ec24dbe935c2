//! The collectives the trainer uses, behind one type: [`Comm`].
//!
//! One process is a world of one and every collective is the identity. Several processes meet at
//! the rendezvous ([`super::rendezvous`]) and talk over a TCP star ([`super::tcp`]): small host
//! values (losses, token counts, cursors, flags) always, and the tensor collectives unless a
//! device engine took them over. With the `cuda` feature, a run on CUDA with several ranks (or
//! `FILA_NCCL=1`) runs the tensor collectives on NCCL ([`super::nccl`]), on the GPU memory
//! itself; a tensor NCCL cannot reach is then an error, never a silent fall back to TCP.
//!
//! Tensor collectives can be started and waited for later ([`Comm::start`], [`Pending`]): the
//! communication runs on its own thread (TCP) or stream (NCCL) while the caller computes, which
//! is how the optimizer overlaps the gradients' reduce-scatter with the backward pass. Every
//! rank starts the same collectives in the same order; results do not depend on when they are
//! waited for.
//!
//! Faults never hang: a rank that exits is seen at once (its socket closes), one that stops
//! answering after the timeout (`FILA_DIST_TIMEOUT`, seconds), and the first rank to see a
//! failure tells the others, so every rank ends with an error naming the rank at fault.

use super::engine::{Engine, InFlight, Op};
pub use super::rendezvous::Fingerprint;
use super::rendezvous::{accept_ranks, join_root};
use super::tcp::{Star, Tcp};
use super::world::World;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use fila_data::{BadRecordCounts, DataCursor};
use std::marker::PhantomData;
use std::time::{Duration, Instant};

/// How long a rank waits for another before giving up, unless `FILA_DIST_TIMEOUT` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);

/// The collective engine of this process.
pub struct Comm {
    world: World,
    /// How long a collective may wait for another rank (the NCCL engine's too).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    timeout: Duration,
    /// The star: host values always, tensors unless `device_engine` is set.
    tcp: Tcp,
    /// The tensor collectives' engine on the run's device (NCCL), once [`Comm::use_gpu`] set it up.
    device_engine: Option<Box<dyn Engine>>,
}

/// A tensor collective started by [`Comm::start`]; [`Pending::wait`] gives its result.
pub struct Pending<I: Backend> {
    op: Box<dyn InFlight>,
    _backend: PhantomData<I>,
}

impl<I: Backend> Pending<I> {
    pub fn wait(self) -> Result<Tensor<I, 1>> {
        let flat = self.op.wait()?;
        Ok(*flat.into_any().downcast::<Tensor<I, 1>>().expect("an engine answers on the backend it was given"))
    }
}

impl Comm {
    /// A world of one: every collective returns its input.
    pub fn single() -> Self {
        Self::with_links(World::single(), DEFAULT_TIMEOUT, Vec::new(), Duration::ZERO).expect("a world of one starts no thread")
    }

    fn with_links(world: World, timeout: Duration, links: Vec<std::net::TcpStream>, delay: Duration) -> Result<Self> {
        let star = Star { rank: world.rank, size: world.size, timeout, links, delay };
        Ok(Self { tcp: Tcp::start(star)?, world, timeout, device_engine: None })
    }

    /// Moves the tensor collectives of a run on `device` to NCCL: always with several ranks on
    /// CUDA, and with one rank when `FILA_NCCL=1` (to check the NCCL path on a single GPU).
    pub fn use_gpu(&mut self, device: crate::backend::Device) -> Result<()> {
        let crate::backend::Device::Cuda(ordinal) = device else {
            return Ok(());
        };
        if self.world.size == 1 && std::env::var("FILA_NCCL").as_deref() != Ok("1") {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        {
            // The driver, device and toolkit first: a machine without them gets the error that
            // names what is missing (cudarc panics on a missing driver library).
            crate::backend::cuda_preflight(ordinal)?;
            let nccl = super::nccl::Nccl::connect(self.world.rank, self.world.size, ordinal, self.timeout, |mine| Ok(self.exchange(&mine)?.swap_remove(0)))?;
            self.device_engine = Some(Box::new(std::rc::Rc::new(nccl)));
        }
        #[cfg(not(feature = "cuda"))]
        let _ = ordinal;
        Ok(())
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    /// The timeout from `FILA_DIST_TIMEOUT` (seconds) or [`DEFAULT_TIMEOUT`].
    pub fn timeout_from_env() -> Result<Duration> {
        duration_from_env("FILA_DIST_TIMEOUT", 1.0, "seconds above 0", |v| v > 0.0).map(|d| d.unwrap_or(DEFAULT_TIMEOUT))
    }

    /// `FILA_DIST_DELAY_MS`: milliseconds the TCP engine waits before each tensor collective, as
    /// a slow network would (to measure how much communication the overlap hides); 0 when unset.
    pub fn delay_from_env() -> Result<Duration> {
        duration_from_env("FILA_DIST_DELAY_MS", 1e-3, "milliseconds, 0 or more", |v| v >= 0.0).map(Option::unwrap_or_default)
    }

    /// Meets the other ranks of `world` and checks that they run the same binary and config.
    pub fn connect(world: World, fingerprint: &Fingerprint, timeout: Duration) -> Result<Self> {
        Self::connect_with_delay(world, fingerprint, timeout, Duration::ZERO)
    }

    /// [`Comm::connect`] with `delay` before every tensor collective over TCP ([`Comm::delay_from_env`]).
    pub fn connect_with_delay(world: World, fingerprint: &Fingerprint, timeout: Duration, delay: Duration) -> Result<Self> {
        if world.size == 1 {
            return Self::with_links(world, timeout, Vec::new(), delay);
        }
        let deadline = Instant::now() + timeout;
        let links = if world.is_root() { accept_ranks(&world, fingerprint, deadline)? } else { vec![join_root(&world, fingerprint, deadline)?] };
        for l in &links {
            l.set_read_timeout(Some(timeout))?;
            l.set_nodelay(true)?;
        }
        Self::with_links(world, timeout, links, delay)
    }

    /// The run-wide data position, agreed in one exchange: the earliest of the ranks' cursors
    /// (ranks without one, `None`, are left out) and the skipped-record counts summed over ranks
    /// (keeping up to `max_examples` examples).
    pub fn agree_data_position(&self, cursor: Option<DataCursor>, bad: &BadRecordCounts, max_examples: usize) -> Result<(Option<DataCursor>, BadRecordCounts)> {
        let mine = serde_json::to_vec(&(cursor, bad))?;
        let mut earliest: Option<DataCursor> = None;
        let mut skipped = BadRecordCounts::new(max_examples);
        for (rank, bytes) in self.exchange(&mine)?.into_iter().enumerate() {
            let (c, bad): (Option<DataCursor>, BadRecordCounts) =
                serde_json::from_slice(&bytes).with_context(|| format!("rank {rank} sent an unreadable data position"))?;
            if let Some(c) = c.filter(|c| earliest.is_none_or(|m| (c.epoch, c.position) < (m.epoch, m.position))) {
                earliest = Some(c);
            }
            skipped.merge(&bad);
        }
        Ok((earliest, skipped))
    }

    /// Every rank's `bytes`, in rank order, on every rank.
    pub fn exchange(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let bytes = bytes.to_vec();
        self.tcp.call(move |star| star.exchange(&bytes))
    }

    /// Waits until every rank gets here.
    pub fn barrier(&self) -> Result<()> {
        self.exchange(&[]).map(|_| ())
    }

    /// Every rank's f64 values, in rank order, on every rank; all ranks pass as many.
    pub fn gather_f64(&self, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.exchange(&bytes)?;
        all.iter()
            .enumerate()
            .map(|(r, b)| {
                if b.len() != bytes.len() {
                    bail!("rank {r} sent {} values where this rank has {}: the ranks are out of step", b.len() / 8, values.len());
                }
                Ok(b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect())
            })
            .collect()
    }

    /// Element-wise sums of equal-length f64 vectors (rank order, so the same bits everywhere).
    pub fn sum_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        let mut out = vec![0.0f64; values.len()];
        for theirs in self.gather_f64(values)? {
            for (o, v) in out.iter_mut().zip(theirs) {
                *o += v;
            }
        }
        Ok(out)
    }

    /// Starts the tensor collective `op` on the flat f32 tensor `t`; the caller may compute while
    /// it runs and takes the result with [`Pending::wait`]. A reduce-scatter's length must be a
    /// multiple of the world size (NCCL would drop the tail silently; checked before either
    /// engine sees it), a broadcast's root a rank.
    pub fn start<I: Backend>(&self, op: Op, t: Tensor<I, 1>) -> Result<Pending<I>> {
        let (n, w) = (t.dims()[0], self.world.size);
        match op {
            Op::ReduceScatter => assert_eq!(n % w, 0, "reduce_scatter of {n} elements over {w} ranks"),
            Op::Broadcast { root } => assert!(root < w, "broadcast from rank {root} in a world of {w}"),
            Op::AllReduce | Op::AllGather => {}
        }
        let engine: &dyn Engine = self.device_engine.as_deref().unwrap_or(&self.tcp);
        Ok(Pending { op: engine.start(op, Box::new(t))?, _backend: PhantomData })
    }

    /// The sum over ranks of a flat tensor, on every rank.
    pub fn all_reduce<I: Backend>(&self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>> {
        self.start(Op::AllReduce, t)?.wait()
    }

    /// Sums a flat tensor over ranks and keeps this rank's slice: rank r gets elements
    /// `[r·n/W, (r+1)·n/W)`. `n` must be a multiple of the world size.
    pub fn reduce_scatter<I: Backend>(&self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>> {
        self.start(Op::ReduceScatter, t)?.wait()
    }

    /// Every rank's equal-length slice, concatenated in rank order, on every rank.
    pub fn all_gather<I: Backend>(&self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>> {
        self.start(Op::AllGather, t)?.wait()
    }

    /// Rank `root`'s flat tensor on every rank (`t` is only read on `root`; the others pass any
    /// tensor of the same length).
    pub fn broadcast<I: Backend>(&self, t: Tensor<I, 1>, root: usize) -> Result<Tensor<I, 1>> {
        self.start(Op::Broadcast { root }, t)?.wait()
    }

    /// Tells the other ranks that this one fails with `message` (best effort: called on the way
    /// out, so they stop at once instead of waiting for the timeout).
    pub fn abort(&self, message: &str) {
        self.tcp.abort(message);
    }
}

/// Environment variable `key` as a duration of `unit` seconds per unit, `None` when unset; a value
/// that is not a number or fails `valid` is an error saying what was `expected`.
fn duration_from_env(key: &str, unit: f64, expected: &str, valid: impl Fn(f64) -> bool) -> Result<Option<Duration>> {
    let Ok(s) = std::env::var(key) else {
        return Ok(None);
    };
    let v: f64 = s.trim().parse().ok().filter(|v| valid(*v)).with_context(|| format!("{key}={s:?}: expected {expected}"))?;
    Ok(Some(Duration::from_secs_f64(v * unit)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;
    use std::net::TcpListener;

    /// Runs `f` on `n` ranks (threads) meeting on a free loopback port.
    fn ranks<T: Send + 'static>(n: usize, fingerprints: Vec<Fingerprint>, f: impl Fn(Result<Comm>) -> T + Send + Sync + Copy + 'static) -> Vec<T> {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let fp = fingerprints[rank].clone();
                std::thread::spawn(move || {
                    let world = World {
                        rank,
                        size: n,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        launcher: super::super::world::Launcher::Torchrun,
                    };
                    f(Comm::connect(world, &fp, Duration::from_secs(20)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn same(n: usize) -> Vec<Fingerprint> {
        vec![Fingerprint { binary: 1, config: 2 }; n]
    }

    fn t(v: Vec<f32>) -> Tensor<Flex, 1> {
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), &Default::default())
    }

    fn vals(t: Tensor<Flex, 1>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    #[test]
    fn collectives_over_three_ranks() {
        let out = ranks(3, same(3), |c| {
            let c = c.unwrap();
            let r = c.world().rank as f32;
            let sum = vals(c.all_reduce(t(vec![r, 10.0 * r, 1.0])).unwrap());
            let scat = vals(c.reduce_scatter(t((0..6).map(|i| i as f32 + r).collect())).unwrap());
            let gath = vals(c.all_gather(t(vec![r, r + 0.5])).unwrap());
            let f = c.sum_f64(&[r as f64, 1.0]).unwrap();
            // From the centre of the star and from another rank.
            let from0 = vals(c.broadcast(t(vec![r + 1.0, -r]), 0).unwrap());
            let from2 = vals(c.broadcast(t(vec![r + 1.0, -r]), 2).unwrap());
            assert_eq!((from0, from2), (vec![1.0, 0.0], vec![3.0, -2.0]), "rank {r}");
            c.barrier().unwrap();
            (sum, scat, gath, f)
        });
        for (rank, (sum, scat, gath, f)) in out.into_iter().enumerate() {
            assert_eq!(sum, vec![3.0, 30.0, 3.0]);
            // Σ_r (i + r) = 3i + 3; rank k keeps elements 2k, 2k+1.
            let i = 2.0 * rank as f32;
            assert_eq!(scat, vec![3.0 * i + 3.0, 3.0 * (i + 1.0) + 3.0]);
            assert_eq!(gath, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
            assert_eq!(f, vec![3.0, 3.0]);
        }
    }

    /// A length that does not split evenly stops every rank before anything is sent (NCCL's
    /// reduce-scatter would drop the tail silently; the check comes before either engine).
    #[test]
    fn reduce_scatter_refuses_a_length_that_does_not_split() {
        let out = ranks(2, same(2), |c| {
            let c = c.unwrap();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.reduce_scatter(t(vec![1.0; 5]))))
                .map(|_| ())
                .map_err(|p| p.downcast_ref::<String>().cloned().unwrap_or_default())
        });
        for r in out {
            let e = r.unwrap_err();
            assert!(e.contains("reduce_scatter of 5 elements over 2 ranks"), "{e}");
        }
    }

    #[test]
    fn a_different_config_is_refused_naming_the_rank() {
        let mut fps = same(3);
        fps[2].config = 99;
        let out = ranks(3, fps, |c| c.map(|_| ()).map_err(|e| format!("{e:#}")));
        for r in out {
            let e = r.unwrap_err();
            assert!(e.contains("rank 2 resolved a different config"), "{e}");
        }
    }

    #[test]
    fn a_rank_that_leaves_ends_the_others_with_its_name() {
        let out = ranks(3, same(3), |c| {
            let c = c.unwrap();
            if c.world().rank == 1 {
                drop(c); // exits without a word
                return String::new();
            }
            format!("{:#}", c.barrier().unwrap_err())
        });
        assert!(out[0].contains("rank 1 closed its connection"), "{}", out[0]);
        assert!(out[2].contains("rank 1 closed its connection"), "{}", out[2]);
    }

    #[test]
    fn a_rank_that_stops_answering_times_out() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let world = |rank| World {
            rank,
            size: 2,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            launcher: super::super::world::Launcher::Torchrun,
        };
        let fp = Fingerprint { binary: 1, config: 1 };
        let fp2 = fp.clone();
        let w1 = world(1);
        let stuck = std::thread::spawn(move || {
            let c = Comm::connect(w1, &fp2, Duration::from_secs(20)).unwrap();
            std::thread::sleep(Duration::from_secs(3));
            drop(c);
        });
        let c = Comm::connect(world(0), &fp, Duration::from_millis(500)).unwrap();
        let started = Instant::now();
        let e = format!("{:#}", c.barrier().unwrap_err());
        assert!(e.contains("rank 1 did not answer within 0.5 s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        stuck.join().unwrap();
    }
}
