//! The rendezvous: the ranks meet at `MASTER_ADDR:MASTER_PORT` (rank 0 listens, the others
//! connect, retrying until the timeout) and check that they run the same binary and the same
//! resolved config ([`Fingerprint`]). A refusal reaches every rank with its reason.

use super::tcp::{linger, link_error, read_frame, write_frame, ABORT, DATA};
use super::world::World;
use anyhow::{anyhow, bail, Context, Result};
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

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

/// Rank 0: accepts the other ranks until the deadline, checks their fingerprints, answers each.
/// A refusal waits for every rank to join (or the deadline) so each of them hears the reason.
pub(super) fn accept_ranks(world: &World, fingerprint: &Fingerprint, deadline: Instant) -> Result<Vec<TcpStream>> {
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
pub(super) fn join_root(world: &World, fingerprint: &Fingerprint, deadline: Instant) -> Result<TcpStream> {
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
