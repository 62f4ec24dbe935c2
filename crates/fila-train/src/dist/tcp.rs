//! The TCP engine: rank 0 linked to every other rank (a star), every byte of the run's
//! communication on one thread of its own.
//!
//! [`Star`] holds the links and the operations over them: rank 0 sums in rank order, so every rank
//! gets the same bits and a run is deterministic for a given world size. [`Tcp`] is the handle the
//! rest of the process holds: it queues operations for the thread that owns the star, which runs
//! them in the order they were queued. Every rank queues the same operations in the same order,
//! so the ranks stay in step while the caller goes on computing (the overlap of
//! [`super::Comm::start`]); a blocking call is a queued one waited for at once.
//!
//! Faults never hang: a rank that exits is seen at once (its socket closes), one that stops
//! answering after the timeout, and rank 0 passes a failure it sees on to every other rank, so
//! every rank ends with an error naming the rank at fault.

use super::engine::{Engine, Flat, InFlight, Op, Ready};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

pub(super) const DATA: u8 = 1;
pub(super) const ABORT: u8 = 2;

/// One process's links and the operations over them.
pub(super) struct Star {
    pub rank: usize,
    pub size: usize,
    pub timeout: Duration,
    /// Rank 0: the link to rank r at index r − 1. Other ranks: the link to rank 0.
    pub links: Vec<TcpStream>,
    /// Waited before every tensor collective (`FILA_DIST_DELAY_MS`): a slow network, to measure
    /// how much communication the overlap hides.
    pub delay: Duration,
}

impl Star {
    fn link(&self, rank: usize) -> &TcpStream {
        if self.rank == 0 {
            &self.links[rank - 1]
        } else {
            &self.links[0]
        }
    }

    fn send_to(&self, rank: usize, payload: &[u8]) -> Result<()> {
        write_frame(self.link(rank), DATA, payload).map_err(|e| self.fail(rank, link_error(rank, &e, self.timeout)))
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
        if self.rank == 0 {
            let text = format!("{error:#}");
            let others: Vec<&TcpStream> = (1..self.size).filter(|&r| r != from).map(|r| self.link(r)).collect();
            for l in &others {
                let _ = write_frame(l, ABORT, text.as_bytes());
            }
            linger(&others);
        }
        error
    }

    /// Every rank's `bytes`, in rank order, on every rank.
    pub fn exchange(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        if self.size == 1 {
            return Ok(vec![bytes.to_vec()]);
        }
        if self.rank == 0 {
            let mut all = vec![bytes.to_vec()];
            for r in 1..self.size {
                all.push(self.recv_from(r)?);
            }
            let packed = pack(&all);
            for r in 1..self.size {
                self.send_to(r, &packed)?;
            }
            Ok(all)
        } else {
            self.send_to(0, bytes)?;
            unpack(&self.recv_from(0)?, self.size)
        }
    }

    /// One tensor collective over host values (see [`Op`]).
    pub fn collective(&self, op: Op, values: Vec<f32>) -> Result<Vec<f32>> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let (n, w) = (values.len(), self.size);
        if w == 1 {
            return Ok(values);
        }
        match op {
            Op::AllReduce => self.reduce_and_share(values, |_| 0..n),
            Op::ReduceScatter => {
                let k = n / w;
                self.reduce_and_share(values, |r| r * k..(r + 1) * k)
            }
            Op::AllGather => {
                let mut out = Vec::with_capacity(n * w);
                for (r, b) in self.exchange(&f32_bytes(&values))?.iter().enumerate() {
                    out.extend(bytes_f32(b, n, r)?);
                }
                Ok(out)
            }
            Op::Broadcast { root } => self.broadcast(values, root),
        }
    }

    /// Rank 0 sums every rank's values in rank order and sends rank r the elements `part(r)`.
    fn reduce_and_share(&self, mine: Vec<f32>, part: impl Fn(usize) -> std::ops::Range<usize>) -> Result<Vec<f32>> {
        let n = mine.len();
        if self.rank != 0 {
            self.send_to(0, &f32_bytes(&mine))?;
            return bytes_f32(&self.recv_from(0)?, part(self.rank).len(), 0);
        }
        let mut acc = mine;
        for r in 1..self.size {
            let theirs = bytes_f32(&self.recv_from(r)?, n, r)?;
            for (a, b) in acc.iter_mut().zip(theirs) {
                *a += b;
            }
        }
        for r in 1..self.size {
            self.send_to(r, &f32_bytes(&acc[part(r)]))?;
        }
        acc.truncate(part(0).end);
        Ok(acc.split_off(part(0).start))
    }

    /// Rank `root`'s values on every rank, through rank 0 (the centre of the star).
    fn broadcast(&self, values: Vec<f32>, root: usize) -> Result<Vec<f32>> {
        let (me, n) = (self.rank, values.len());
        let at_centre = match (me, root) {
            (0, 0) => values.clone(),
            (0, _) => bytes_f32(&self.recv_from(root)?, n, root)?,
            _ if me == root => {
                self.send_to(0, &f32_bytes(&values))?;
                Vec::new()
            }
            _ => Vec::new(),
        };
        if me == 0 {
            for r in (1..self.size).filter(|&r| r != root) {
                self.send_to(r, &f32_bytes(&at_centre))?;
            }
        }
        Ok(if me == root {
            values
        } else if me == 0 {
            at_centre
        } else {
            bytes_f32(&self.recv_from(0)?, n, 0)?
        })
    }
}

type Job = Box<dyn FnOnce(&Star) + Send>;

/// The handle to this process's star: operations are queued for the thread that owns it.
pub struct Tcp {
    rank: usize,
    size: usize,
    runner: Runner,
    /// Copies of the links' sockets for [`Tcp::abort`], which must not wait behind queued work.
    abort_links: Vec<TcpStream>,
}

/// Where operations run.
enum Runner {
    /// The queue of the thread that owns the star.
    Thread(Sender<Job>),
    /// A world of one: nothing to send, operations run at once.
    Alone(Star),
}

impl Tcp {
    /// Starts the thread that owns `star` (none for a world of one). The thread ends once this
    /// handle is dropped and its last operation is over; it is not waited for: after a failure
    /// that operation may be waiting on a rank that hangs, and this process must still exit at
    /// once (every operation of a successful run has been waited for already).
    pub(super) fn start(star: Star) -> Result<Self> {
        let (rank, size) = (star.rank, star.size);
        if size == 1 {
            return Ok(Self { rank, size, runner: Runner::Alone(star), abort_links: Vec::new() });
        }
        let abort_links = star.links.iter().map(TcpStream::try_clone).collect::<std::io::Result<_>>().context("copying the rank links")?;
        let (jobs, queue) = channel::<Job>();
        std::thread::Builder::new()
            .name(format!("fila-comm-{rank}"))
            .spawn(move || {
                for job in queue {
                    job(&star);
                }
            })
            .context("starting the communication thread")?;
        Ok(Self { rank, size, runner: Runner::Thread(jobs), abort_links })
    }

    /// Queues `f`; its result arrives on the receiver.
    pub(super) fn submit<T: Send + 'static>(&self, f: impl FnOnce(&Star) -> Result<T> + Send + 'static) -> Receiver<Result<T>> {
        let (tx, rx) = channel();
        match &self.runner {
            Runner::Thread(jobs) => {
                let job: Job = Box::new(move |star| {
                    let _ = tx.send(f(star));
                });
                // A stopped thread drops the job and with it `tx`: the receiver reports that.
                let _ = jobs.send(job);
            }
            Runner::Alone(star) => {
                let _ = tx.send(f(star));
            }
        }
        rx
    }

    /// Queues `f` and waits for it.
    pub(super) fn call<T: Send + 'static>(&self, f: impl FnOnce(&Star) -> Result<T> + Send + 'static) -> Result<T> {
        received(self.rank, self.submit(f))
    }

    /// Tells the other ranks that this one fails with `message` (best effort, on the way out:
    /// they stop at once instead of waiting for the timeout).
    pub fn abort(&self, message: &str) {
        let text = format!("rank {} failed: {message}", self.rank);
        for l in &self.abort_links {
            let _ = write_frame(l, ABORT, text.as_bytes());
        }
        linger(&self.abort_links.iter().collect::<Vec<_>>());
    }
}

/// The result a queued operation sent, or why none came.
fn received<T>(rank: usize, rx: Receiver<Result<T>>) -> Result<T> {
    rx.recv().map_err(|_| anyhow!("rank {rank}: the communication thread stopped (an earlier collective failed or panicked)"))?
}

/// Tensor collectives over the star: the values go to the host on the calling thread (which
/// owns the tensor), travel on the communication thread, and come back as a tensor of the same
/// backend when waited for.
impl Engine for Tcp {
    fn start(&self, op: Op, t: Box<dyn Flat>) -> Result<Box<dyn InFlight>> {
        if self.size == 1 {
            return Ok(Box::new(Ready(t)));
        }
        let values = t.to_host()?;
        let rx = self.submit(move |star| star.collective(op, values));
        Ok(Box::new(TcpInFlight { rank: self.rank, like: t, rx }))
    }
}

struct TcpInFlight {
    rank: usize,
    /// The input: the result is made on its backend and device.
    like: Box<dyn Flat>,
    rx: Receiver<Result<Vec<f32>>>,
}

impl InFlight for TcpInFlight {
    fn wait(self: Box<Self>) -> Result<Box<dyn Flat>> {
        let values = received(self.rank, self.rx)?;
        Ok(self.like.with_values(values))
    }
}

/// Before this process exits: ends its side of `links` and reads what the peers still send until
/// they close (at most 2 s). Closing a socket with unread data would reset the connection and
/// could discard the abort message the peer has not read yet.
pub(super) fn linger(links: &[&TcpStream]) {
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

pub(super) fn link_error(rank: usize, e: &std::io::Error, timeout: Duration) -> anyhow::Error {
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

pub(super) fn write_frame(mut s: &TcpStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()
}

pub(super) fn read_frame(mut s: &TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
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
