//! `fila`: model and data tools around FILA-train: forward dumps for checking conversions,
//! dataset checks and inspection, and speed benchmarks.

mod bench;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fila", version, about = "FILA model and data tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Forward+backward time per sample on random weights (CPU unless built with `cuda`).
    Bench {
        #[arg(long, value_enum, default_value = "tiny")]
        size: bench::BenchSize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// `cpu` or `cuda:N` (needs the `cuda` feature).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { size, batch, steps, device } => {
            if device == "cpu" {
                bench::run::<burn::backend::Autodiff<burn::backend::Flex>>(size, batch, steps, &Default::default());
            } else {
                run_cuda_bench(&device, size, batch, steps)?;
            }
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn run_cuda_bench(device: &str, size: bench::BenchSize, batch: usize, steps: usize) -> Result<()> {
    let index: usize = device
        .strip_prefix("cuda:")
        .and_then(|i| i.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("device `{device}`: expected `cpu` or `cuda:N`"))?;
    let device = burn::backend::cuda::CudaDevice::new(index);
    bench::run::<burn::backend::Autodiff<burn::backend::Cuda>>(size, batch, steps, &device);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda_bench(device: &str, _: bench::BenchSize, _: usize, _: usize) -> Result<()> {
    anyhow::bail!("device `{device}` needs a build with `--features cuda`; this build runs on `cpu` only")
}
