//! The training loop. [`run`] reads as an outline of named steps: where to resume, start, then per
//! step the next window of micro-batches, the train step (forward, scaled backward, accumulate,
//! the sharded update), the log and the after-step decision; at the end a last checkpoint and
//! the `final/` export. The rank/world seam is one [`Comm`] handed to the loader's shard, the
//! step's reductions, the checkpoint writer and the logger, so one process and many run the same
//! code.

use crate::alloc;
use crate::batch::{scored_tokens, to_input};
use crate::checkpoint::{self, CheckpointReason, CheckpointWriter, TrainState};
use crate::config::{geometry_difference, LoadedConfig, Offload, TrainConfig};
use crate::dist::{Comm, World};
use crate::kernel_events::{self, KernelCounts};
use crate::logging::{Logger, Reporter, StepMetrics};
use crate::lora;
use crate::optim::{AdamW, Schedule};
use crate::shard::FlatLayout;
use crate::step::{MicroBatch, StepOutcome, TrainStep};
use crate::trainable::{apply_trainable, TrainableSet};
use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use fila_data::{BadRecordCounts, Batch, DataCursor, DataLoader, LoaderOptions, Pipeline, RecordSet};
use fila_model::fila::{Fila, FilaConfig};
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
/// `seed`, the stage's trainable set applied, frozen weights stored as the precision says.
pub fn build_model<B: AutodiffBackend>(loaded: &LoadedConfig, device: &B::Device) -> Result<(Fila<B>, FilaConfig, TrainableSet)> {
    let c = &loaded.config;
    let base = loaded.source.parent().unwrap_or(Path::new("."));
    let (fila_config, source) = c.model.resolve(base)?;
    check_data_matches_model(loaded, &fila_config)?;
    B::seed(device, c.seed);
    let model = if c.lora.quantized() { Fila::<B>::load_quantized(&fila_config, &source, device)? } else { Fila::<B>::load(&fila_config, &source, device)? };
    let model = lora::attach(model, &c.lora, device)?;
    let (model, mut set) = apply_trainable(model, c.stage, &c.trainable)?;
    if c.lora.quantized() {
        // An NF4 projection has no weight to train: its parameter is an empty placeholder.
        if let Some(path) = set.params.keys().find(|p| p.strip_prefix("llm.").and_then(fila_model::lora::projection_weight).is_some()) {
            bail!(
                "`trainable.modules` trains `{path}`, a projection that `lora.base_bits = 4` (QLoRA) stores as NF4 and trains through its adapter only; \
                 name the language model's embeddings, norms or lm_head instead, or set `lora.base_bits = 16`"
            );
        }
    }
    lora::set_adapter_lr(&mut set, &c.lora, c.optimizer.lr);
    Ok((c.precision.store_frozen(model, &set), fila_config, set))
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
fn resumed_length(saved: u64, configured: u64, step: u64, say: Reporter) -> Result<u64> {
    if configured == saved {
        return Ok(saved);
    }
    if configured < step {
        bail!(
            "cannot resume at step {step}: the config now ends the run at step {configured} (`train.max_steps` / \
             `train.epochs`; the checkpoint's run had {saved}). Set `train.max_steps` to {step} or more"
        );
    }
    say.line(|| format!("run length changed from {saved} to {configured} steps: the learning-rate schedule follows the new length"));
    Ok(configured)
}

/// Steps in the run: `train.max_steps`, or all micro-batches of `epochs` epochs in windows of
/// `accumulation_steps` (the last window may be short), each of `world` ranks reading its shard.
pub fn total_steps(loaded: &LoadedConfig, records: usize, world: usize) -> u64 {
    let c = &loaded.config;
    if let Some(m) = c.train.max_steps {
        return m;
    }
    let sampler = LoaderOptions::from_config(&loaded.data.loader, 0, world, DataCursor::default(), c.train.epochs).sampler(records);
    let per_epoch = sampler.epoch_len();
    let micro = c.batch.micro_batch_size;
    let batches = if loaded.data.loader.drop_last { per_epoch / micro } else { per_epoch.div_ceil(micro) } as u64;
    (batches * c.train.epochs).div_ceil(c.batch.accumulation_steps as u64)
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// All `total_steps` steps ran.
    Completed,
    /// The data ran out first (bad records shrink an epoch).
    DataExhausted,
    /// SIGINT/SIGTERM on some rank.
    Signal,
    /// `--stop-after` steps in this invocation.
    StopAfter,
    /// `train.max_nonfinite_steps` non-finite steps in a row.
    NonFinite,
}

/// Trains one stage: one process, or one rank of many talking through `comm`.
pub fn run<B: AutodiffBackend>(loaded: LoadedConfig, options: RunOptions, device: &B::Device, comm: &Comm) -> Result<RunOutcome> {
    match loaded.config.optimizer.offload {
        Offload::None => run_with::<B, B::InnerBackend>(loaded, options, device, comm),
        Offload::Cpu => run_with::<B, burn::backend::Flex>(loaded, options, device, comm),
    }
}

/// [`run`] with the optimizer's state on backend `S` (the model's, or the CPU's when offloaded).
fn run_with<B: AutodiffBackend, S: Backend>(loaded: LoadedConfig, options: RunOptions, device: &B::Device, comm: &Comm) -> Result<RunOutcome> {
    let resume = resume_point(&loaded, &options.resume, comm.world().size)?;
    let mut t = Training::<B, S>::start(loaded, resume.as_deref(), device, comm)?;
    let started_at = t.state.step;
    let reason = loop {
        if t.state.step >= t.state.total_steps {
            break StopReason::Completed;
        }
        let Some(window) = t.next_window()? else {
            break StopReason::DataExhausted;
        };
        let step = t.train_step(window)?;
        t.log(&step)?;
        if let Some(reason) = t.after_step(&step, &options, started_at)? {
            break reason;
        }
    };
    t.finish(reason)
}

/// The checkpoint to resume from, checked against this run's config; `None` for a fresh start.
fn resume_point(loaded: &LoadedConfig, resume: &Resume, world: usize) -> Result<Option<PathBuf>> {
    let out = &loaded.config.checkpoint.output_dir;
    let dir = match resume {
        Resume::No => {
            if let Some(existing) = checkpoint::latest(out) {
                bail!(
                    "{} already holds checkpoints (newest {}): pass --resume to continue, or choose another `checkpoint.output_dir`",
                    out.display(),
                    existing.display()
                );
            }
            return Ok(None);
        }
        Resume::Latest => checkpoint::latest(out).ok_or_else(|| anyhow!("--resume: no step-* checkpoint in {}", out.display()))?,
        Resume::Dir(d) => d.clone(),
    };
    let saved = checkpoint::read_config(&dir)?;
    let saved_world = checkpoint::read_state(&dir)?.world_size;
    if let Some(d) = geometry_difference(&saved, saved_world, &loaded.resolved, world) {
        bail!("cannot resume from {}: the model, data or batch geometry changed: {d}", dir.display());
    }
    Ok(Some(dir))
}

/// A step's micro-batches on this rank, with the step's totals over all ranks.
struct Window {
    batches: Vec<Batch>,
    /// Scored tokens and samples of the whole step (all ranks).
    tokens: usize,
    samples: usize,
    /// The most micro-batches any rank has: every rank adds gradients this many times, so the
    /// collectives stay in step when windows differ (the end of the data).
    slots: usize,
}

/// What one step did, summed over ranks.
struct StepResult {
    metrics: StepMetrics,
    /// Some rank was asked to stop (SIGINT/SIGTERM) before this step's reductions.
    signalled: bool,
}

/// A run in progress: the model, its optimizer slice, this rank's data and the run's state.
struct Training<'a, B: AutodiffBackend, S: Backend> {
    loaded: LoadedConfig,
    c: TrainConfig,
    comm: &'a Comm,
    device: B::Device,
    model: Fila<B>,
    fila_config: FilaConfig,
    set: TrainableSet,
    optimizer: AdamW<B::InnerBackend, S>,
    schedule: Schedule,
    loader: DataLoader,
    records: usize,
    state: TrainState,
    logger: Logger,
    writer: CheckpointWriter<'a>,
    lr_groups: Vec<f64>,
    /// The step this process started from, and the kernel counts after its warm-up steps.
    first_step: u64,
    kernels_after_warmup: Option<KernelCounts>,
}

/// What [`restore`] gives: the run's state, the model and the optimizer.
type Restored<B, S> = (TrainState, Fila<B>, AdamW<<B as AutodiffBackend>::InnerBackend, S>);

/// Where the optimizer's state lives: the model's device, or the CPU (`optimizer.offload`).
fn state_device<B: AutodiffBackend, S: Backend>(device: &B::Device) -> S::Device {
    if std::any::TypeId::of::<S>() == std::any::TypeId::of::<B::InnerBackend>() {
        fila_model::probe::same_type(device.clone())
    } else {
        S::Device::default()
    }
}

/// The run's state, the model's trainable weights and the optimizer: fresh for a new run over
/// `records`, or read from the checkpoint `resume` (written at any world size).
fn restore<B: AutodiffBackend, S: Backend>(
    loaded: &LoadedConfig,
    resume: Option<&Path>,
    mut model: Fila<B>,
    set: &TrainableSet,
    records: &RecordSet,
    device: &B::Device,
    world: &World,
) -> Result<Restored<B, S>> {
    let c = &loaded.config;
    let total = total_steps(loaded, records.records.len(), world.size);
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
        reason: CheckpointReason::Interval,
        world_size: world.size,
    };
    if let Some(dir) = resume {
        state = checkpoint::read_state(dir)?;
        state.world_size = world.size;
        model = checkpoint::load_trainable(model, set, dir)?;
    }
    let layout = if c.distributed.zero_stage == 3 {
        // ZeRO-3 gathers a segment's buckets at a time: no bucket spans two.
        let layers = model.llm.model.layers.len();
        FlatLayout::with_groups(set, world.size, world.rank, c.distributed.bucket_elements, &|name| crate::recompute::segment_of(name, layers))
    } else {
        FlatLayout::new(set, world.size, world.rank, c.distributed.bucket_elements)
    };
    let mut optimizer = AdamW::with_state_on::<B, _>(c.optimizer.clone(), set, layout, &model, device, &state_device::<B, S>(device));
    optimizer.master_in_checkpoint = c.precision.master_apart();
    optimizer.set_overlap(c.distributed.overlap);
    optimizer.shard_weights = c.distributed.zero_stage == 3;
    if let Some(dir) = resume {
        optimizer.load(dir)?;
        let say = Reporter::of(world);
        say.line(|| format!("resumed from {} at step {} (data epoch {}, position {})", dir.display(), state.step, state.cursor.epoch, state.cursor.position));
        state.total_steps = resumed_length(state.total_steps, total, state.step, say)?;
    }
    Ok((state, model, optimizer))
}

/// This rank's shard of the data, from the run-wide cursor of `state`.
fn start_data(loaded: &LoadedConfig, records: Arc<RecordSet>, pipeline: Arc<Pipeline>, state: &TrainState, world: &World) -> Result<DataLoader> {
    let c = &loaded.config;
    let end_epoch = if c.train.max_steps.is_some() { u64::MAX } else { c.train.epochs };
    let sampler = LoaderOptions::from_config(&loaded.data.loader, world.rank, world.size, state.cursor, end_epoch).sampler(records.records.len());
    let local = sampler.local_cursor(state.cursor);
    let opts = LoaderOptions::from_config(&loaded.data.loader, world.rank, world.size, local, end_epoch);
    let mut loader = DataLoader::start(records, pipeline, opts)?;
    // The run's skipped counts live on rank 0; the others count from zero.
    loader.restore_bad_counts(if world.is_root() { state.skipped.clone() } else { BadRecordCounts::new(state.skipped.max_examples) });
    Ok(loader)
}

/// The output folder with the run's config (rank 0), the logs and the checkpoint writer.
fn open_logs<'a>(loaded: &LoadedConfig, state: &TrainState, comm: &'a Comm) -> Result<(Logger, CheckpointWriter<'a>)> {
    let c = &loaded.config;
    let out = c.checkpoint.output_dir.clone();
    let root = comm.world().is_root();
    let config_toml = loaded.to_toml();
    if root {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        std::fs::write(out.join(checkpoint::CONFIG_FILE), &config_toml)?;
    }
    let logger =
        Logger::new(root, &loaded.tensorboard_dir(), &out, state.total_steps, state.step).with_context(|| format!("opening the logs in {}", out.display()))?;
    let writer = CheckpointWriter { output_dir: out, config_toml, keep_last: c.checkpoint.keep_last, comm };
    Ok((logger, writer))
}

/// Steps after which a run should meet no new kernel shape (each sequence-length bucket and canvas
/// seen at least once is typical), for the kernel-count report.
const WARMUP_STEPS: u64 = 10;

impl<'a, B: AutodiffBackend, S: Backend> Training<'a, B, S> {
    /// Builds the model, restores `resume` if given, and starts this rank's shard of the data.
    fn start(loaded: LoadedConfig, resume: Option<&Path>, device: &B::Device, comm: &'a Comm) -> Result<Self> {
        let c = loaded.config.clone();
        let world = comm.world();
        let say = Reporter::of(world);
        say.line(|| format!("device: {}; precision: {}", c.device, c.precision.effective_note()));
        if let Some(note) = c.precision.device_note(c.device) {
            say.line(|| format!("note: {note}"));
        }
        let (model, fila_config, set) = build_model::<B>(&loaded, device)?;
        if let Some(dir) = &c.model.checkpoint {
            say.line(|| format!("model: FILA checkpoint {}", loaded.source.parent().unwrap_or(Path::new(".")).join(dir).display()));
        }
        say.line(|| {
            format!(
                "stage {}: {} of {} parameter tensors trainable ({} elements){}",
                c.stage,
                set.params.len(),
                set.total_params,
                set.num_elements(),
                match (world.size, c.distributed.zero_stage) {
                    (1, _) => String::new(),
                    (n, 3) => format!("; {n} ranks, weights and optimizer state sharded (ZeRO-3)"),
                    (n, _) => format!("; {n} ranks, optimizer state sharded"),
                }
            )
        });
        let records = Arc::new(RecordSet::load(&loaded.data)?);
        let pipeline = Arc::new(Pipeline::new(loaded.data.clone())?);
        let (state, model, optimizer) = restore::<B, S>(&loaded, resume, model, &set, &records, device, world)?;
        // The optimizer holds the f32 values now; the model may keep a lower-precision copy, or
        // (ZeRO-3) placeholders only.
        let model = c.precision.store_trainable(model, &set);
        let model = if optimizer.shard_weights { crate::zero3::strip(model, &optimizer.layout) } else { model };
        let schedule = Schedule::new(c.optimizer.lr, &c.schedule, state.total_steps);
        let loader = start_data(&loaded, records.clone(), pipeline, &state, world)?;
        let (logger, writer) = open_logs(&loaded, &state, comm)?;
        Ok(Self {
            first_step: state.step,
            kernels_after_warmup: None,
            lr_groups: set.lr_groups(),
            records: records.records.len(),
            loaded,
            c,
            comm,
            device: device.clone(),
            model,
            fila_config,
            set,
            optimizer,
            schedule,
            loader,
            state,
            logger,
            writer,
        })
    }

    /// The next `accumulation_steps` micro-batches of this rank, read first so the loss can be
    /// normalised by the step's tokens over all ranks. `None` once any rank's data ran out.
    fn next_window(&mut self) -> Result<Option<Window>> {
        let mut batches: Vec<Batch> = Vec::with_capacity(self.c.batch.accumulation_steps);
        while batches.len() < self.c.batch.accumulation_steps {
            match self.loader.next() {
                Some(b) => batches.push(b?),
                None => break,
            }
        }
        let tokens: usize = batches.iter().map(scored_tokens).sum();
        let samples: usize = batches.iter().map(|b| b.batch_size).sum();
        let all = self.comm.gather_f64(&[tokens as f64, samples as f64, batches.len() as f64])?;
        if all.iter().any(|r| r[2] == 0.0) {
            return Ok(None);
        }
        let total = |i: usize| all.iter().map(|r| r[i]).sum::<f64>() as usize;
        let slots = all.iter().map(|r| r[2] as usize).max().unwrap_or(0);
        Ok(Some(Window { batches, tokens: total(0), samples: total(1), slots }))
    }

    /// Forward and backward over the window, then one sharded update (skipped when a loss or the
    /// gradient norm is not finite on any rank).
    fn train_step(&mut self, window: Window) -> Result<StepResult> {
        let t0 = std::time::Instant::now();
        alloc::mark("between steps");
        let live_before = alloc::live_bytes();
        let lr = self.schedule.lr(self.state.step);
        let device = self.device.clone();
        let tokens = window.tokens.max(1) as f64;
        let micro_batches = (0..window.slots).map(|slot| {
            let batch = window.batches.get(slot)?;
            Some(MicroBatch { input: to_input::<B>(batch, &device), share: scored_tokens(batch) as f64 / tokens })
        });
        if self.c.lora.enabled() && self.c.lora.dropout > 0.0 {
            // The adapters' dropout masks are drawn from a generator seeded by run, step and rank:
            // a resumed run draws the masks an uninterrupted one would.
            let rank = self.comm.world().rank as u64;
            B::seed(&device, self.c.seed ^ (self.state.step + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (rank + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        }
        let step = TrainStep::of(&self.c, &self.set);
        let model = self.model.clone();
        let (model, outcome) = step.run(model, micro_batches, Some(&mut self.optimizer), lr, self.comm, || STOP.load(Ordering::SeqCst))?;
        self.model = model;
        let StepOutcome { loss, grad_norm, finite, signalled } = outcome;
        if alloc::profiling() {
            Reporter::of(self.comm.world()).line(|| alloc::profile_line(&format!("step {}", self.state.step + 1), live_before));
        }
        if finite {
            self.state.nonfinite_in_a_row = 0;
        } else {
            self.state.nonfinite_total += 1;
            self.state.nonfinite_in_a_row += 1;
        }
        self.state.step += 1;
        self.state.samples_seen += window.samples as u64;
        self.state.tokens_seen += window.tokens as u64;
        self.sync_data_position(Some(window.batches.last().expect("non-empty").cursor))?;

        let step_time = t0.elapsed().as_secs_f64();
        let metrics = StepMetrics {
            step: self.state.step,
            loss,
            lr,
            lrs: self.lr_groups.iter().map(|m| (*m, lr * m)).collect(),
            grad_norm,
            tokens_per_s: window.tokens as f64 / step_time,
            samples_per_s: window.samples as f64 / step_time,
            step_time_s: step_time,
            tokens: window.tokens,
            samples: window.samples,
            skipped: self.state.skipped.counts().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            nonfinite: !finite,
            kernels: kernel_events::counts(),
        };
        if self.state.step == self.first_step + WARMUP_STEPS {
            self.kernels_after_warmup = Some(metrics.kernels);
        }
        Ok(StepResult { metrics, signalled })
    }

    /// The run-wide data cursor (the smallest over ranks; unchanged without a `local` one) and
    /// skipped-record counts (summed over ranks).
    fn sync_data_position(&mut self, local: Option<DataCursor>) -> Result<()> {
        let global = local.map(|l| self.loader.sampler.global_cursor(l));
        let (cursor, skipped) = self.comm.agree_data_position(global, self.loader.bad_counts(), self.state.skipped.max_examples)?;
        if let Some(c) = cursor {
            self.state.cursor = c;
            self.state.epoch = c.epoch;
        }
        self.state.skipped = skipped;
        Ok(())
    }

    fn log(&mut self, step: &StepResult) -> Result<()> {
        self.logger.log(&step.metrics, self.c.logging.every_steps).context("writing metrics.jsonl")
    }

    /// Stop here? Checkpoints at the interval; every rank decides alike from the reduced values.
    fn after_step(&mut self, step: &StepResult, options: &RunOptions, started_at: u64) -> Result<Option<StopReason>> {
        if self.state.nonfinite_in_a_row >= self.c.train.max_nonfinite_steps {
            return Ok(Some(StopReason::NonFinite));
        }
        if step.signalled {
            return Ok(Some(StopReason::Signal));
        }
        if options.stop_after.is_some_and(|n| self.state.step - started_at >= n) {
            return Ok(Some(StopReason::StopAfter));
        }
        let every = self.c.checkpoint.every_steps;
        if every > 0 && self.state.step.is_multiple_of(every) && self.state.step < self.state.total_steps {
            self.save(CheckpointReason::Interval)?;
        }
        Ok(None)
    }

    /// The model with all its weights: under ZeRO-3 gathered from every rank's slice (a
    /// collective: every rank calls it), otherwise the model itself.
    fn whole_model(&self) -> Result<Fila<B>> {
        if self.optimizer.shard_weights {
            self.optimizer.write_back(self.model.clone(), self.comm)
        } else {
            Ok(self.model.clone())
        }
    }

    /// Writes `final/` from `model` (all weights present): the model with any LoRA adapters
    /// merged into its weights, and the adapters on their own beside it.
    fn export_final(&self, model: &Fila<B>) -> Result<PathBuf> {
        let adapters = |dir: &Path| lora::write_adapters(dir, model, &self.c.lora, &self.set);
        checkpoint::export_model_to(
            &self.writer.output_dir.join("final"),
            model,
            &self.fila_config,
            &self.loaded.data.tokenizer,
            &self.loaded.to_toml(),
            &adapters,
        )
    }

    fn save(&mut self, reason: CheckpointReason) -> Result<PathBuf> {
        let model = self.whole_model()?;
        self.save_model(&model, reason)
    }

    /// [`Training::save`] of `model`, the whole model already at hand.
    fn save_model(&mut self, model: &Fila<B>, reason: CheckpointReason) -> Result<PathBuf> {
        self.state.reason = reason;
        self.writer.save(model, &self.set, &self.optimizer, &self.state)
    }

    /// The last checkpoint, and at the end of the run the `final/` export (rank 0).
    fn finish(mut self, reason: StopReason) -> Result<RunOutcome> {
        let root = self.comm.world().is_root();
        let say = Reporter::of(self.comm.world());
        match reason {
            StopReason::NonFinite => {
                let dir = self.save(CheckpointReason::NonFinite)?;
                self.logger.flush();
                bail!(
                    "{} steps in a row had a non-finite loss or gradient (last at step {}); stopped with a checkpoint at {}. \
                     Lower `optimizer.lr`, check the data, or resume from an earlier checkpoint",
                    self.state.nonfinite_in_a_row,
                    self.state.step,
                    dir.display()
                );
            }
            StopReason::Signal | StopReason::StopAfter => {
                let dir = self.save(if reason == StopReason::Signal { CheckpointReason::Signal } else { CheckpointReason::StopAfter })?;
                self.logger.flush();
                say.line(|| format!("stopped at step {}; checkpoint {}. Continue with --resume", self.state.step, dir.display()));
                return Ok(RunOutcome { step: self.state.step, finished: false, checkpoint: Some(dir), final_dir: None });
            }
            StopReason::Completed => {}
            // The records read after the last step were all skipped: count them.
            StopReason::DataExhausted => self.sync_data_position(None)?,
        }
        // Skipped records are never silent: they are logged as `data/skipped/<reason>` and listed here.
        let bad = &self.state.skipped;
        let source = self.loaded.source.display();
        if self.state.step == 0 {
            bail!(
                "no training step ran: none of the {} records gave a usable sample; skipped by reason:\n{bad}\
                 Run `fila data check --config {source}` to see every bad record",
                self.records
            );
        }
        if bad.total() > 0 {
            say.line(|| format!("skipped {} bad records (run `fila data check --config {source}` for all of them):\n{bad}", bad.total()));
        }
        let kernels = kernel_events::counts();
        if kernels != KernelCounts::default() {
            let later = match self.kernels_after_warmup.map(|warm| kernels.since(warm)) {
                Some(late) => format!("; after the first {WARMUP_STEPS} steps: {} compiled, {} autotune runs", late.compiled, late.tuned),
                None => String::new(),
            };
            say.line(|| {
                format!("GPU kernels: {} compiled, {} from the compilation cache, {} autotune runs{later}", kernels.compiled, kernels.from_cache, kernels.tuned)
            });
        }
        // One gather of the whole model (ZeRO-3) for the last checkpoint and `final/`.
        let model = self.whole_model()?;
        let dir = self.save_model(&model, CheckpointReason::End)?;
        let out = &self.writer.output_dir;
        let final_dir = if root { Some(self.export_final(&model)?) } else { None };
        self.comm.barrier()?;
        self.logger.flush();
        say.line(|| format!("done: {} steps; final model in {}", self.state.step, out.join("final").display()));
        Ok(RunOutcome { step: self.state.step, finished: true, checkpoint: Some(dir), final_dir })
    }
}
