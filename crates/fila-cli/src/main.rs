//! `fila`: model and data tools around FILA-train: forward dumps for checking conversions,
//! generation, benchmark evaluation and an OpenAI-compatible server, dataset checks and inspection,
//! and speed benchmarks.

mod bench;
mod eval;
mod flops;
mod forward;
mod infer;
mod metrics;
mod serve;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fila_train::backend::{dispatch, Device, OnBackend};
use fila_train::precision::Precision;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "fila", version, about = "FILA model and data tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the model on an image and a prompt; write named intermediate tensors (safetensors).
    Forward {
        /// Run config with `[model]` and `[data]` tables (tokenizer, geometry, normalisation).
        #[arg(long)]
        config: PathBuf,
        /// Image file; without it the language model runs alone on the prompt.
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value = "forward.safetensors")]
        out: PathBuf,
        /// `cpu`, `cuda:N`, `wgpu` or `wgpu:N` (default: the config's `device`, else `cpu`).
        #[arg(long)]
        device: Option<Device>,
    },
    /// Answer a question about an image with a trained checkpoint (greedy decoding).
    Generate {
        /// FILA checkpoint folder (a run's `final/`).
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Run config whose `[data]` table gives template and geometry (default: the checkpoint's run.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Benchmark scores of a checkpoint on an eval file: VQA accuracy, ANLS, relaxed accuracy and
    /// exact match, overall and per question type (docs/eval.md). Writes a JSON report with every
    /// prediction, and TensorBoard scalars.
    Eval {
        /// FILA checkpoint folder (a run's `final/`); not needed with --predictions.
        #[arg(long, required_unless_present = "predictions")]
        checkpoint: Option<PathBuf>,
        /// Eval file (JSONL or a JSON list): `{"id", "image", "question", "answers": [..]}` records
        /// and/or LLaVA records (their first question and answer).
        #[arg(long)]
        data: PathBuf,
        /// Score these answers instead of asking a model: JSONL `{"id", "answer"}`, or an earlier
        /// report of `fila eval` (to re-score it with other metrics).
        #[arg(long, conflicts_with = "checkpoint")]
        predictions: Option<PathBuf>,
        /// Folder the records' image paths are relative to (default: the data file's folder).
        #[arg(long)]
        images: Option<PathBuf>,
        /// Metrics for records without their own `metric` field: vqa, anls, relaxed, exact, or all
        /// (comma-separated for several).
        #[arg(long, default_value = "all")]
        metric: String,
        /// JSON report path (default: `<checkpoint>/eval-<split>.json`, or `<predictions>-scored.json`).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// Questions per forward (right-padded; the answers do not depend on it).
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Run config whose `[data]` table gives template and geometry (default: the checkpoint's run.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// TensorBoard folder for the scores (`eval/<split>/<metric>`, `eval/<split>/<type>/<metric>`,
        /// `eval/<split>/accuracy`); default: the training run's `tensorboard/` beside the
        /// checkpoint, when it exists.
        #[arg(long)]
        logdir: Option<PathBuf>,
        /// TensorBoard step of the scalars (for example the checkpoint's training step).
        #[arg(long, default_value_t = 0)]
        step: usize,
    },
    /// Merge the LoRA adapters of a run's step checkpoint into its base model and write a model
    /// folder that every command loads as a `final/` (a LoRA run's `final/` is merged already).
    MergeLora {
        /// A LoRA run's step checkpoint (`step-N/`); the base model its config names must exist.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output folder (default: `merged-N` beside the step folder).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// OpenAI-compatible HTTP server for a checkpoint: POST /v1/chat/completions (text and one
    /// image, greedy decoding, concurrent requests answered in batches) and GET /v1/models
    /// (docs/serve.md).
    Serve {
        /// FILA checkpoint folder (a run's `final/`).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Port to listen on (0: any free port; the address is printed when ready).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Address to bind; the default accepts connections from this machine only.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Model id in /v1/models and in answers (default: the checkpoint folder's name).
        #[arg(long)]
        model_name: Option<String>,
        /// Most requests answered in one batch.
        #[arg(long, default_value_t = 8)]
        max_batch: usize,
        /// Milliseconds the server waits for more requests once one arrives before it starts a
        /// batch (0: it batches what is already queued and starts at once).
        #[arg(long, default_value_t = 0)]
        batch_wait_ms: u64,
        /// `max_tokens` of requests that give none (capped by the context left after the prompt).
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Largest request body in MiB (base64 images included).
        #[arg(long, default_value_t = 64)]
        max_body_mb: usize,
        /// Run config whose `[data]` table gives template and geometry (default: the checkpoint's run.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Dataset tools.
    #[command(subcommand)]
    Data(DataCommand),
    /// Training-step time on random weights (forward, backward, optionally AdamW; CPU unless built with `cuda`):
    /// step time, tokens/s, samples/s, peak memory, FLOPs and MFU.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Scan the whole dataset: good and bad records by reason, token-length statistics.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Generate the built-in synthetic dataset (codes, shapes, colours, counts; a `fine` split).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// ViT tile side of the configs that will read it (image sizes scale with it).
        #[arg(long, default_value_t = 56)]
        tile_size: u32,
        #[arg(long, default_value_t = 600)]
        stage1: usize,
        #[arg(long, default_value_t = 600)]
        stage2: usize,
        #[arg(long, default_value_t = 100)]
        heldout: usize,
        #[arg(long, default_value_t = 100)]
        fine: usize,
    },
    /// Show how one record is tiled and tokenised; `--out` writes its tensors.
    Inspect {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        index: usize,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    fila_train::alloc::keep_freed_memory();
    let cli = Cli::parse();
    fila_train::kernel_events::install();
    match cli.command {
        Command::Forward { config, image, prompt, out, device } => forward::run(&config, image.as_deref(), &prompt, &out, device)?,
        Command::Generate { checkpoint, image, prompt, max_new_tokens, config } => {
            let inference = infer::Inference::open(&checkpoint, config.as_deref())?;
            let image = image.map(|p| inference.load_image(&p)).transpose()?;
            println!("{}", inference.answer(image.as_ref(), &prompt, max_new_tokens)?);
        }
        Command::Eval { checkpoint, data, predictions, images, metric, out, max_new_tokens, batch_size, config, logdir, step } => {
            let metrics = metrics::Metric::parse_list(&metric).map_err(|e| anyhow::anyhow!("--metric {metric}: {e}"))?;
            let report = match (&checkpoint, &predictions) {
                (_, Some(predictions)) => eval::score_predictions(&data, predictions, &metrics)?,
                (Some(checkpoint), None) => {
                    let inference = infer::Inference::open(checkpoint, config.as_deref())?;
                    let images = images.unwrap_or_else(|| infer::default_image_folder(&data));
                    let options = infer::EvalOptions { checkpoint, image_folder: &images, max_new_tokens, batch_size, metrics: &metrics };
                    infer::evaluate(&inference, &data, &options)?
                }
                (None, None) => unreachable!("clap requires --checkpoint or --predictions"),
            };
            print!("{report}");
            let out = out.unwrap_or_else(|| match (&checkpoint, &predictions) {
                (Some(checkpoint), _) => checkpoint.join(format!("eval-{}.json", report.split)),
                (None, Some(p)) => p.with_file_name(format!("{}-scored.json", p.file_stem().unwrap_or_default().to_string_lossy())),
                (None, None) => unreachable!(),
            });
            std::fs::write(&out, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
            // The training run's own log folder, so the scores sit beside its loss curves.
            let run_logs = checkpoint.as_ref().and_then(|c| c.parent()).map(|run| run.join("tensorboard")).filter(|d| d.is_dir());
            if let Some(dir) = logdir.or(run_logs) {
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                fila_train::logging::write_scalars(&dir, step, &report.scalars());
                println!("wrote TensorBoard scalars eval/{}/... to {}", report.split, dir.display());
            }
        }
        Command::MergeLora { checkpoint, out } => {
            let name = checkpoint.file_name().map(|n| n.to_string_lossy().replace("step-", "merged-")).unwrap_or_else(|| "merged".into());
            let out = out.unwrap_or_else(|| checkpoint.with_file_name(name));
            let dir = fila_train::lora::merge_step_checkpoint(&checkpoint, &out)?;
            println!("merged model in {}", dir.display());
        }
        Command::Serve { checkpoint, port, host, model_name, max_batch, batch_wait_ms, max_tokens, max_body_mb, config } => {
            serve::run(serve::ServeOptions {
                checkpoint,
                config,
                host,
                port,
                model_name,
                max_batch,
                batch_wait: std::time::Duration::from_millis(batch_wait_ms),
                default_max_tokens: max_tokens,
                max_body: max_body_mb.saturating_mul(1 << 20),
            })?;
        }
        Command::Data(DataCommand::Check { config }) => {
            let (pipeline, records) = fila_data::Pipeline::open(&config)?;
            println!("{}", fila_data::check(&pipeline, &records));
        }
        Command::Data(DataCommand::Synth { out, seed, tile_size, stage1, stage2, heldout, fine }) => {
            let options = fila_synth::SynthOptions { seed, tile_size, stage1, stage2, heldout, fine, ..Default::default() };
            let start = std::time::Instant::now();
            let summary = fila_synth::generate(&out, &options)?;
            println!(
                "wrote {} images and {} records to {} ({:.1} MB, tokenizer of {} ids) in {:.1} s",
                summary.images,
                summary.splits.iter().map(|s| s.records).sum::<usize>(),
                out.display(),
                summary.bytes as f64 / 1e6,
                summary.vocab_size,
                start.elapsed().as_secs_f64()
            );
        }
        Command::Data(DataCommand::Inspect { config, index, out }) => {
            let (pipeline, records) = fila_data::Pipeline::open(&config)?;
            let inspection = fila_data::inspect(&pipeline, &records, index)?;
            println!("{inspection}");
            if let Some(out) = out {
                inspection.write_safetensors(&out)?;
                println!("wrote {}", out.display());
            }
        }
        Command::Bench(args) => {
            let options = bench::BenchOptions::from_args(&args)?;
            dispatch(options.device, Bench(options))?;
        }
    }
    Ok(())
}

fn parse_precision(text: &str) -> Result<Precision, String> {
    match text {
        "f32" => Ok(Precision::F32),
        "bf16_mixed" => Ok(Precision::Bf16Mixed),
        other => Err(format!("`{other}`: expected `f32` or `bf16_mixed`")),
    }
}

struct Bench(bench::BenchOptions);

impl OnBackend for Bench {
    type Output = ();
    fn run<B: burn::tensor::backend::AutodiffBackend>(self, device: &B::Device) -> Result<()> {
        bench::run::<B>(self.0, device)
    }
}

/// Serialises the tests that seed the backend's random generator and then draw from it: flex's
/// generator is global to the process, so another test seeding it in between would change what
/// they draw.
#[cfg(test)]
pub(crate) fn generator_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
