//! The training loop, top to bottom in the order it runs: build and freeze the model, restore a
//! checkpoint, then per step: lr, micro-batches (forward, scaled backward, accumulate), clip,
//! update, log, checkpoint; at the end a last checkpoint and the `final/` export.

use crate::batch::{scored_tokens, to_input};
use crate::checkpoint::{self, TrainState};
use crate::config::{geometry_difference, LoadedConfig};
use crate::logging::{Logger, StepMetrics};
use crate::optim::{accumulate_grads, clip_grad_norm, AdamW, Grads, Schedule};
use crate::trainable::{apply_trainable, TrainableSet};
use anyhow::{anyhow, bail, Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use fila_data::{Batch, DataCursor, DataLoader, LoaderOptions, Pipeline, RecordSet};
use fila_model::fila::{Fila, FilaConfig, ModelSource};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Set by SIGINT/SIGTERM: the loop finishes its step, checkpoints and returns.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// A signal this soon after the first is the same stop request: `timeout` and a terminal's
/// process group can deliver one stop twice.
const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Installs the SIGINT/SIGTERM handler (once per process). The first signal stops the run at the
/// end of its step with a checkpoint; a second one, a second or more later, exits at once.
pub fn install_signal_handler() -> Result<()> {
    let first = std::sync::OnceLock::new();
    ctrlc::set_handler(move || {
        let at = *first.get_or_init(Instant::now);
        if !STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsignal received: finishing the current step, then writing a checkpoint (signal again to exit at once)");
        } else if at.elapsed() >= REPEAT_WINDOW {
            eprintln!("\nsecond signal: exiting now without a checkpoint");
            std::process::exit(130);
        }
    })
    .map_err(|e| anyhow!("cannot install the SIGINT/SIGTERM handler: {e}"))
}

/// Where to resume from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// A fresh run; refuses an output folder that already holds checkpoints.
    No,
    /// The newest `step-*` in the output folder.
    Latest,
    Dir(PathBuf),
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub resume: Resume,
    /// Stop (with a checkpoint) once this many steps have been taken in this invocation.
    pub stop_after: Option<u64>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    pub step: u64,
    pub finished: bool,
    pub checkpoint: Option<PathBuf>,
    pub final_dir: Option<PathBuf>,
}

/// The model of a run: architecture and weights from `[model]`, fresh parameters drawn from
/// `seed`, the stage's trainable set applied.
pub fn build_model<B: AutodiffBackend>(loaded: &LoadedConfig, device: &B::Device) -> Result<(Fila<B>, FilaConfig, TrainableSet)> {
    let c = &loaded.config;
    let base = loaded.source.parent().unwrap_or(Path::new("."));
    let (fila_config, source) = c.model.resolve(base).map_err(|e| anyhow!("{e}"))?;
    check_data_matches_model(loaded, &fila_config)?;
    B::seed(device, c.seed);
    let model = Fila::<B>::load(&fila_config, &source, device).map_err(|e| anyhow!("{e}"))?;
    let (model, set) = apply_trainable(model, c.stage, &c.trainable)?;
    if let ModelSource::Checkpoint(dir) = &source {
        eprintln!("model: FILA checkpoint {}", dir.display());
    }
    Ok((model, fila_config, set))
}

/// The data geometry must produce what the towers expect.
pub fn check_geometry(data: &fila_data::DataConfig, model: &FilaConfig) -> Result<()> {
    let g = &data.geometry;
    if g.tile_size as usize != model.vision.image_size || g.patch_size as usize != model.vision.patch_size {
        bail!(
            "`data.geometry` tile_size {} / patch_size {} differ from the ViT's image_size {} / patch_size {}",
            g.tile_size,
            g.patch_size,
            model.vision.image_size,
            model.vision.patch_size
        );
    }
    Ok(())
}

/// The data settings must match the model and the stage.
fn check_data_matches_model(loaded: &LoadedConfig, model: &FilaConfig) -> Result<()> {
    check_geometry(&loaded.data, model)?;
    if let Some(id) = loaded.data.image_token_id {
        if id != model.image_token_id as i64 {
            bail!("`data.image_token_id` = {id} differs from `model.image_token_id` = {}", model.image_token_id);
        }
    }
    let stage_mode = match loaded.config.stage {
        1 => fila_data::ImageMode::Square,
        _ => fila_data::ImageMode::Tiled,
    };
    if loaded.data.image_mode != stage_mode {
        bail!("`data.image_mode` = {:?} but stage {} expects {:?}", loaded.data.image_mode, loaded.config.stage, stage_mode);
    }
    Ok(())
}

/// The length of a resumed run: the checkpoint's, unless the config now asks for another
/// (`train.max_steps` or `train.epochs` changed), which then sets the schedule from here on.
fn resumed_length(saved: u64, configured: u64, step: u64) -> Result<u64> {
    if configured == saved {
        return Ok(saved);
    }
    if configured < step {
        bail!(
            "cannot resume at step {step}: the config now ends the run at step {configured} (`train.max_steps` / \
             `train.epochs`; the checkpoint's run had {saved}). Set `train.max_steps` to {step} or more"
        );
    }
    eprintln!("run length changed from {saved} to {configured} steps: the learning-rate schedule follows the new length");
    Ok(configured)
}

/// Steps in the run: `train.max_steps`, or all micro-batches of `epochs` epochs in windows of
/// `accumulation_steps` (the last window may be short).
pub fn total_steps(loaded: &LoadedConfig, records: usize) -> u64 {
    let c = &loaded.config;
    if let Some(m) = c.train.max_steps {
        return m;
    }
    let sampler = LoaderOptions::from_config(&loaded.data.loader, 0, 1, DataCursor::default(), c.train.epochs).sampler(records);
    let per_epoch = sampler.epoch_len();
    let micro = c.batch.micro_batch_size;
    let batches = if loaded.data.loader.drop_last { per_epoch / micro } else { per_epoch.div_ceil(micro) } as u64;
    (batches * c.train.epochs).div_ceil(c.batch.accumulation_steps as u64)
}

pub fn run<B: AutodiffBackend>(loaded: LoadedConfig, options: RunOptions, device: &B::Device) -> Result<RunOutcome> {
    let c = loaded.config.clone();
    let out = c.checkpoint.output_dir.clone();
    eprintln!("precision: {}", c.precision.effective_note());

    // Where we start.
    let resume_dir = match &options.resume {
        Resume::No => {
            if let Some(existing) = checkpoint::latest(&out) {
                bail!(
                    "{} already holds checkpoints (newest {}): pass --resume to continue, or choose another `checkpoint.output_dir`",
                    out.display(),
                    existing.display()
                );
            }
            None
        }
        Resume::Latest => Some(checkpoint::latest(&out).ok_or_else(|| anyhow!("--resume: no step-* checkpoint in {}", out.display()))?),
        Resume::Dir(d) => Some(d.clone()),
    };
    if let Some(dir) = &resume_dir {
        let saved = checkpoint::read_config(dir)?;
        if let Some(d) = geometry_difference(&saved, &loaded.resolved) {
            bail!("cannot resume from {}: the model, data or batch geometry changed: {d}", dir.display());
        }
    }

    let (mut model, fila_config, set) = build_model::<B>(&loaded, device)?;
    eprintln!(
        "stage {}: {} of {} parameter tensors trainable ({} elements)",
        c.stage,
        set.params.len(),
        set.total_params,
        set.num_elements()
    );
    let mut optimizer = AdamW::<B::InnerBackend>::new(c.optimizer.clone());
    let records = Arc::new(RecordSet::load(&loaded.data).map_err(|e| anyhow!("{e}"))?);
    let pipeline = Arc::new(Pipeline::new(loaded.data.clone()).map_err(|e| anyhow!("{e}"))?);
    let total = total_steps(&loaded, records.records.len());
    let mut state = TrainState {
        step: 0,
        epoch: 0,
        cursor: DataCursor::default(),
        total_steps: total,
        seed: c.seed,
        data_seed: loaded.data.loader.seed,
        samples_seen: 0,
        tokens_seen: 0,
        nonfinite_total: 0,
        nonfinite_in_a_row: 0,
        skipped: records.load_bad.clone(),
        reason: String::new(),
    };
    if let Some(dir) = &resume_dir {
        state = checkpoint::read_state(dir)?;
        model = checkpoint::load_trainable(model, &set, dir)?;
        let inner_device = Tensor::<B, 1>::zeros([1], device).inner().device();
        optimizer.load(&dir.join(checkpoint::OPTIMIZER_FILE), &set, &inner_device)?;
        eprintln!("resumed from {} at step {} (data epoch {}, position {})", dir.display(), state.step, state.cursor.epoch, state.cursor.position);
        state.total_steps = resumed_length(state.total_steps, total, state.step)?;
    }
    let schedule = Schedule::new(c.optimizer.lr, &c.schedule, state.total_steps);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let config_toml = loaded.to_toml();
    std::fs::write(out.join(checkpoint::CONFIG_FILE), &config_toml)?;

    let end_epoch = if c.train.max_steps.is_some() { u64::MAX } else { c.train.epochs };
    let opts = LoaderOptions::from_config(&loaded.data.loader, 0, 1, state.cursor, end_epoch);
    let mut loader = DataLoader::start(records.clone(), pipeline, opts).map_err(|e| anyhow!("{e}"))?;
    loader.restore_bad_counts(state.skipped.clone());
    let mut logger = Logger::new(&loaded.tensorboard_dir(), state.total_steps, state.step);
    let mut metrics_file = std::fs::OpenOptions::new().create(true).append(true).open(out.join("metrics.jsonl"))?;
    let lr_groups = set.lr_groups();
    let accumulation = c.batch.accumulation_steps;
    let started_at = state.step;
    let mut last_checkpoint = None;
    let save = |model: &Fila<B>, optimizer: &AdamW<B::InnerBackend>, state: &TrainState| {
        checkpoint::save(&out, model, &set, optimizer, state, &config_toml, c.checkpoint.keep_last)
    };

    while state.step < state.total_steps {
        let t0 = Instant::now();
        // The step's micro-batches, read first so the loss can be normalised by all its tokens.
        let mut window: Vec<Batch> = Vec::with_capacity(accumulation);
        while window.len() < accumulation {
            match loader.next() {
                Some(b) => window.push(b.map_err(|e| anyhow!("{e}"))?),
                None => break,
            }
        }
        if window.is_empty() {
            break; // The data ran out before `total_steps` (bad records shrink an epoch).
        }
        let lr = schedule.lr(state.step);
        let tokens: usize = window.iter().map(scored_tokens).sum();
        let samples: usize = window.iter().map(|b| b.batch_size).sum();
        // Each micro-batch's mean loss × its share of the step's scored tokens: the sum is the mean
        // over all the step's tokens, so micro 4 × accumulation 1 equals micro 1 × accumulation 4.
        let mut grads: Grads<B::InnerBackend> = Grads::new();
        let mut loss_sum = 0.0f64;
        let mut finite = true;
        for batch in &window {
            let share = scored_tokens(batch) as f64 / tokens.max(1) as f64;
            let output = c.precision.forward(|| model.forward(to_input::<B>(batch, device), None));
            let loss = output.loss.expect("labels given").mul_scalar(share);
            let value = loss.clone().into_scalar().elem::<f64>();
            if !value.is_finite() {
                finite = false;
                break;
            }
            loss_sum += value;
            let g = loss.backward();
            accumulate_grads(&model, &g, &set, &mut grads);
        }
        let grad_norm = if finite { clip_grad_norm(&mut grads, c.train.max_grad_norm) } else { f64::NAN };
        finite &= grad_norm.is_finite();
        if finite {
            model = optimizer.step(model, &grads, &set, lr);
            state.nonfinite_in_a_row = 0;
        } else {
            state.nonfinite_total += 1;
            state.nonfinite_in_a_row += 1;
        }
        drop(grads);
        state.step += 1;
        state.cursor = window.last().expect("non-empty").cursor;
        state.epoch = state.cursor.epoch;
        state.samples_seen += samples as u64;
        state.tokens_seen += tokens as u64;
        state.skipped = loader.bad_counts().clone();

        let step_time = t0.elapsed().as_secs_f64();
        let metrics = StepMetrics {
            step: state.step,
            loss: if finite { loss_sum } else { f64::NAN },
            lr,
            lrs: lr_groups.iter().map(|m| (*m, lr * m)).collect(),
            grad_norm,
            tokens_per_s: tokens as f64 / step_time,
            samples_per_s: samples as f64 / step_time,
            step_time_s: step_time,
            skipped: state.skipped.counts().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            nonfinite: !finite,
        };
        logger.log(&metrics, c.logging.every_steps);
        writeln!(
            metrics_file,
            "{}",
            serde_json::json!({"step": state.step, "loss": metrics.loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "samples": samples, "finite": finite})
        )?;

        if state.nonfinite_in_a_row >= c.train.max_nonfinite_steps {
            state.reason = "nonfinite".into();
            let dir = save(&model, &optimizer, &state)?;
            logger.flush();
            bail!(
                "{} steps in a row had a non-finite loss or gradient (last at step {}); stopped with a checkpoint at {}. \
                 Lower `optimizer.lr`, check the data, or resume from an earlier checkpoint",
                state.nonfinite_in_a_row,
                state.step,
                dir.display()
            );
        }
        let signalled = STOP.load(Ordering::SeqCst);
        let stop_now = options.stop_after.is_some_and(|n| state.step - started_at >= n);
        let interval = c.checkpoint.every_steps > 0 && state.step % c.checkpoint.every_steps == 0;
        if signalled || stop_now {
            state.reason = if signalled { "signal" } else { "stop_after" }.into();
            let dir = save(&model, &optimizer, &state)?;
            logger.flush();
            eprintln!("stopped at step {}; checkpoint {}. Continue with --resume", state.step, dir.display());
            return Ok(RunOutcome { step: state.step, finished: false, checkpoint: Some(dir), final_dir: None });
        }
        if interval && state.step < state.total_steps {
            state.reason = "interval".into();
            last_checkpoint = Some(save(&model, &optimizer, &state)?);
        }
    }

    // Skipped records are never silent: they are logged as `data/skipped/<reason>` and listed here.
    let bad = loader.bad_counts();
    if state.step == 0 {
        bail!(
            "no training step ran: none of the {} records gave a usable sample; skipped by reason:\n{bad}\
             Run `fila data check --config {}` to see every bad record",
            records.records.len(),
            loaded.source.display()
        );
    }
    if bad.total() > 0 {
        eprintln!("skipped {} bad records (run `fila data check --config {}` for all of them):\n{bad}", bad.total(), loaded.source.display());
    }
    state.reason = "end".into();
    let dir = save(&model, &optimizer, &state)?;
    last_checkpoint.replace(dir);
    let final_dir = checkpoint::export_final(&out, &model, &fila_config, &loaded.data.tokenizer, &loaded.to_toml())?;
    logger.flush();
    eprintln!("done: {} steps; final model in {}", state.step, final_dir.display());
    Ok(RunOutcome { step: state.step, finished: true, checkpoint: last_checkpoint, final_dir: Some(final_dir) })
}
