//! `--plan`: memory per device for the configured stage, batch and precision, computed from the
//! configs alone (no tensor is allocated).
//!
//! Activations are an estimate: per transformer layer and token, the tensors its backward pass
//! keeps ([`layer_bytes`]), ConvNeXt blocks ~12 maps of their stage size, plus the logits, their
//! log-softmax and gradient for every position. With `train.activation_checkpointing` the LLM keeps one f32 hidden state per
//! layer, one layer's activations and one chunk of logits ([`crate::recompute`]). Frozen parts
//! before the first trainable one record nothing (autodiff tracks no tensor there).

use crate::config::LoadedConfig;
use crate::trainable::apply_trainable;
use anyhow::{anyhow, Result};
use burn::backend::Flex;
use fila_model::clip_vit::ClipVisionConfig;
use fila_model::convnext::ConvNextConfig;
use fila_model::fila::FilaConfig;
use fila_model::llama::LlamaConfig;
use std::fmt::Write;

const GIB: f64 = (1u64 << 30) as f64;

fn gib(bytes: f64) -> String {
    format!("{:>9.2} GiB", bytes / GIB)
}

#[derive(Clone, Copy, PartialEq)]
enum Block {
    /// RMSNorm, grouped-query attention with RoPE, SwiGLU MLP.
    Llama,
    /// LayerNorm, attention, GELU MLP (CLIP's ViT).
    Clip,
}

/// Activation bytes one token keeps for the backward pass in one transformer layer (hidden size
/// `h`, key/value width `kv`, MLP width `i`), counted from what the layer's operations save: the
/// f32 residual stream into both norms and their outputs, q, k, v (after RoPE) and the attention
/// output (the attention op recomputes the scores, `fila_model::attention`), the output
/// projection's input, and the MLP's hidden activations (Llama: gate, up, SiLU(gate) and their
/// product plus the gate's sigmoid, 5·i; CLIP: fc1's output and GELU's, 3·i with the GELU
/// input). Under `bf16_mixed` the products also keep the bf16 copies of their inputs. On the CPU,
/// a 6-layer Llama (h 512) in f32 measured within a few percent of this (docs/memory-plan.md).
fn layer_bytes(h: usize, kv: usize, i: usize, block: Block, p: crate::precision::Precision) -> f64 {
    let (h, kv, i) = (h as f64, kv as f64, i as f64);
    let f32_elements = match block {
        Block::Llama => 9.0 * h + 4.0 * kv + 5.0 * i,
        Block::Clip => 7.0 * h + 2.0 * kv + 3.0 * i,
    };
    // Inputs of the q/k/v, output, first MLP and last MLP products.
    let bf16_copies = 3.0 * h + i;
    4.0 * f32_elements + if p.weight_bytes() == 2 { 2.0 * bf16_copies } else { 0.0 }
}

/// The architecture for the plan: the configured one, or the reference components (CLIP ViT-L/14
/// 336, ConvNeXt-L, Llama-3-8B) where a component folder is not downloaded yet.
pub fn plan_architecture(loaded: &LoadedConfig) -> (FilaConfig, Option<String>) {
    let base = loaded.source.parent().unwrap_or(std::path::Path::new("."));
    match loaded.config.model.resolve(base) {
        Ok((config, _)) => (config, None),
        Err(e) => {
            let config = FilaConfig {
                vision: ClipVisionConfig::vit_large_patch14_336(),
                convnext: ConvNextConfig::large(),
                hybrid: loaded.config.model.hybrid_config(),
                projector: loaded.config.model.projector_kind(),
                llm: LlamaConfig::llama3_8b(),
                image_token_id: loaded.config.model.image_token_id.unwrap_or(128_256 - 1),
            };
            (config, Some(format!("the configured model could not be read ({e}); planning for the reference components")))
        }
    }
}

/// The plan as printable text, per rank of a run over `world` processes (one per GPU): weights,
/// one backward's gradients and activations are whole on every rank; the gradient sums, AdamW
/// moments and f32 master values of the trainable parameters are sharded ([`crate::shard`]).
pub fn plan(loaded: &LoadedConfig, world: usize) -> Result<String> {
    let world = world.max(1);
    let c = &loaded.config;
    let (arch, note) = plan_architecture(loaded);
    let counts = arch.num_params();
    // Which components train, decided per component from the config's module names (the trainable
    // set itself needs the allocated model).
    let modules = crate::trainable::stage_modules(c.stage, &c.trainable);
    let trains = |component: &str| modules.iter().any(|m| crate::trainable::trains_part_of(m, component));
    let parts = [("vit", counts.vit), ("convnext", counts.convnext), ("cvfm", counts.cvfm), ("projector", counts.projector), ("llm", counts.llm)];
    let p = c.precision;
    let trainable: usize = parts.iter().filter(|(n, _)| trains(n)).map(|(_, k)| k).sum();
    let frozen = counts.total() - trainable;
    let weights = (counts.total() * p.weight_bytes()) as f64;
    // One backward's gradients (the weights' dtype), reduce-scattered into each rank's f32 slice.
    let grads = (trainable * p.grad_bytes()) as f64;
    let grad_slice = (trainable * 4) as f64 / world as f64;
    let optimizer = (trainable * p.optimizer_bytes()) as f64 / world as f64;
    // The optimizer's f32 master slice (every rank also holds the whole model in `weights`).
    let master = (trainable * 4) as f64 / world as f64;

    // Activation estimate for one micro-batch.
    let data = &loaded.data;
    let b = c.batch.micro_batch_size as f64;
    let act_scale = p.activation_scale();
    let llm_layer = layer_bytes(arch.llm.hidden_size, arch.llm.num_key_value_heads * arch.llm.head_dim, arch.llm.intermediate_size, Block::Llama, p);
    let vit_layer = layer_bytes(arch.vision.hidden_size, arch.vision.hidden_size, arch.vision.intermediate_size, Block::Clip, p);
    let g = (arch.vision.image_size / arch.vision.patch_size) as f64;
    let (views, hires_side_w, hires_side_h) = match c.stage {
        1 => (1.0, data.geometry.square_hires_size as f64, data.geometry.square_hires_size as f64),
        _ => {
            let tile_hires = data.geometry.tile_size as f64 * data.geometry.hires_factor[0] as f64 / data.geometry.hires_factor[1] as f64;
            let most = data.geometry.canvases.iter().max_by_key(|cv| cv[0] * cv[1]).copied().unwrap_or([1, 1]);
            (1.0 + (most[0] * most[1]) as f64, most[0] as f64 * tile_hires, most[1] as f64 * tile_hires)
        }
    };
    let s_text = data.max_len as f64;
    let (layers, hidden, vocab) = (arch.llm.num_hidden_layers as f64, arch.llm.hidden_size as f64, arch.llm.vocab_size as f64);
    // The loss: logits, their log-softmax and gradient in f32 for every scored position (at most
    // all b·s of them), or for one chunk of positions at a time under checkpointing.
    let recompute = c.train.activation_checkpointing;
    let head_rows = if recompute { (crate::recompute::HEAD_ROWS as f64).min(b * s_text) } else { b * s_text };
    let head = 3.0 * head_rows * vocab * 4.0;
    let llm_act = if recompute {
        // Each layer's input (the f32 residual stream), plus one layer's activations while it is
        // recomputed in the backward pass (crate::recompute).
        layers * b * s_text * hidden * 4.0 + b * s_text * llm_layer + head
    } else {
        layers * b * s_text * llm_layer + head
    };
    let feature_layer = arch.hybrid.feature_layer(arch.vision.num_hidden_layers);
    let first_tracked = if trains("vit") { 0 } else { arch.hybrid.fusion_layers.first().copied().unwrap_or(feature_layer) };
    let vit_layers = feature_layer.saturating_sub(first_tracked) as f64;
    let vit_act = vit_layers * (1.0 + g * g) * b * views * vit_layer;
    let convnext_act = if trains("convnext") && arch.hybrid.use_convnext {
        let strides = arch.convnext.stage_strides();
        (0..4)
            .map(|k| {
                let cells = (hires_side_w / strides[k] as f64) * (hires_side_h / strides[k] as f64);
                12.0 * cells * arch.convnext.hidden_sizes[k] as f64 * arch.convnext.depths[k] as f64 * b
            })
            .sum::<f64>()
            * 2.0 // bytes per element of an all-16-bit model, scaled like the other activations
            * act_scale
    } else {
        0.0
    };
    let activations = llm_act + vit_act + convnext_act;
    let total = weights + grads + grad_slice + optimizer + master + activations;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "memory plan: stage {} on {} ({:?}), micro-batch {} × accumulation {}, max_len {}",
        c.stage, c.device, p, c.batch.micro_batch_size, c.batch.accumulation_steps, data.max_len
    );
    if let Some(n) = note {
        let _ = writeln!(out, "note: {n}");
    }
    let _ = writeln!(out, "parameters:");
    for (name, k) in parts {
        let _ = writeln!(out, "  {name:<10} {k:>14} {}", if trains(name) { "trainable" } else { "frozen" });
    }
    let _ = writeln!(out, "  {:<10} {:>14} ({} trainable, {} frozen)", "total", counts.total(), trainable, frozen);
    if world == 1 {
        let _ = writeln!(out, "memory per device (one device):");
    } else {
        let _ = writeln!(out, "memory per rank ({world} ranks, one GPU each; gradient sums, optimizer state and master values sharded {world} ways):");
    }
    let _ = writeln!(out, "  weights           {}  ({})", gib(weights), if p.weight_bytes() == 2 { "bf16" } else { "f32" });
    let _ = writeln!(out, "  gradients         {}  (one backward's, {})", gib(grads), if p.grad_bytes() == 2 { "bf16" } else { "f32" });
    let _ =
        writeln!(out, "  gradient slice    {}  (f32 sum over micro-batches and ranks{})", gib(grad_slice), if world > 1 { ", this rank's slice" } else { "" });
    let _ = writeln!(out, "  optimizer state   {}  (AdamW moments, f32{})", gib(optimizer), if world > 1 { ", this rank's slice" } else { "" });
    let _ = writeln!(out, "  master slice      {}  (f32 values of the trainable parameters the optimizer owns)", gib(master));
    let _ = writeln!(
        out,
        "  activations       {}  (estimate; {} views/image, ConvNeXt {}x{}, {} tracked ViT layers, LLM layers {})",
        gib(activations),
        views,
        hires_side_w,
        hires_side_h,
        vit_layers,
        if recompute { "recomputed (train.activation_checkpointing)" } else { "kept" }
    );
    let _ = writeln!(out, "  total             {}", gib(total));
    Ok(out)
}

/// The exact trainable element count on a built tiny model (used by tests to check `plan`).
pub fn trainable_elements_of(loaded: &LoadedConfig) -> Result<usize> {
    let base = loaded.source.parent().unwrap_or(std::path::Path::new("."));
    let (config, _) = loaded.config.model.resolve(base).map_err(|e| anyhow!("{e}"))?;
    let model = config.init::<Flex>(&Default::default());
    let (_, set) = apply_trainable(model, loaded.config.stage, &loaded.config.trainable)?;
    Ok(set.num_elements())
}
