//! `fila-train --config C [--set k=v]... [--resume [DIR]] [--plan [--world-size N]] [--nproc-per-node N]`.
//!
//! One process per GPU: under torchrun or srun each process reads its rank from the environment
//! ([`World::from_env`]); `--nproc-per-node N` starts the N ranks of one node itself.

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use fila_train::backend::{dispatch, OnBackend};
use fila_train::config::LoadedConfig;
use fila_train::dist::{launch, Comm, Fingerprint, World};
use fila_train::trainer::{self, Resume, RunOptions};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "fila-train", version, about = "Train FILA (stage 1 or 2) from a TOML config")]
struct Cli {
    /// The run config (see configs/).
    #[arg(long)]
    config: PathBuf,
    /// Override a config key, e.g. `--set optimizer.lr=1e-4` (repeatable, applied in order).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from the newest checkpoint in the output folder, or from DIR.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    resume: Option<Option<PathBuf>>,
    /// Print the memory plan and exit (allocates nothing).
    #[arg(long)]
    plan: bool,
    /// Ranks the plan assumes (default: the launcher's WORLD_SIZE / SLURM_NTASKS, else 1).
    #[arg(long, value_name = "N", requires = "plan")]
    world_size: Option<usize>,
    /// Print each step's heap use by phase (forward segments, loss, backward, optimizer) and the
    /// process's peak resident set, to check `--plan` against (docs/memory-plan.md).
    #[arg(long)]
    profile_memory: bool,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
    /// Stop with a checkpoint after this many steps in this invocation (as a signal would).
    #[arg(long, value_name = "STEPS")]
    stop_after: Option<u64>,
    /// Start N ranks on this node (one per GPU, or N CPU processes), as `torchrun
    /// --nproc-per-node N` would.
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,
}

#[global_allocator]
static HEAP: fila_train::alloc::Counting = fila_train::alloc::Counting;

fn main() {
    fila_train::alloc::keep_freed_memory();
    let world = World::from_env();
    let tag = world.as_ref().map(World::tag).unwrap_or_default();
    if let Err(e) = real_main(world) {
        eprintln!("{tag}error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(world: Result<World>) -> Result<()> {
    let cli = Cli::parse();
    fila_train::kernel_events::install();
    let world = world?;
    if let Some(n) = cli.nproc_per_node {
        return launch_ranks(n);
    }
    let loaded = LoadedConfig::load(&cli.config, &cli.overrides)?;
    if cli.plan {
        print!("{}", fila_train::plan::plan(&loaded, cli.world_size.unwrap_or(world.size))?);
        return Ok(());
    }
    if cli.check {
        println!("config {} is valid", cli.config.display());
        return Ok(());
    }
    let resume = match cli.resume {
        None => Resume::No,
        Some(None) => Resume::Latest,
        Some(Some(p)) => Resume::Dir(p),
    };
    trainer::install_signal_handler()?;
    let fingerprint = Fingerprint::of_this_process(&loaded.to_toml())?;
    let mut comm = Comm::connect_with_delay(world, &fingerprint, Comm::timeout_from_env()?, Comm::delay_from_env()?)?;
    let device = loaded.config.device.for_local_rank(comm.world().local_rank, comm.world().size);
    comm.use_gpu(device)?;
    if cli.profile_memory {
        fila_train::alloc::profile_phases();
    }
    let options = RunOptions { resume, stop_after: cli.stop_after };
    let result = dispatch(device, Train { loaded, options, comm: &comm });
    if let (true, Some(rss)) = (cli.profile_memory, fila_train::alloc::peak_rss_bytes()) {
        // One write, so that the lines of ranks sharing the launcher's stderr do not interleave.
        let line = format!("memory run: peak RSS {:.1} MiB (checkpoints and the final export included)\n", rss as f64 / (1u64 << 20) as f64);
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }
    if let Err(e) = &result {
        comm.abort(&format!("{e:#}"));
    }
    result
}

struct Train<'a> {
    loaded: LoadedConfig,
    options: RunOptions,
    comm: &'a Comm,
}

impl OnBackend for Train<'_> {
    type Output = ();
    fn run<B: AutodiffBackend>(self, device: &B::Device) -> Result<()> {
        trainer::run::<B>(self.loaded, self.options, device, self.comm).map(|_| ())
    }
}

/// `--nproc-per-node N`: this program again, N times, with the same arguments minus that flag.
fn launch_ranks(n: usize) -> Result<()> {
    let mut args: Vec<String> = Vec::new();
    let mut rest = std::env::args().skip(1);
    while let Some(a) = rest.next() {
        if a == "--nproc-per-node" {
            rest.next();
        } else if !a.starts_with("--nproc-per-node=") {
            args.push(a);
        }
    }
    trainer::install_signal_handler()?;
    launch::spawn_local_ranks(n, &args, &trainer::STOP).context("--nproc-per-node")
}
