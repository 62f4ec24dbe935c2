//! `fila bench`: the time of training steps on random weights, for a speed baseline and for
//! the PyTorch twin of the same presets (`scripts/bench/bench_torch.py`; `scripts/bench/bench_cpu_compare.py`
//! runs both alternately, `scripts/gpu/gpu_bench.sh` one after the other).
//!
//! A step is the trainer's own step (`fila_train::step::TrainStep`) with one micro-batch: the
//! forward and backward pass (with activation checkpointing of the LLM layers where the preset's
//! config sets it) and, with `--optimizer`, AdamW on the stage's trainable set
//! (`fila_train::trainable`), gradients clipped at 1.
//!
//! Sizes: `tiny` and `mid` are CPU demo sizes; `real` is FILA's published architecture (CLIP
//! ViT-L/14-336, ConvNeXt-L, Llama-3-8B) from the configs in `fila_model`, random weights, no
//! download. Batches: `canvas2x2` gives every sample one 2×2 canvas (the CPU comparison's
//! batch); `recipe` is the stage's: stage 1 one 336² view with ConvNeXt at 768² at micro-batch
//! 16, stage 2 FILA's five canvases in turn (ConvNeXt at 768-2304 pixels a side) at micro-batch
//! 1 (configs/stage1.toml, configs/stage2.toml).
//!
//! The 8B model's AdamW state does not fit one GPU next to a stage-2 step, and the configs train
//! stage 2 on 8 ranks; there the optimizer step covers `--optimizer-world`'s share of the
//! trainable elements: whole parameters in name order up to 1/W of them, with their f32 master
//! values and moments, so one rank's update work without its collectives (the reduce-scatter
//! and all-gather that move the other slices).

use crate::flops::{step_flops, SampleShape, StepFlops, Trains};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, TensorData};
use fila_model::clip_vit::ClipVisionConfig;
use fila_model::convnext::ConvNextConfig;
use fila_model::cvfm::TileGrid;
use fila_model::fila::{Fila, FilaConfig, FilaInput, ScoredRows};
use fila_model::hybrid_encoder::{HybridConfig, ImageInput};
use fila_model::llama::LlamaConfig;
use fila_model::projector::ProjectorKind;
use fila_train::backend::Device;
use fila_train::config::{OptimizerConfig, TrainableConfig};
use fila_train::dist::Comm;
use fila_train::optim::AdamW;
use fila_train::precision::Precision;
use fila_train::recompute::Recompute;
use fila_train::shard::{FlatLayout, BUCKET_ELEMENTS};
use fila_train::step::{MicroBatch, StepOutcome, TrainStep};
use fila_train::trainable::{apply_trainable, stage_modules, TrainableSet};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchSize {
    /// The CPU demo size: 56-pixel tiles (4×4 cells), ViT 5×64, LLM 2×128.
    Tiny,
    /// A mid size: 112-pixel tiles (8×8 cells), ViT 8×256, ConvNeXt 48-384, LLM 4×512.
    Mid,
    /// FILA's size: CLIP ViT-L/14-336, ConvNeXt-L, Llama-3-8B (a GPU's work: ~34 GB in f32).
    Real,
}

/// The images of a benchmark batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BatchShape {
    /// One 2×2 canvas per sample (5 ViT views) in both stages: the CPU comparison's batch.
    Canvas2x2,
    /// The stage's recipe: stage 1 one view (no tiles), stage 2 the five canvases in turn.
    Recipe,
}

/// FILA's stage-2 canvases, `[columns, rows]` of tiles as in configs/stage2.toml; the recipe
/// batch gives sample n of the run canvas `n mod 5`.
pub const STAGE2_CANVASES: [[usize; 2]; 5] = [[2, 2], [1, 2], [2, 1], [1, 3], [3, 1]];

/// The H200's dense bf16 peak, the MFU denominator on CUDA unless `--peak-tflops` says otherwise.
pub const H200_BF16_TFLOPS: f64 = 989.0;

pub fn preset(size: BenchSize) -> FilaConfig {
    let (tile, vit_dim, vit_layers, conv_dims, llm_dim, llm_layers) = match size {
        BenchSize::Tiny => (56, 64, 5, vec![16, 32, 48, 64], 128, 2),
        BenchSize::Mid => (112, 256, 8, vec![48, 96, 192, 384], 512, 4),
        BenchSize::Real => {
            return FilaConfig {
                vision: ClipVisionConfig::vit_large_patch14_336(),
                convnext: ConvNextConfig::large(),
                // FILA's fusion after ViT layers 2, 6, 12, 20; the projector reads layer 23.
                hybrid: HybridConfig::default(),
                projector: ProjectorKind::Mlp { depth: 2 },
                llm: LlamaConfig::llama3_8b(),
                // configs/stage1.toml: Llama-3's first reserved special token.
                image_token_id: 128002,
            };
        }
    };
    FilaConfig {
        vision: ClipVisionConfig {
            hidden_size: vit_dim,
            intermediate_size: 4 * vit_dim,
            num_hidden_layers: vit_layers,
            num_attention_heads: vit_dim / 32,
            image_size: tile,
            patch_size: 14,
            ..ClipVisionConfig::default()
        },
        convnext: ConvNextConfig { hidden_sizes: conv_dims, depths: vec![1, 1, 2, 1], ..ConvNextConfig::default() },
        hybrid: HybridConfig { fusion_layers: (1..=4).map(|k| k * (vit_layers - 1) / 4).collect(), ..HybridConfig::default() },
        projector: ProjectorKind::Mlp { depth: 2 },
        llm: LlamaConfig {
            vocab_size: 1024,
            hidden_size: llm_dim,
            intermediate_size: llm_dim * 8 / 3,
            num_hidden_layers: llm_layers,
            num_attention_heads: llm_dim / 32,
            num_key_value_heads: llm_dim / 64,
            head_dim: 32,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
        },
        image_token_id: 1000,
    }
}

/// `fila bench`'s flags; unset ones take the size's and stage's defaults ([`BenchOptions::from_args`]).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "tiny")]
    pub size: BenchSize,
    /// Trainable set of this training stage: 1 = CVFM + projector, 2 = everything.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub stage: u8,
    /// Images of the batch [default: recipe for real, canvas2x2 otherwise].
    #[arg(long, value_enum)]
    pub batch_shape: Option<BatchShape>,
    /// Samples per step [default: the recipe's micro-batch (stage 1: 16, stage 2: 1), else 1].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Text tokens per sample after the visual ones, all scored [default: 32; real: 64 in stage 1, 512 in stage 2].
    #[arg(long)]
    pub text_tokens: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps first [default: 5 with stage 2's canvas mix (each canvas once), else 1].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// `cpu` or `cuda:N` (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// `f32` or `bf16_mixed` (fila-train's precision policy) [default: bf16_mixed for real, f32 otherwise].
    #[arg(long, value_parser = crate::parse_precision)]
    pub precision: Option<Precision>,
    /// Recompute the LLM layers in the backward pass [default: true for real, as the configs set; false otherwise].
    #[arg(long)]
    pub activation_checkpointing: Option<bool>,
    /// Include the optimizer update (gradient clipping and AdamW) in each step.
    #[arg(long)]
    pub optimizer: bool,
    /// The AdamW step covers 1/W of the trainable elements, one rank's share of a W-way
    /// sharding [default: 8 for real stage 2, 1 otherwise].
    #[arg(long)]
    pub optimizer_world: Option<usize>,
    /// Peak of the device in TFLOP/s for the utilisation [default: 989 (H200 dense bf16) on CUDA; none on CPU].
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Print one JSON object (per-step figures and the summary) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What to run, every default resolved.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub size: BenchSize,
    pub stage: u8,
    pub shape: BatchShape,
    pub batch: usize,
    pub text_tokens: usize,
    pub steps: usize,
    pub warmup: usize,
    pub device: Device,
    pub precision: Precision,
    pub recompute: Recompute,
    pub optimizer: bool,
    pub optimizer_world: usize,
    pub peak_tflops: Option<f64>,
    pub json: bool,
}

impl BenchOptions {
    pub fn from_args(a: &BenchArgs) -> anyhow::Result<Self> {
        let real = a.size == BenchSize::Real;
        let shape = a.batch_shape.unwrap_or(if real { BatchShape::Recipe } else { BatchShape::Canvas2x2 });
        let recipe = shape == BatchShape::Recipe;
        let mix = recipe && a.stage == 2;
        let options = Self {
            size: a.size,
            stage: a.stage,
            shape,
            batch: a.batch.unwrap_or(match (recipe, a.stage) {
                (true, 1) => 16,
                _ => 1,
            }),
            text_tokens: a.text_tokens.unwrap_or(match (real, a.stage) {
                (true, 1) => 64,
                (true, _) => 512,
                _ => 32,
            }),
            steps: a.steps,
            warmup: a.warmup.unwrap_or(if mix { STAGE2_CANVASES.len() } else { 1 }),
            device: a.device,
            precision: a.precision.unwrap_or(if real { Precision::Bf16Mixed } else { Precision::F32 }),
            recompute: Recompute::from_config(a.activation_checkpointing.unwrap_or(real)),
            optimizer: a.optimizer,
            optimizer_world: a.optimizer_world.unwrap_or(if real && a.stage == 2 { 8 } else { 1 }),
            peak_tflops: a.peak_tflops.or(match a.device {
                Device::Cuda(_) => Some(H200_BF16_TFLOPS),
                Device::Cpu | Device::Wgpu(_) => None,
            }),
            json: a.json,
        };
        anyhow::ensure!(options.steps > 0 && options.batch > 0, "--steps and --batch must be at least 1");
        anyhow::ensure!(options.optimizer_world > 0, "--optimizer-world must be at least 1");
        anyhow::ensure!(options.text_tokens > 1, "--text-tokens must be at least 2 (the loss needs a scored position)");
        anyhow::ensure!(
            !(real && options.device == Device::Cpu),
            "--size real builds the 8B model (about 34 GB of f32 weights before the bf16 copies): run it on a GPU (`--device cuda:0`, a `--features cuda` build)"
        );
        Ok(options)
    }

    /// The images of step `step`'s samples.
    pub fn grids(&self, step: usize) -> Vec<TileGrid> {
        (0..self.batch)
            .map(|i| match (self.shape, self.stage) {
                (BatchShape::Canvas2x2, _) => TileGrid::tiled(2, 2),
                (BatchShape::Recipe, 1) => TileGrid::untiled(),
                (BatchShape::Recipe, _) => {
                    let [cols, rows] = STAGE2_CANVASES[(step * self.batch + i) % STAGE2_CANVASES.len()];
                    TileGrid::tiled(rows, cols)
                }
            })
            .collect()
    }
}

/// CPU time (user, system) of this process so far, all threads, from `/proc/self/stat`; `None`
/// where there is no procfs. The kernel reports it in USER_HZ ticks, 100 per second on Linux.
fn cpu_times() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i)?.parse::<f64>().ok().map(|t| t / 100.0);
    Some((tick(11)?, tick(12)?))
}

/// Peak memory over the timed steps, where the device can tell.
enum PeakMemory {
    /// The process's peak resident set (`VmHWM`), reset before the timed steps where the kernel
    /// allows it (`/proc/self/clear_refs`), else since the start.
    Rss {
        reset: bool,
    },
    #[cfg(feature = "cuda")]
    Cuda(cuda_memory::Sampler),
    Unknown,
}

impl PeakMemory {
    fn start(device: Device) -> Self {
        match device {
            Device::Cpu if std::fs::metadata("/proc/self/status").is_ok() => Self::Rss { reset: std::fs::write("/proc/self/clear_refs", "5").is_ok() },
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => cuda_memory::Sampler::start(ordinal).map(Self::Cuda).unwrap_or(Self::Unknown),
            _ => Self::Unknown,
        }
    }

    /// Bytes and what they measure.
    fn finish(self) -> (Option<u64>, String) {
        match self {
            Self::Rss { reset } => {
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
                let what = if reset { "peak RSS of the process during the timed steps (VmHWM)" } else { "peak RSS of the process since its start (VmHWM)" };
                (kb.map(|k| k * 1024), what.into())
            }
            #[cfg(feature = "cuda")]
            Self::Cuda(sampler) => sampler.finish(),
            Self::Unknown => (None, "n/a".into()),
        }
    }
}

/// Device memory reserved on a CUDA GPU, sampled from another thread: Burn 0.21 / CubeCL 0.10 report
/// the current pool use per stream (`ComputeClient::memory_usage`) but no peak, so the peak is
/// read from the driver (`cuMemGetInfo`: total − free, the whole device as `nvidia-smi` shows
/// it, the CUDA context included). CubeCL's pools keep the pages they reserve, so this is
/// reserved memory, like PyTorch's `max_memory_reserved` (plus the context), not what the
/// tensors of a step occupy; the bench cleans the pools up after the warm-up to start from
/// what is still in use.
#[cfg(feature = "cuda")]
mod cuda_memory {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    pub struct Sampler {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<Result<u64, String>>,
    }

    impl Sampler {
        pub fn start(ordinal: usize) -> Option<Self> {
            let context = cudarc::driver::CudaContext::new(ordinal).ok()?;
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut peak = 0u64;
                loop {
                    let (free, total) = context.mem_get_info().map_err(|e| format!("cuMemGetInfo: {e:?}"))?;
                    peak = peak.max((total - free) as u64);
                    if flag.load(Ordering::Relaxed) {
                        return Ok(peak);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            Some(Self { stop, thread })
        }

        pub fn finish(self) -> (Option<u64>, String) {
            self.stop.store(true, Ordering::Relaxed);
            match self.thread.join() {
                Ok(Ok(peak)) => {
                    (Some(peak), "device memory reserved during the timed steps (total − free from the driver every 2 ms: CubeCL's pools and the CUDA context included, like max_memory_reserved + context)".into())
                }
                Ok(Err(e)) => (None, format!("n/a ({e})")),
                Err(_) => (None, "n/a (the sampling thread panicked)".into()),
            }
        }
    }
}

/// One rank's share of a `world`-way sharding of `set`: whole parameters in name order (the
/// optimizer's flat order) until 1/world of the elements. All of `set` for one rank.
pub fn optimizer_slice(set: &TrainableSet, world: usize) -> TrainableSet {
    if world <= 1 {
        return set.clone();
    }
    let target = set.num_elements().div_ceil(world);
    let mut slice = TrainableSet { params: Default::default(), total_params: set.total_params };
    let mut taken = 0;
    for (name, param) in &set.params {
        if taken >= target {
            break;
        }
        taken += param.shape.iter().product::<usize>();
        slice.params.insert(name.clone(), param.clone());
    }
    slice
}

/// A batch of `grids.len()` samples, each its image's visual tokens then `text` scored text
/// tokens, right-padded to the longest; returns the input, its shapes and its unpadded tokens.
fn make_input<B: Backend>(config: &FilaConfig, grids: &[TileGrid], text: usize, device: &B::Device) -> (FilaInput<B>, Vec<SampleShape>, usize, usize) {
    let g = config.vision.grid();
    let t = config.vision.image_size;
    let normal = Distribution::Normal(0.0, 1.0);
    let image_token = config.image_token_id as i64;
    let lengths: Vec<usize> = grids.iter().map(|grid| grid.num_views() * g * g + text).collect();
    let len = lengths.iter().copied().max().unwrap_or(0);
    let batch = grids.len();
    let (mut ids, mut mask, mut labels) = (Vec::with_capacity(batch * len), Vec::with_capacity(batch * len), Vec::with_capacity(batch * len));
    for (grid, &n) in grids.iter().zip(&lengths) {
        let visual = grid.num_views() * g * g;
        ids.extend(std::iter::repeat_n(image_token, visual));
        labels.extend(std::iter::repeat_n(-100i64, visual));
        // Ordinary ids below the image token in every preset's vocabulary.
        let words = (0..text as i64).map(|i| 10 + i % 900);
        ids.extend(words.clone());
        labels.extend(words);
        ids.extend(std::iter::repeat_n(0, len - n));
        labels.extend(std::iter::repeat_n(-100i64, len - n));
        mask.extend((0..len).map(|i| if i < n { 1.0f32 } else { 0.0 }));
    }
    let images = grids
        .iter()
        .map(|&grid| ImageInput {
            views: Tensor::random([grid.num_views(), 3, t, t], normal, device),
            hires: Some(Tensor::random([1, 3, grid.rows * g * 32, grid.cols * g * 32], normal, device)),
            grid,
        })
        .collect();
    let input = FilaInput {
        input_ids: Tensor::from_data(TensorData::new(ids, [batch, len]), device),
        attention_mask: Tensor::from_data(TensorData::new(mask, [batch, len]), device),
        labels: Some(Tensor::from_data(TensorData::new(labels, [batch, len]), device)),
        images,
    };
    let shapes = grids.iter().map(|&grid| SampleShape { grid, text_tokens: text }).collect();
    (input, shapes, len, lengths.iter().sum())
}

/// A FLOP count for people: GFLOP below a TFLOP.
fn flop_text(flops: f64) -> String {
    if flops < 1e12 {
        format!("{:.2} GFLOP", flops / 1e9)
    } else {
        format!("{:.1} TFLOP", flops / 1e12)
    }
}

/// A step's canvases as `columns×rows` each, one entry with a count where all samples share it.
fn canvas_text(canvases: &[[usize; 2]]) -> String {
    let each: Vec<String> = canvases.iter().map(|[c, r]| format!("{c}x{r}")).collect();
    match each.first() {
        Some(first) if each.len() > 1 && each.iter().all(|e| e == first) => format!("{first} ×{}", each.len()),
        _ => each.join(" "),
    }
}

/// Figures of one timed step.
struct StepRecord {
    seconds: f64,
    tokens: usize,
    samples: usize,
    flops: StepFlops,
    canvases: Vec<[usize; 2]>,
    loss: f64,
}

/// The trainer's stage-2 recipe for the bench's optimizer (weight decay 0, clipping at 1); the
/// values do not change the work.
const BENCH_LR: f64 = 2e-5;
const BENCH_MAX_GRAD_NORM: f64 = 1.0;

/// What a bench run trains with: the stage's trainable set and, with `--optimizer`, AdamW over
/// one rank's slice ([`Setup::build`] also returns the model, which the steps then own).
struct Setup<B: AutodiffBackend> {
    config: FilaConfig,
    set: TrainableSet,
    slice: Option<TrainableSet>,
    adam: Option<AdamW<B::InnerBackend>>,
}

impl<B: AutodiffBackend> Setup<B> {
    /// The model as the trainer builds it for the stage (its trainable set, weights stored as the
    /// precision says), and what the steps need beside it.
    fn build(options: &BenchOptions, device: &B::Device) -> anyhow::Result<(Self, Fila<B>)> {
        let config = preset(options.size);
        config.validate().expect("preset is valid");
        B::seed(device, 0);
        let (model, set) = apply_trainable(config.init::<B>(device), options.stage, &TrainableConfig::default())?;
        let model = options.precision.store_frozen(model, &set);
        let (slice, adam) = Self::optimizer(options, &set, &model, device);
        // The optimizer holds the f32 values now; the model keeps what the precision stores.
        let model = options.precision.store_trainable(model, &set);
        Ok((Self { config, set, slice, adam }, model))
    }

    /// With `--optimizer`: the slice of the trainable set one rank owns and AdamW over it, holding
    /// `model`'s values.
    fn optimizer(options: &BenchOptions, set: &TrainableSet, model: &Fila<B>, device: &B::Device) -> (Option<TrainableSet>, Option<AdamW<B::InnerBackend>>) {
        let adam_config = OptimizerConfig { lr: BENCH_LR, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0, offload: Default::default() };
        let slice = options.optimizer.then(|| optimizer_slice(set, options.optimizer_world));
        let adam = slice.as_ref().map(|slice| AdamW::new(adam_config, slice, FlatLayout::new(slice, 1, 0, BUCKET_ELEMENTS), model, device));
        (slice, adam)
    }

    /// The training step `fila-train` runs ([`TrainStep`]), at the bench's precision and
    /// recomputation, on one micro-batch.
    fn step(&mut self, options: &BenchOptions, model: Fila<B>, input: FilaInput<B>, comm: &Comm) -> anyhow::Result<(Fila<B>, StepOutcome)> {
        let step = TrainStep { precision: options.precision, recompute: options.recompute, set: &self.set, max_grad_norm: BENCH_MAX_GRAD_NORM };
        step.run(model, [Some(MicroBatch { input, share: 1.0 })], self.adam.as_mut(), BENCH_LR, comm, || false)
    }
}

/// Runs `warmup` untimed and `steps` timed training steps and prints per-step and summary
/// figures. Each step ends with a device sync, so asynchronous backends are timed to completion.
pub fn run<B: AutodiffBackend>(options: BenchOptions, device: &B::Device) -> anyhow::Result<()> {
    let BenchOptions { size, stage, shape, batch, text_tokens, steps, warmup, precision, recompute, optimizer_world, peak_tflops, json, .. } = options;
    let build_start = Instant::now();
    let (mut setup, mut model) = Setup::<B>::build(&options, device)?;
    let trains = Trains::from_modules(&stage_modules(stage, &TrainableConfig::default()));
    B::sync(device).expect("device sync");
    let build_s = build_start.elapsed().as_secs_f64();
    let comm = Comm::single();

    let counts = setup.config.num_params();
    let checkpointing = matches!(recompute, Recompute::Layers { .. });
    if !json {
        println!(
            "fila bench {size:?} stage {stage}: {:.1}M parameters ({:.1}M trainable), batch {batch} ({shape:?}), {text_tokens} text tokens per sample, {precision:?}, activation checkpointing {}",
            counts.total() as f64 / 1e6,
            setup.set.num_elements() as f64 / 1e6,
            if checkpointing { "on" } else { "off" },
        );
        if let Some(slice) = setup.slice.as_ref().filter(|_| optimizer_world > 1) {
            println!(
                "AdamW over one rank's slice of a {optimizer_world}-way sharding: {:.1}M of {:.1}M trainable elements (whole parameters in name order), without the collectives",
                slice.num_elements() as f64 / 1e6,
                setup.set.num_elements() as f64 / 1e6
            );
        }
    }

    let mut step = |model: Fila<B>, index: usize| -> anyhow::Result<(Fila<B>, StepRecord)> {
        let grids = options.grids(index);
        let (input, shapes, len, tokens) = make_input::<B>(&setup.config, &grids, text_tokens, device);
        let scored = ScoredRows::of(input.labels.as_ref().expect("labels given")).len();
        let flops = step_flops(&setup.config, &shapes, len, scored, trains, checkpointing);
        B::sync(device).expect("device sync");
        let start = Instant::now();
        let (model, outcome) = setup.step(&options, model, input, &comm)?;
        B::sync(device).expect("device sync");
        let seconds = start.elapsed().as_secs_f64();
        let canvases = grids.iter().map(|g| if g.tiled { [g.cols, g.rows] } else { [1, 1] }).collect();
        Ok((model, StepRecord { seconds, tokens, samples: grids.len(), flops, canvases, loss: outcome.loss }))
    };
    // Progress goes to stderr under --json, so a run stopped by a time limit still shows its steps.
    let say = |line: String| if json { eprintln!("{line}") } else { println!("{line}") };
    let line = |i: usize, r: &StepRecord, what: &str| {
        let mfu = peak_tflops.map(|p| format!("{:.1} %", 100.0 * r.flops.total() as f64 / r.seconds / (p * 1e12))).unwrap_or_else(|| "n/a".into());
        format!(
            "{what} {:>3}: {:8.1} ms, loss {:.4}, {:>6} tokens, {:9.1} tokens/s, {:7.2} samples/s, {}, MFU {mfu}, canvases {}",
            i + 1,
            r.seconds * 1e3,
            r.loss,
            r.tokens,
            r.tokens as f64 / r.seconds,
            r.samples as f64 / r.seconds,
            flop_text(r.flops.total() as f64),
            canvas_text(&r.canvases)
        )
    };
    say(format!("model built in {build_s:.1} s"));
    let mut warmup_s = Vec::with_capacity(warmup);
    for i in 0..warmup {
        let (next, record) = step(model, i)?;
        model = next;
        say(line(i, &record, "warm-up"));
        warmup_s.push(record.seconds);
    }
    // Pages the warm-up's pools no longer use go back first (CubeCL keeps them otherwise), so
    // the peak below is the timed steps' own.
    B::memory_cleanup(device);
    B::sync(device).expect("device sync");
    let memory = PeakMemory::start(options.device);
    let kernels_before = fila_train::kernel_events::counts();
    let mut records = Vec::with_capacity(steps);
    let cpu_start = cpu_times();
    let wall_start = Instant::now();
    for i in warmup..warmup + steps {
        let (next, record) = step(model, i)?;
        model = next;
        say(line(i, &record, "step"));
        records.push(record);
    }
    let wall = wall_start.elapsed().as_secs_f64();
    // Kernels compiled and autotune runs during the timed steps (goal: none after warm-up).
    let kernels = fila_train::kernel_events::counts().since(kernels_before);
    let peak = memory.finish();
    drop(model);
    // Input generation is inside the CPU window but outside the step times; it is small.
    let cpu = cpu_start.zip(cpu_times()).map(|((u0, s0), (u1, s1))| (u1 - u0, s1 - s0));
    let run = Run {
        options: &options,
        build_s,
        warmup_s,
        records,
        wall,
        cpu,
        peak,
        kernels,
        parameters: counts.total(),
        trainable: setup.set.num_elements(),
        optimizer_elements: setup.slice.as_ref().map(|s| s.num_elements()),
    };
    run.report();
    Ok(())
}

/// A finished bench run, for the report.
struct Run<'a> {
    options: &'a BenchOptions,
    build_s: f64,
    warmup_s: Vec<f64>,
    records: Vec<StepRecord>,
    wall: f64,
    cpu: Option<(f64, f64)>,
    peak: (Option<u64>, String),
    kernels: fila_train::kernel_events::KernelCounts,
    parameters: usize,
    trainable: usize,
    optimizer_elements: Option<usize>,
}

impl Run<'_> {
    /// Prints the summary: one JSON object under `--json`, lines for people otherwise.
    fn report(&self) {
        let BenchOptions { size, stage, shape, batch, text_tokens, steps, warmup, precision, recompute, optimizer, optimizer_world, peak_tflops, json, .. } =
            *self.options;
        let (records, wall, cpu, kernels) = (&self.records, self.wall, self.cpu, self.kernels);
        let (peak_bytes, peak_source) = (self.peak.0, &self.peak.1);
        let checkpointing = matches!(recompute, Recompute::Layers { .. });
        // Every kernel the autotuner chose in this run, warm-up included (GPU backends only).
        let picks = fila_train::kernel_events::picks_from(0);
        let times: Vec<f64> = records.iter().map(|r| r.seconds).collect();
        let seconds: f64 = times.iter().sum();
        let mean = seconds / steps as f64;
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[steps / 2];
        let tokens: usize = records.iter().map(|r| r.tokens).sum();
        let samples: usize = records.iter().map(|r| r.samples).sum();
        let mut flops = StepFlops::default();
        for r in records {
            flops.forward += r.flops.forward;
            flops.backward += r.flops.backward;
            flops.recompute += r.flops.recompute;
        }
        let achieved = flops.total() as f64 / seconds;
        let mfu = peak_tflops.map(|p| achieved / (p * 1e12));
        let mfu_model = peak_tflops.map(|p| flops.model() as f64 / seconds / (p * 1e12));
        let slice_elements = self.optimizer_elements;
        if json {
            let value = serde_json::json!({
                "size": format!("{size:?}").to_lowercase(),
                "stage": stage,
                "batch": batch,
                "batch_shape": format!("{shape:?}").to_lowercase(),
                "text_tokens": text_tokens,
                "device": self.options.device.to_string(),
                "precision": format!("{precision:?}"),
                "activation_checkpointing": checkpointing,
                "optimizer": optimizer,
                "optimizer_world": optimizer_world,
                "optimizer_elements": slice_elements,
                "build_s": self.build_s,
                "warmup_steps": warmup,
                "warmup_s": self.warmup_s,
                "steps": steps,
                "step_s": times,
                "step_tokens": records.iter().map(|r| r.tokens).collect::<Vec<_>>(),
                "step_canvases": records.iter().map(|r| r.canvases.clone()).collect::<Vec<_>>(),
                "step_loss": records.iter().map(|r| r.loss).collect::<Vec<_>>(),
                "step_flops": records.iter().map(|r| r.flops.total()).collect::<Vec<_>>(),
                "mean_s": mean,
                "median_s": median,
                "tokens_per_s": tokens as f64 / seconds,
                "samples_per_s": samples as f64 / seconds,
                "flops_per_step": {
                    "forward": flops.forward / steps as u64,
                    "backward": flops.backward / steps as u64,
                    "recompute": flops.recompute / steps as u64,
                    "total": flops.total() / steps as u64,
                },
                "achieved_tflops": achieved / 1e12,
                "peak_tflops": peak_tflops,
                "mfu": mfu,
                "mfu_without_recompute": mfu_model,
                "peak_memory_bytes": peak_bytes,
                "peak_memory_source": peak_source,
                "wall_s": wall,
                "user_s": cpu.map(|c| c.0),
                "system_s": cpu.map(|c| c.1),
                "trainable": self.trainable,
                "parameters": self.parameters,
                "kernels_compiled_after_warmup": kernels.compiled,
                "autotune_runs_after_warmup": kernels.tuned,
                "autotune_picks": picks,
            });
            println!("{value}");
        } else {
            let what = if optimizer { "forward+backward+AdamW" } else { "forward+backward" };
            println!(
                "{what}: mean {:.1} ms/step, median {:.1} ms/step over {steps} steps after {warmup} warm-up; {:.1} tokens/s, {:.2} samples/s",
                mean * 1e3,
                median * 1e3,
                tokens as f64 / seconds,
                samples as f64 / seconds
            );
            println!(
                "per step {} (forward {}, backward {}, recomputation {}), {:.3} TFLOP/s, MFU {}",
                flop_text(flops.total() as f64 / steps as f64),
                flop_text(flops.forward as f64 / steps as f64),
                flop_text(flops.backward as f64 / steps as f64),
                flop_text(flops.recompute as f64 / steps as f64),
                achieved / 1e12,
                match (mfu, mfu_model, peak_tflops) {
                    (Some(m), Some(n), Some(p)) => format!("{:.1} % of {p} TFLOP/s ({:.1} % without the recomputation)", m * 100.0, n * 100.0),
                    _ => "n/a (give --peak-tflops)".into(),
                }
            );
            match peak_bytes {
                Some(b) => println!("peak memory {:.2} GiB: {peak_source}", b as f64 / (1u64 << 30) as f64),
                None => println!("peak memory {peak_source}"),
            }
            if let Some((user, system)) = cpu {
                println!("CPU: user {user:.2} s, system {system:.2} s over {wall:.2} s wall (user/wall {:.2})", user / wall);
            }
            println!("after warm-up: {} kernels compiled, {} autotune runs", kernels.compiled, kernels.tuned);
            for pick in &picks {
                println!("autotune: {pick}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use fila_train::config::LoadedConfig;

    type B = Autodiff<Flex>;

    /// The bench runs the trainer's step: on the same model and batch, the bench's step and the
    /// step `fila-train` builds from a config with the same settings (the tiny stage-2 config:
    /// f32, checkpointing off, clipping at 1) give the same loss and gradient norm, bit for bit.
    #[test]
    fn a_bench_step_is_the_trainers_step() {
        let options = BenchOptions {
            size: BenchSize::Tiny,
            stage: 2,
            shape: BatchShape::Canvas2x2,
            batch: 2,
            text_tokens: 8,
            steps: 1,
            warmup: 0,
            device: Device::Cpu,
            precision: Precision::F32,
            recompute: Recompute::Off,
            optimizer: true,
            optimizer_world: 1,
            peak_tflops: None,
            json: true,
        };
        let device = Default::default();
        let comm = Comm::single();
        let generator = crate::generator_lock();
        let (mut bench, model) = Setup::<B>::build(&options, &device).unwrap();
        let (_, mut adam) = Setup::<B>::optimizer(&options, &bench.set, &model, &device);
        // One random batch for both (tests share the backend's generator, so it is drawn once).
        let input = make_input::<B>(&bench.config, &options.grids(0), options.text_tokens, &device).0;
        drop(generator);
        let copy = FilaInput {
            input_ids: input.input_ids.clone(),
            attention_mask: input.attention_mask.clone(),
            labels: input.labels.clone(),
            images: input.images.iter().map(|i| ImageInput { views: i.views.clone(), hires: i.hires.clone(), grid: i.grid }).collect(),
        };
        let (_, by_bench) = bench.step(&options, model.clone(), input, &comm).unwrap();

        let repo = std::env::var_os("FILA_REPO_DIR").map_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."), std::path::PathBuf::from);
        let loaded = LoadedConfig::load(&repo.join("configs/tiny/synth-stage2.toml"), &[]).unwrap();
        let step = TrainStep::of(&loaded.config, &bench.set);
        let batch = [Some(MicroBatch { input: copy, share: 1.0 })];
        let (_, by_trainer) = step.run(model, batch, adam.as_mut(), BENCH_LR, &comm, || false).unwrap();

        assert!(by_bench.finite && by_bench.loss > 0.0 && by_bench.grad_norm > 0.0, "{by_bench:?}");
        assert_eq!(by_bench, by_trainer);
    }
}
