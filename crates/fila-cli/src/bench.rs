//! `fila bench`: the time of one training step on random weights, for a speed baseline and for
//! `scripts/bench_cpu_compare.py`, which runs the PyTorch twin of the same presets.
//!
//! A step is what the trainer does per optimizer step with one micro-batch: forward, backward
//! and (with `--optimizer`) gradient collection, global-norm clipping and AdamW on the stage's
//! trainable set (`fila_train::trainable`).

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, TensorData};
use fila_model::clip_vit::ClipVisionConfig;
use fila_model::convnext::ConvNextConfig;
use fila_model::cvfm::TileGrid;
use fila_model::fila::{Fila, FilaConfig, FilaInput};
use fila_model::hybrid_encoder::{HybridConfig, ImageInput};
use fila_model::llama::LlamaConfig;
use fila_model::projector::ProjectorKind;
use fila_train::config::{OptimizerConfig, TrainableConfig};
use fila_train::dist::Comm;
use fila_train::optim::{accumulate_grads, AdamW, Grads};
use fila_train::precision::Precision;
use fila_train::shard::{FlatLayout, BUCKET_ELEMENTS};
use fila_train::trainable::apply_trainable;
use std::time::Instant;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BenchSize {
    /// The CPU demo size: 56-pixel tiles (4×4 cells), ViT 5×64, LLM 2×128.
    Tiny,
    /// A mid size: 112-pixel tiles (8×8 cells), ViT 8×256, ConvNeXt 48-384, LLM 4×512.
    Mid,
}

pub fn preset(size: BenchSize) -> FilaConfig {
    let (tile, vit_dim, vit_layers, conv_dims, llm_dim, llm_layers) = match size {
        BenchSize::Tiny => (56, 64, 5, vec![16, 32, 48, 64], 128, 2),
        BenchSize::Mid => (112, 256, 8, vec![48, 96, 192, 384], 512, 4),
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

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub size: BenchSize,
    pub batch: usize,
    pub steps: usize,
    pub precision: Precision,
    /// Trainable set of this training stage (1: CVFM + projector, 2: everything).
    pub stage: u8,
    /// Include the optimizer update (gradient collection, clipping, AdamW) in each step.
    pub optimizer: bool,
    /// Print one JSON object (per-step times, CPU time) instead of the text summary.
    pub json: bool,
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

/// Runs `steps` training steps (after one untimed warm-up step) on a stage-2 style batch (one
/// 2×2-canvas image per sample, 5 views, 32 text tokens) and prints the time per step. Each timed
/// step ends with a device sync, so asynchronous backends are timed to completion.
pub fn run<B: AutodiffBackend>(options: BenchOptions, device: &B::Device) -> anyhow::Result<()> {
    let BenchOptions { size, batch, steps, precision, stage, optimizer, json } = options;
    anyhow::ensure!(steps > 0 && batch > 0, "--steps and --batch must be at least 1");
    let config = preset(size);
    config.validate().expect("preset is valid");
    B::seed(device, 0);
    let (mut model, set) = apply_trainable(config.init::<B>(device), stage, &TrainableConfig::default())?;
    let g = config.vision.grid();
    let t = config.vision.image_size;
    let grid = TileGrid::tiled(2, 2);
    let visual = grid.num_views() * g * g;
    let text = 32;
    let len = visual + text;
    let normal = Distribution::Normal(0.0, 1.0);
    let make_input = || {
        let images = (0..batch)
            .map(|_| ImageInput {
                views: Tensor::random([grid.num_views(), 3, t, t], normal, device),
                hires: Some(Tensor::random([1, 3, 2 * g * 32, 2 * g * 32], normal, device)),
                grid,
            })
            .collect();
        let mut ids = Vec::with_capacity(batch * len);
        for _ in 0..batch {
            ids.extend(std::iter::repeat_n(config.image_token_id as i64, visual));
            ids.extend((0..text as i64).map(|i| 10 + i));
        }
        let labels: Vec<i64> = ids.iter().map(|&i| if i == config.image_token_id as i64 { -100 } else { i }).collect();
        FilaInput {
            input_ids: Tensor::from_data(TensorData::new(ids, [batch, len]), device),
            attention_mask: Tensor::ones([batch, len], device),
            labels: Some(Tensor::from_data(TensorData::new(labels, [batch, len]), device)),
            images,
        }
    };
    let counts = config.num_params();
    if !json {
        println!(
            "fila bench {size:?}: {:.1}M parameters ({:.1}M trainable in stage {stage}), batch {batch}, {len} tokens per sample ({visual} visual), {} ViT views of {t}px, {precision:?}",
            counts.total() as f64 / 1e6,
            set.num_elements() as f64 / 1e6,
            grid.num_views()
        );
    }
    // The trainer's stage-2 recipe (weight decay 0, clipping at 1); the values do not change the work.
    let adam_config = OptimizerConfig { lr: 2e-5, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0 };
    let comm = Comm::single();
    let inner_device = Tensor::<B, 1>::zeros([1], device).inner().device();
    let mut adam = optimizer.then(|| AdamW::new(adam_config, &set, FlatLayout::new(&set, 1, 0, BUCKET_ELEMENTS), &model, &inner_device));
    let mut step = |model: Fila<B>, input| -> anyhow::Result<Fila<B>> {
        let loss = precision.forward(|| model.forward(input, None)).loss.expect("labels given");
        let grads = loss.backward();
        let model = match adam.as_mut() {
            Some(adam) => {
                let mut collected: Grads<B::InnerBackend> = Grads::new();
                accumulate_grads(&model, &grads, &set, &mut collected);
                drop(grads);
                adam.add_gradients(&collected, &comm)?;
                adam.step(model, 2e-5, 1.0, &comm)?.0
            }
            None => model,
        };
        B::sync(device).expect("device sync");
        Ok(model)
    };
    model = step(model, make_input())?; // warm-up, not timed
    let mut times = Vec::with_capacity(steps);
    let cpu_start = cpu_times();
    let wall_start = Instant::now();
    for _ in 0..steps {
        let input = make_input();
        B::sync(device).expect("device sync");
        let start = Instant::now();
        model = step(model, input)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let wall = wall_start.elapsed().as_secs_f64();
    // Input generation is inside the CPU window but outside the step times; it is small.
    let cpu = cpu_start.zip(cpu_times()).map(|((u0, s0), (u1, s1))| (u1 - u0, s1 - s0));
    let mean = times.iter().sum::<f64>() / steps as f64;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[steps / 2];
    if json {
        let value = serde_json::json!({
            "size": format!("{size:?}").to_lowercase(),
            "batch": batch,
            "stage": stage,
            "optimizer": optimizer,
            "precision": format!("{precision:?}"),
            "step_s": times,
            "mean_s": mean,
            "median_s": median,
            "wall_s": wall,
            "user_s": cpu.map(|c| c.0),
            "system_s": cpu.map(|c| c.1),
            "trainable": set.num_elements(),
            "parameters": counts.total(),
        });
        println!("{value}");
    } else {
        let what = if optimizer { "forward+backward+AdamW" } else { "forward+backward" };
        println!("{what}: mean {:.1} ms/step, median {:.1} ms/step, {:.1} ms/sample over {steps} steps", mean * 1e3, median * 1e3, mean * 1e3 / batch as f64);
        if let Some((user, system)) = cpu {
            println!("CPU: user {user:.2} s, system {system:.2} s over {wall:.2} s wall (user/wall {:.2})", user / wall);
        }
    }
    Ok(())
}
