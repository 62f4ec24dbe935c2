//! `fila-train --config C [--set k=v]... [--resume [DIR]] [--plan]`.

use anyhow::Result;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, Flex};
use clap::Parser;
use fila_train::config::LoadedConfig;
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
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
    /// Stop with a checkpoint after this many steps in this invocation (as a signal would).
    #[arg(long, value_name = "STEPS")]
    stop_after: Option<u64>,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let loaded = LoadedConfig::load(&cli.config, &cli.overrides)?;
    if cli.plan {
        print!("{}", fila_train::plan::plan(&loaded)?);
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
    let options = RunOptions { resume, stop_after: cli.stop_after };
    let device = loaded.config.device.clone();
    let checkpointing = loaded.config.train.activation_checkpointing;
    match (device.as_str(), checkpointing) {
        ("cpu", false) => {
            trainer::run::<Autodiff<Flex>>(loaded, options, &Default::default())?;
        }
        ("cpu", true) => {
            trainer::run::<Autodiff<Flex, BalancedCheckpointing>>(loaded, options, &Default::default())?;
        }
        _ => run_cuda(&device, checkpointing, loaded, options)?,
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn run_cuda(device: &str, checkpointing: bool, loaded: LoadedConfig, options: RunOptions) -> Result<()> {
    use burn::backend::Cuda;
    let index: usize = device.strip_prefix("cuda:").and_then(|i| i.parse().ok()).expect("validated device");
    let device = burn::backend::cuda::CudaDevice::new(index);
    if checkpointing {
        trainer::run::<Autodiff<Cuda, BalancedCheckpointing>>(loaded, options, &device)?;
        return Ok(());
    }
    trainer::run::<Autodiff<Cuda>>(loaded, options, &device)?;
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(device: &str, _: bool, _: LoadedConfig, _: RunOptions) -> Result<()> {
    anyhow::bail!("device `{device}` needs a build with `--features cuda`; this build runs on `cpu` only")
}
