//! The collectives the trainer uses, behind one type: [`Comm`].
//!
//! One process is a world of one and every collective is the identity. Several processes meet at
//! `MASTER_ADDR:MASTER_PORT`: rank 0 listens, the others connect (a star over TCP). Tensor
//! collectives on the CPU backend go through that star: rank 0 sums in rank order, so every
//! rank gets the same bits and a run is deterministic for a given world size. Small host values
//! (losses, token counts, cursors, flags) always travel over TCP.
//!
//! With the `cuda` feature, a run on CUDA with several ranks (or `FILA_NCCL=1`) runs the tensor
//! collectives on NCCL instead ([`super::nccl`]), on the GPU memory itself; a tensor NCCL cannot
//! reach is then an error, never a silent fall back to TCP.
//!
//! Faults never hang: a rank that exits is seen at once (its socket closes), one that stops
//! answering after the timeout (`FILA_DIST_TIMEOUT`, seconds), and the first rank to see a
//! failure tells the others, so every rank ends with an error naming the rank at fault.

use super::world::World;
use anyhow::{anyhow, bail, Context, Result};
use burn::prelude::*;
use burn::tensor::TensorData;
use fila_data::{BadRecordCounts, DataCursor};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long a rank waits for another before giving up, unless `FILA_DIST_TIMEOUT` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);

/// What every rank must agree on before training: the same program and the same run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub binary: u64,
    pub config: u64,
}

impl Fingerprint {
    /// Hashes this executable's bytes and the resolved config text.
    pub fn of_this_process(config_text: &str) -> Result<Self> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let bytes = std::fs::read(&exe).with_context(|| format!("reading {} to compare binaries across ranks", exe.display()))?;
        Ok(Self { binary: hash(&bytes), config: hash(config_text.as_bytes()) })
    }

    fn to_bytes(&self) -> Vec<u8> {
        [self.binary.to_le_bytes(), self.config.to_le_bytes()].concat()
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == 16).then(|| Self { binary: u64::from_le_bytes(b[..8].try_into().unwrap()), config: u64::from_le_bytes(b[8..].try_into().unwrap()) })
    }
}

/// FNV-1a: fixed, so every rank computes the same value for the same bytes.
fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

const DATA: u8 = 1;
const ABORT: u8 = 2;

/// The collective engine of this process.
pub struct Comm {
    world: World,
    timeout: Duration,
    /// Rank 0: the link to rank r at index r − 1. Other ranks: the link to rank 0.
    links: Vec<TcpStream>,
    /// Tensor collectives on CUDA tensors, once [`Comm::use_gpu`] set them up.
    #[cfg(feature = "cuda")]
    nccl: Option<super::nccl::Nccl>,
}

impl Comm {
    /// A world of one: every collective returns its input.
    pub fn single() -> Self {
        Self::new(World::single(), DEFAULT_TIMEOUT, Vec::new())
    }

    fn new(world: World, timeout: Duration, links: Vec<TcpStream>) -> Self {
        Self {
            world,
            timeout,
            links,
            #[cfg(feature = "cuda")]
            nccl: None,
        }
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
            self.nccl = Some(nccl);
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
        match std::env::var("FILA_DIST_TIMEOUT") {
            Ok(s) => {
                let secs: f64 =
                    s.trim().parse().ok().filter(|v: &f64| *v > 0.0).with_context(|| format!("FILA_DIST_TIMEOUT={s:?}: expected seconds above 0"))?;
                Ok(Duration::from_secs_f64(secs))
            }
            Err(_) => Ok(DEFAULT_TIMEOUT),
        }
    }

    /// Meets the other ranks of `world` and checks that they run the same binary and config.
    pub fn connect(world: World, fingerprint: &Fingerprint, timeout: Duration) -> Result<Self> {
        if world.size == 1 {
            return Ok(Self::new(world, timeout, Vec::new()));
        }
        let deadline = Instant::now() + timeout;
        let links = if world.is_root() { accept_ranks(&world, fingerprint, deadline)? } else { vec![join_root(&world, fingerprint, deadline)?] };
        for l in &links {
            l.set_read_timeout(Some(timeout))?;
            l.set_nodelay(true)?;
        }
        Ok(Self::new(world, timeout, links))
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
        if self.world.size == 1 {
            return Ok(vec![bytes.to_vec()]);
        }
        if self.world.is_root() {
            let mut all = vec![bytes.to_vec()];
            for r in 1..self.world.size {
                all.push(self.recv_from(r)?);
            }
            let packed = pack(&all);
            for r in 1..self.world.size {
                self.send_to(r, DATA, &packed)?;
            }
            Ok(all)
        } else {
            self.send_to(0, DATA, bytes)?;
            unpack(&self.recv_from(0)?, self.world.size)
        }
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

    /// The sum over ranks of a flat tensor, on every rank.
    pub fn all_reduce<I: Backend>(&self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>> {
        #[cfg(feature = "cuda")]
        if let Some(nccl) = &self.nccl {
            return nccl.all_reduce(&t);
        }
        let n = t.dims()[0];
        self.reduce_and_share(t, |_| 0..n)
    }

    /// Sums a flat tensor over ranks and keeps this rank's slice: rank r gets elements
    /// `[r·n/W, (r+1)·n/W)`. `n` must be a multiple of the world size.
    pub fn reduce_scatter<I: Backend>(&self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>> {
        let (n, w) = (t.dims()[0], self.world.size);
        // NCCL would drop the tail silently.
        assert_eq!(n % w, 0, "reduce_scatter of {n} elements over {w} ranks");
        #[cfg(feature = "cuda")]
        if let Some(nccl) = &self.nccl {
            return nccl.reduce_scatter(&t);
        }
        let k = n / w;
        self.reduce_and_share(t, |r| r * k..(r + 1) * k)
    }

    /// The TCP path of both reductions: rank 0 sums in rank order and sends rank r the elements
    /// `part(r)` of the sum.
    fn reduce_and_share<I: Backend>(&self, t: Tensor<I, 1>, part: impl Fn(usize) -> std::ops::Range<usize>) -> Result<Tensor<I, 1>> {
        if self.world.size == 1 {
            return Ok(t);
        }
        let device = t.device();
        let summed = self.reduce_at_root(&t)?;
        let mine = if self.world.is_root() {
            for r in 1..self.world.size {
                self.send_to(r, DATA, &f32_bytes(&summed[part(r)]))?;
            }
            summed[part(0)].to_vec()
        } else {
            bytes_f32(&self.recv_from(0)?, part(self.world.rank).len(), 0)?
        };
        let k = mine.len();
        Ok(Tensor::from_data(TensorData::new(mine, [k]), &device))
    }

    /// Every rank's equal-length slice, concatenated in rank order, on every rank.
    pub fn all_gather<I: Backend>(&self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>> {
        let w = self.world.size;
        #[cfg(feature = "cuda")]
        if let Some(nccl) = &self.nccl {
            return nccl.all_gather(&t);
        }
        if w == 1 {
            return Ok(t);
        }
        let device = t.device();
        let k = t.dims()[0];
        let all = self.exchange(&f32_bytes(&t.into_data().to_vec::<f32>().map_err(|e| anyhow!("{e:?}"))?))?;
        let mut out = Vec::with_capacity(k * w);
        for (r, b) in all.iter().enumerate() {
            out.extend(bytes_f32(b, k, r)?);
        }
        Ok(Tensor::from_data(TensorData::new(out, [k * w]), &device))
    }

    /// Rank `root`'s flat tensor on every rank (`t` is only read on `root`; the others pass any
    /// tensor of the same length).
    pub fn broadcast<I: Backend>(&self, t: Tensor<I, 1>, root: usize) -> Result<Tensor<I, 1>> {
        let (w, me) = (self.world.size, self.world.rank);
        assert!(root < w, "broadcast from rank {root} in a world of {w}");
        #[cfg(feature = "cuda")]
        if let Some(nccl) = &self.nccl {
            return nccl.broadcast(&t, root);
        }
        if w == 1 {
            return Ok(t);
        }
        let device = t.device();
        let n = t.dims()[0];
        let values = if me == root { t.into_data().to_vec::<f32>().map_err(|e| anyhow!("{e:?}"))? } else { Vec::new() };
        // Through rank 0, the centre of the star.
        let at_centre = match (me, root) {
            (0, 0) => values.clone(),
            (0, _) => bytes_f32(&self.recv_from(root)?, n, root)?,
            (_, _) if me == root => {
                self.send_to(0, DATA, &f32_bytes(&values))?;
                Vec::new()
            }
            _ => Vec::new(),
        };
        if me == 0 {
            for r in (1..w).filter(|&r| r != root) {
                self.send_to(r, DATA, &f32_bytes(&at_centre))?;
            }
        }
        let mine = if me == root {
            values
        } else if me == 0 {
            at_centre
        } else {
            bytes_f32(&self.recv_from(0)?, n, 0)?
        };
        Ok(Tensor::from_data(TensorData::new(mine, [n]), &device))
    }

    /// Tells the other ranks that this one fails with `message` (best effort: called on the way
    /// out, so they stop at once instead of waiting for the timeout).
    pub fn abort(&self, message: &str) {
        let text = format!("rank {} failed: {message}", self.world.rank);
        for l in &self.links {
            let _ = write_frame(l, ABORT, text.as_bytes());
        }
        linger(&self.links.iter().collect::<Vec<_>>());
    }

    /// Rank 0 receives every rank's vector and sums them in rank order; other ranks send theirs
    /// and get an empty vector back.
    fn reduce_at_root<I: Backend>(&self, t: &Tensor<I, 1>) -> Result<Vec<f32>> {
        let n = t.dims()[0];
        let mine: Vec<f32> = t.to_data().convert::<f32>().to_vec().map_err(|e| anyhow!("{e:?}"))?;
        if !self.world.is_root() {
            self.send_to(0, DATA, &f32_bytes(&mine))?;
            return Ok(Vec::new());
        }
        let mut acc = mine;
        for r in 1..self.world.size {
            let theirs = bytes_f32(&self.recv_from(r)?, n, r)?;
            for (a, b) in acc.iter_mut().zip(theirs) {
                *a += b;
            }
        }
        Ok(acc)
    }

    fn link(&self, rank: usize) -> &TcpStream {
        if self.world.is_root() {
            &self.links[rank - 1]
        } else {
            &self.links[0]
        }
    }

    fn send_to(&self, rank: usize, tag: u8, payload: &[u8]) -> Result<()> {
        write_frame(self.link(rank), tag, payload).map_err(|e| self.fail(rank, link_error(rank, &e, self.timeout)))
    }

    fn recv_from(&self, rank: usize) -> Result<Vec<u8>> {
        match read_frame(self.link(rank)) {
            Ok((DATA, payload)) => Ok(payload),
            Ok((_, payload)) => {
                let message = String::from_utf8_lossy(&payload).into_owned();
                Err(self.fail(rank, anyhow!("{message}")))
            }
            Err(e) => Err(self.fail(rank, link_error(rank, &e, self.timeout))),
        }
    }

    /// On rank 0, a failure seen on one link is passed on to every other rank before returning.
    fn fail(&self, from: usize, error: anyhow::Error) -> anyhow::Error {
        if self.world.is_root() {
            let text = format!("{error:#}");
            let others: Vec<&TcpStream> = (1..self.world.size).filter(|&r| r != from).map(|r| self.link(r)).collect();
            for l in &others {
                let _ = write_frame(l, ABORT, text.as_bytes());
            }
            linger(&others);
        }
        error
    }
}

/// Before this process exits: ends its side of `links` and reads what the peers still send until
/// they close (at most 2 s). Closing a socket with unread data would reset the connection and
/// could discard the abort message the peer has not read yet.
fn linger(links: &[&TcpStream]) {
    let deadline = Instant::now() + Duration::from_secs(2);
    for l in links {
        let _ = l.shutdown(std::net::Shutdown::Write);
    }
    for mut l in links.iter().copied() {
        let mut sink = [0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || l.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match l.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

fn link_error(rank: usize, e: &std::io::Error, timeout: Duration) -> anyhow::Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => anyhow!(
            "rank {rank} did not answer within {} s: it is stuck or much slower than the others (raise FILA_DIST_TIMEOUT if it is only slow)",
            timeout.as_secs_f64()
        ),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            anyhow!("rank {rank} closed its connection: it exited or was killed (see its own output)")
        }
        _ => anyhow!("talking to rank {rank}: {e}"),
    }
}

fn write_frame(mut s: &TcpStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()
}

fn read_frame(mut s: &TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

fn pack(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for p in parts {
        out.extend((p.len() as u64).to_le_bytes());
        out.extend(p);
    }
    out
}

fn unpack(mut bytes: &[u8], count: usize) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        if bytes.len() < 8 {
            bail!("a truncated message from rank 0");
        }
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let body = bytes.get(8..8 + len).context("a truncated message from rank 0")?;
        out.push(body.to_vec());
        bytes = &bytes[8 + len..];
    }
    Ok(out)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8], n: usize, rank: usize) -> Result<Vec<f32>> {
    if b.len() != 4 * n {
        bail!("rank {rank} sent {} values where {n} were expected: the ranks are out of step", b.len() / 4);
    }
    Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
}

/// Rank 0: accepts the other ranks until the deadline, checks their fingerprints, answers each.
/// A refusal waits for every rank to join (or the deadline) so each of them hears the reason.
fn accept_ranks(world: &World, fingerprint: &Fingerprint, deadline: Instant) -> Result<Vec<TcpStream>> {
    let listener = TcpListener::bind(("0.0.0.0", world.master_port))
        .with_context(|| format!("rank 0 cannot listen on port {} (in use by another run? set MASTER_PORT to a free port)", world.master_port))?;
    listener.set_nonblocking(true)?;
    let mut links: Vec<Option<TcpStream>> = (1..world.size).map(|_| None).collect();
    // Connections that cannot take a rank's place (a duplicate or out-of-range rank).
    let mut strays: Vec<TcpStream> = Vec::new();
    let mut refusal: Option<String> = None;
    while links.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))?;
                let (_, hello) = read_frame(&s).context("reading a joining rank's greeting")?;
                let rank = u32::from_le_bytes(hello.get(..4).context("a short greeting")?.try_into().unwrap()) as usize;
                let theirs = Fingerprint::from_bytes(&hello[4..]).context("a malformed greeting")?;
                if rank == 0 || rank >= world.size || links[rank - 1].is_some() {
                    refusal.get_or_insert(format!("rank 0 refused a process calling itself rank {rank}: ranks must be 1..{} and unique", world.size - 1));
                    strays.push(s);
                    continue;
                }
                if theirs.binary != fingerprint.binary {
                    refusal.get_or_insert(format!("rank {rank} runs a different fila-train binary than rank 0: install the same build on every node"));
                } else if theirs.config != fingerprint.config {
                    refusal.get_or_insert(format!(
                        "rank {rank} resolved a different config than rank 0: give every rank the same config file, overrides and checkpoint folder"
                    ));
                }
                links[rank - 1] = Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = links.iter().enumerate().filter(|(_, l)| l.is_none()).map(|(i, _)| (i + 1).to_string()).collect();
                    refusal.get_or_insert(format!(
                        "rank 0 waited at port {} for ranks {} that never joined: start all {} processes (and check MASTER_ADDR / firewall)",
                        world.master_port,
                        missing.join(", "),
                        world.size
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("accepting a rank"),
        }
    }
    if let Some(text) = refusal {
        let joined: Vec<&TcpStream> = links.iter().flatten().chain(&strays).collect();
        for l in &joined {
            let _ = write_frame(l, ABORT, text.as_bytes());
        }
        linger(&joined);
        bail!("{text}");
    }
    let links: Vec<TcpStream> = links.into_iter().map(Option::unwrap).collect();
    for l in &links {
        write_frame(l, DATA, b"ok")?;
    }
    Ok(links)
}

/// Other ranks: connects to rank 0 (retrying until the deadline: it may start later) and greets it.
fn join_root(world: &World, fingerprint: &Fingerprint, deadline: Instant) -> Result<TcpStream> {
    let target = format!("{}:{}", world.master_addr, world.master_port);
    let stream = loop {
        let attempt = target.to_socket_addrs().map_err(anyhow::Error::from).and_then(|mut addrs| {
            let addr = addrs.next().ok_or_else(|| anyhow!("no address"))?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(anyhow::Error::from)
        });
        match attempt {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                bail!("rank {} could not reach rank 0 at {target} before the timeout ({e}): is rank 0 running, and MASTER_ADDR/MASTER_PORT right?", world.rank)
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))?;
    let mut hello = (world.rank as u32).to_le_bytes().to_vec();
    hello.extend(fingerprint.to_bytes());
    write_frame(&stream, DATA, &hello)?;
    match read_frame(&stream) {
        Ok((DATA, _)) => Ok(stream),
        Ok((_, why)) => bail!("{}", String::from_utf8_lossy(&why)),
        Err(e) => Err(link_error(0, &e, deadline.saturating_duration_since(Instant::now()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

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
