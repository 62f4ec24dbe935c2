//! Who this process is in a multi-process run: rank, world size, local rank and the rendezvous
//! address, read from the environment the way torchrun and SLURM's `srun` set it.

use anyhow::{bail, Context, Result};

/// torchrun's default rendezvous port, used when neither `MASTER_PORT` nor a flag names one.
pub const DEFAULT_PORT: u16 = 29500;

/// This process's place in the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// Rank within this node: picks the GPU (`cuda:<local_rank>`).
    pub local_rank: usize,
    /// Where rank 0 listens for the others (host, port).
    pub master_addr: String,
    pub master_port: u16,
    /// Which launcher set the variables (for messages).
    pub launcher: Launcher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher: one process.
    None,
    /// `RANK` / `WORLD_SIZE` / `LOCAL_RANK` (torchrun, `--nproc-per-node`, or set by hand).
    Torchrun,
    /// `SLURM_PROCID` / `SLURM_NTASKS` / `SLURM_LOCALID` (`srun`).
    Slurm,
}

impl World {
    pub fn single() -> Self {
        Self { rank: 0, size: 1, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: DEFAULT_PORT, launcher: Launcher::None }
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// `rank 3/8: ` in multi-process runs, nothing otherwise: prefixes every message a rank prints.
    pub fn tag(&self) -> String {
        if self.size > 1 {
            format!("rank {}/{}: ", self.rank, self.size)
        } else {
            String::new()
        }
    }

    /// Reads the process environment (see [`World::from_vars`]).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// torchrun's variables win over SLURM's (torchrun inside an `sbatch` job sets both); with
    /// neither, a single process. `get` looks a variable up.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |key: &str| -> Result<Option<usize>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).with_context(|| format!("environment variable {key}={v:?} is not a number")),
            }
        };
        let (rank, size, local_rank, launcher) = if let Some(size) = num("WORLD_SIZE")? {
            let rank = num("RANK")?.context("WORLD_SIZE is set but RANK is not: start the ranks with torchrun or set both")?;
            (rank, size, num("LOCAL_RANK")?.unwrap_or(rank), Launcher::Torchrun)
        } else if let (Some(rank), Some(size)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            (rank, size, num("SLURM_LOCALID")?.unwrap_or(0), Launcher::Slurm)
        } else {
            return Ok(Self::single());
        };
        if size == 0 || rank >= size {
            bail!("rank {rank} is outside a world of {size} processes (check RANK/WORLD_SIZE or the srun task count)");
        }
        let master_addr = match (get("MASTER_ADDR"), launcher) {
            (Some(a), _) if !a.trim().is_empty() => a.trim().to_string(),
            (_, Launcher::Slurm) => {
                let list = get("SLURM_JOB_NODELIST")
                    .or_else(|| get("SLURM_NODELIST"))
                    .context("under srun without MASTER_ADDR, the rendezvous host comes from SLURM_JOB_NODELIST, which is not set: export MASTER_ADDR")?;
                first_host(&list)?
            }
            _ if size == 1 => "127.0.0.1".into(),
            _ => bail!("WORLD_SIZE={size} but MASTER_ADDR is not set: export the host of rank 0 (torchrun sets it)"),
        };
        let master_port = match get("MASTER_PORT") {
            Some(p) => p.trim().parse().with_context(|| format!("environment variable MASTER_PORT={p:?} is not a port number"))?,
            None => DEFAULT_PORT,
        };
        Ok(Self { rank, size, local_rank, master_addr, master_port, launcher })
    }
}

/// The first host of a SLURM node list: `gpu[003-010,012],login1` → `gpu003`.
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    let bad = || anyhow::anyhow!("cannot read the SLURM node list {list:?}: export MASTER_ADDR instead");
    // The first entry ends at the first comma outside brackets.
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    let host = match entry.split_once('[') {
        None => entry.to_string(),
        Some((prefix, rest)) => {
            let ranges = rest.strip_suffix(']').ok_or_else(bad)?;
            let first = ranges.split(',').next().ok_or_else(bad)?;
            // Zero padding is part of the name: keep the range's first bound as written.
            let start = first.split('-').next().ok_or_else(bad)?;
            if start.is_empty() || !start.chars().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            format!("{prefix}{start}")
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<World> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        World::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn no_launcher_is_one_process() {
        assert_eq!(world(&[]).unwrap(), World::single());
    }

    #[test]
    fn torchrun_variables() {
        let w = world(&[("RANK", "11"), ("WORLD_SIZE", "16"), ("LOCAL_RANK", "3"), ("MASTER_ADDR", "node7"), ("MASTER_PORT", "29555")]).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.master_addr.as_str(), w.master_port), (11, 16, 3, "node7", 29555));
        assert_eq!(w.launcher, Launcher::Torchrun);
        assert_eq!(w.tag(), "rank 11/16: ");
        // torchrun inside an sbatch job: its variables win.
        let w = world(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.master_port), (1, 2, 1, DEFAULT_PORT));
        let e = world(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = world(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")]).unwrap_err().to_string();
        assert!(e.contains("rank 2 is outside a world of 2"), "{e}");
        let e = world(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
    }

    #[test]
    fn slurm_variables_and_node_lists() {
        let w = world(&[("SLURM_PROCID", "9"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "1"), ("SLURM_JOB_NODELIST", "gpu[007-008]")]).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.master_addr.as_str(), w.master_port), (9, 16, 1, "gpu007", DEFAULT_PORT));
        assert_eq!(w.launcher, Launcher::Slurm);
        let w = world(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_JOB_NODELIST", "x"), ("MASTER_ADDR", "10.0.0.5")]).unwrap();
        assert_eq!(w.master_addr, "10.0.0.5");
        assert_eq!(first_host("node[01-04,07],login1").unwrap(), "node01");
        assert_eq!(first_host("a1,b[2-3]").unwrap(), "a1");
        assert_eq!(first_host("c[10,3-4]").unwrap(), "c10");
        assert!(first_host("d[]").is_err());
        let e = world(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]).unwrap_err().to_string();
        assert!(e.contains("SLURM_JOB_NODELIST"), "{e}");
    }
}
