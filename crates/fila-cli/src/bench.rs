//! `fila bench`: forward+backward time per sample on random weights, for a speed baseline.

use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use fila_model::clip_vit::ClipVisionConfig;
use fila_model::convnext::ConvNextConfig;
use fila_model::cvfm::TileGrid;
use fila_model::fila::{FilaConfig, FilaInput};
use fila_model::hybrid_encoder::{HybridConfig, ImageInput};
use fila_model::llama::LlamaConfig;
use fila_model::projector::ProjectorKind;
use fila_train::precision::Precision;
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

/// Runs `steps` forward+backward passes on a stage-2 style batch (one 2×2-canvas image per sample,
/// 5 views, 32 text tokens) under `precision` and prints the mean time per sample. Each timed
/// step ends with a device sync, so asynchronous backends are timed to completion.
pub fn run<B: burn::tensor::backend::AutodiffBackend>(size: BenchSize, batch: usize, steps: usize, precision: Precision, device: &B::Device) {
    let config = preset(size);
    config.validate().expect("preset is valid");
    let model = config.init::<B>(device);
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
    println!(
        "fila bench {size:?}: {:.1}M parameters, batch {batch}, {len} tokens per sample ({visual} visual), {} ViT views of {t}px, {precision:?}",
        counts.total() as f64 / 1e6,
        grid.num_views()
    );
    let step = |input| {
        let loss = precision.forward(|| model.forward(input, None)).loss.unwrap();
        let grads = loss.backward();
        drop(grads);
        B::sync(device).expect("device sync");
    };
    // One warm-up step, not timed.
    step(make_input());
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let input = make_input();
        B::sync(device).expect("device sync");
        let start = Instant::now();
        step(input);
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = times.iter().sum::<f64>() / steps as f64;
    println!(
        "forward+backward: mean {:.1} ms/step, median {:.1} ms/step, {:.1} ms/sample over {steps} steps",
        mean * 1e3,
        times[steps / 2] * 1e3,
        mean * 1e3 / batch as f64
    );
}
