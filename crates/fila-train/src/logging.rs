//! TensorBoard scalars (tensorboard-rs), `metrics.jsonl` and the progress display: a bar with
//! loss, rate and ETA on a terminal, plain periodic lines otherwise. Only rank 0 of a multi-process
//! run writes or prints any of them; the others' loggers are silent.

use crate::kernel_events::KernelCounts;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;
use tensorboard_rs::summary_writer::SummaryWriter;

/// What one optimizer step reports.
#[derive(Debug, Clone)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    /// The base learning rate (multiplier 1).
    pub lr: f64,
    /// `(multiplier, lr)` per LR group.
    pub lrs: Vec<(f64, f64)>,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub samples_per_s: f64,
    pub step_time_s: f64,
    /// Scored tokens and samples of the step, over all ranks.
    pub tokens: usize,
    pub samples: usize,
    /// Skipped records so far by reason.
    pub skipped: Vec<(String, u64)>,
    pub nonfinite: bool,
    /// GPU kernel compilations and autotune runs so far ([`crate::kernel_events`]).
    pub kernels: KernelCounts,
}

pub struct Logger {
    /// `None` on ranks other than 0.
    writer: Option<SummaryWriter>,
    metrics: Option<std::fs::File>,
    terminal: bool,
    total_steps: u64,
    started: Instant,
    first_step: u64,
    /// Autotune picks already written to `metrics.jsonl`.
    picks_logged: usize,
}

impl Logger {
    /// TensorBoard files in `tensorboard_dir`, `metrics.jsonl` (appended) in `output_dir`; both
    /// only when `writes` (rank 0).
    pub fn new(writes: bool, tensorboard_dir: &Path, output_dir: &Path, total_steps: u64, first_step: u64) -> std::io::Result<Self> {
        let (writer, metrics) = if writes {
            std::fs::create_dir_all(tensorboard_dir)?;
            let file = std::fs::OpenOptions::new().create(true).append(true).open(output_dir.join("metrics.jsonl"))?;
            (Some(SummaryWriter::new(tensorboard_dir)), Some(file))
        } else {
            (None, None)
        };
        Ok(Self { writer, metrics, terminal: std::io::stderr().is_terminal(), total_steps, started: Instant::now(), first_step, picks_logged: 0 })
    }

    /// Writes the step's scalars and `metrics.jsonl` line and, every `every` steps (or always on
    /// a terminal), the progress.
    pub fn log(&mut self, m: &StepMetrics, every: u64) -> std::io::Result<()> {
        let step = m.step as usize;
        let (Some(w), Some(file)) = (&mut self.writer, &mut self.metrics) else {
            return Ok(());
        };
        let mut line = serde_json::json!({
            "step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm,
            "tokens": m.tokens, "samples": m.samples, "finite": !m.nonfinite,
            "kernels_compiled": m.kernels.compiled, "kernels_from_cache": m.kernels.from_cache, "autotune_runs": m.kernels.tuned
        });
        // The kernels CubeCL's autotune chose since the previous line (GPU backends only).
        let picks = crate::kernel_events::picks_from(self.picks_logged);
        if !picks.is_empty() {
            self.picks_logged += picks.len();
            line["autotune_picks"] = serde_json::to_value(&picks)?;
        }
        writeln!(file, "{line}")?;
        w.add_scalar("train/loss", m.loss as f32, step);
        if m.lrs.len() == 1 {
            w.add_scalar("train/lr", m.lrs[0].1 as f32, step);
        } else {
            for (mult, lr) in &m.lrs {
                w.add_scalar(&format!("train/lr/x{mult}"), *lr as f32, step);
            }
        }
        w.add_scalar("train/grad_norm", m.grad_norm as f32, step);
        w.add_scalar("train/tokens_per_s", m.tokens_per_s as f32, step);
        w.add_scalar("train/samples_per_s", m.samples_per_s as f32, step);
        w.add_scalar("train/step_time_s", m.step_time_s as f32, step);
        for (reason, count) in &m.skipped {
            w.add_scalar(&format!("data/skipped/{reason}"), *count as f32, step);
        }
        let done = m.step.saturating_sub(self.first_step).max(1) as f64;
        let eta = self.started.elapsed().as_secs_f64() / done * self.total_steps.saturating_sub(m.step) as f64;
        let flag = if m.nonfinite { "  (non-finite: update skipped)" } else { "" };
        let lr = m.lr;
        if self.terminal {
            let width = 30usize;
            let filled = (width as f64 * m.step as f64 / self.total_steps.max(1) as f64).round() as usize;
            eprint!(
                "\r[{}{}] {}/{} loss {:.4} lr {:.2e} {:.1} samples/s ETA {}{flag}   ",
                "#".repeat(filled.min(width)),
                ".".repeat(width - filled.min(width)),
                m.step,
                self.total_steps,
                m.loss,
                lr,
                m.samples_per_s,
                hms(eta)
            );
            let _ = std::io::stderr().flush();
        } else if m.step.is_multiple_of(every) || m.step == self.total_steps || m.nonfinite {
            println!(
                "step {}/{} loss {:.6} lr {:.3e} grad_norm {:.4} {:.1} tokens/s {:.2} samples/s {:.3} s/step ETA {}{flag}",
                m.step,
                self.total_steps,
                m.loss,
                lr,
                m.grad_norm,
                m.tokens_per_s,
                m.samples_per_s,
                m.step_time_s,
                hms(eta)
            );
        }
        Ok(())
    }

    pub fn flush(&mut self) {
        if let Some(w) = &mut self.writer {
            w.flush();
            if self.terminal {
                eprintln!();
            }
        }
    }
}

/// Writes scalars at one step into a TensorBoard event file in `dir` (evaluation reports).
pub fn write_scalars(dir: &Path, step: usize, scalars: &[(String, f32)]) {
    let mut writer = SummaryWriter::new(dir);
    for (tag, value) in scalars {
        writer.add_scalar(tag, *value, step);
    }
    writer.flush();
}

fn hms(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Messages for people, printed by rank 0 only: a run over many ranks says each thing once.
#[derive(Debug, Clone, Copy)]
pub struct Reporter {
    root: bool,
}

impl Reporter {
    pub fn of(world: &crate::dist::World) -> Self {
        Self { root: world.is_root() }
    }

    /// Prints the line `message` makes (to stderr, as every progress note) on rank 0; other ranks
    /// do not build it.
    pub fn line(&self, message: impl FnOnce() -> String) {
        if self.root {
            eprintln!("{}", message());
        }
    }
}
