//! `fila-train --nproc-per-node N`: starts N ranks of this node as child processes, as torchrun
//! does, and watches them: when one fails the others are given [`GRACE`] to stop on their own
//! (they see the failure through their collectives), then killed, as torchrun kills the group.
//! Checkpoints are written atomically, so a kill loses nothing already written.

use super::world::DEFAULT_PORT;
use anyhow::{anyhow, bail, Context, Result};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long the other ranks may take to stop after one failed before they are killed.
pub const GRACE: Duration = Duration::from_secs(15);

/// Runs `args` (this program's arguments without `--nproc-per-node`) as `n` ranks on this host;
/// `stop` is the launcher's own SIGINT/SIGTERM flag, passed on to the ranks.
pub fn spawn_local_ranks(n: usize, args: &[String], stop: &AtomicBool) -> Result<()> {
    if n == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p.trim().parse::<u16>().with_context(|| format!("MASTER_PORT={p:?} is not a port number"))?,
        Err(_) => free_port().unwrap_or(DEFAULT_PORT),
    };
    let mut children: Vec<Child> = Vec::with_capacity(n);
    for rank in 0..n {
        let child = Command::new(&exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank}"));
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                for c in &mut children {
                    let _ = c.kill();
                }
                return Err(e);
            }
        }
    }
    let mut status: Vec<Option<ExitStatus>> = vec![None; n];
    let mut first_failure: Option<(usize, ExitStatus, Instant)> = None;
    let mut forwarded = false;
    loop {
        for (rank, c) in children.iter_mut().enumerate() {
            if status[rank].is_none() {
                if let Some(s) = c.try_wait()? {
                    status[rank] = Some(s);
                    if !s.success() && first_failure.is_none() {
                        first_failure = Some((rank, s, Instant::now()));
                    }
                }
            }
        }
        if status.iter().all(Option::is_some) {
            break;
        }
        if stop.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            for c in &children {
                signal(c, libc::SIGINT);
            }
        }
        if let Some((_, _, at)) = first_failure {
            // The others usually learn of the failure from their collectives; a rank still waiting
            // at the rendezvous for the failed one would wait for the whole timeout.
            if at.elapsed() > GRACE {
                for (rank, c) in children.iter_mut().enumerate() {
                    if status[rank].is_none() {
                        eprintln!("launcher: rank {rank} did not stop after another rank failed; killing it");
                        let _ = c.kill();
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match first_failure {
        None => Ok(()),
        Some((rank, s, _)) => Err(anyhow!("rank {rank} of {n} failed ({s}); see its error above")),
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: `kill` with a child's pid and a valid signal number has no memory effects here.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// A port the OS reports free now (another process may still take it before rank 0 binds it).
fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok().map(|a| a.port())
}
