//! `--plan`: memory per device for the configured stage, batch and precision, computed from the
//! configs alone (no tensor is allocated).
//!
//! The plan is what stays for the run (weights, master values, AdamW moments) plus the larger of a
//! step's two transient phases: the forward and backward pass (one backward's gradients, the f32
//! gradient slice, the activations) or the update (the slice and the update's temporaries), plus
//! the allocator's and process's overhead. Activations: per transformer layer and token, the
//! tensors its backward pass keeps ([`layer_bytes`], trainable and frozen layers apart),
//! ConvNeXt blocks ~12 maps of their stage size, plus the loss's logits, their log-softmax and
//! gradient. With `train.activation_checkpointing` the LLM keeps one f32 hidden state per layer,
//! then one loss chunk or one layer's activations at a time ([`crate::recompute`]). Frozen parts
//! before the first trainable one record nothing (autodiff tracks no tensor there). The CPU
//! profile (`fila-train --profile-memory`, [`crate::alloc`]) checks it (tests/memory_plan.rs).

use crate::config::LoadedConfig;
use crate::trainable::apply_trainable;
use anyhow::Result;
use burn::backend::Flex;
use fila_model::clip_vit::ClipVisionConfig;
use fila_model::convnext::ConvNextConfig;
use fila_model::fila::FilaConfig;
use fila_model::llama::LlamaConfig;
use std::fmt::Write;

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes in GiB, or in MiB below 1 GiB (the tiny configs).
fn gib(bytes: f64) -> String {
    if bytes >= GIB {
        format!("{:>9.2} GiB", bytes / GIB)
    } else {
        format!("{:>9.1} MiB", bytes / (1u64 << 20) as f64)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Block {
    /// RMSNorm, grouped-query attention with RoPE, SwiGLU MLP.
    Llama,
    /// LayerNorm, attention, GELU MLP (CLIP's ViT).
    Clip,
}

/// Activation bytes one token keeps for the backward pass in one transformer layer (hidden size
/// `h`, key/value width `kv`, MLP width `i`), counted from what the layer's operations save (the
/// layer's input is the previous layer's output, counted there):
/// - a layer whose weights train: both norms' outputs and the second norm's input (the residual
///   stream after attention), q after RoPE, k, v and the attention output (the attention op
///   recomputes the scores, `fila_model::attention`), and the MLP's gate, up, activated gate and
///   product (Llama `5h + 2kv + 4i` f32 elements, measured; CLIP, with LayerNorm's saved
///   statistics and a GELU MLP, counted as `6h + 2kv + 3i`);
/// - a frozen layer that passes a gradient down: a product with a frozen weight keeps nothing of
///   its input, so the norms' outputs and the MLP product are not kept (Llama `4h + 2kv + 2i`).
///
/// Under `bf16_mixed` the products also keep bf16 copies of their inputs. Measured on the CPU with
/// the exact heap counter (docs/memory-plan.md): within 4 % per layer, trainable and frozen.
fn layer_bytes(h: usize, kv: usize, i: usize, block: Block, trains: bool, p: crate::precision::Precision) -> f64 {
    let (h, kv, i) = (h as f64, kv as f64, i as f64);
    let f32_elements = match (block, trains) {
        (Block::Llama, true) => 5.0 * h + 2.0 * kv + 4.0 * i,
        (Block::Llama, false) => 4.0 * h + 2.0 * kv + 2.0 * i,
        (Block::Clip, true) => 6.0 * h + 2.0 * kv + 3.0 * i,
        (Block::Clip, false) => 4.0 * h + 2.0 * kv + 2.0 * i,
    };
    // Inputs of the q/k/v, output, first MLP and last MLP products.
    let bf16_copies = if trains { 3.0 * h + i } else { 0.0 };
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

/// The process itself in the plan's overhead term: code, libraries, thread stacks and the data
/// loader (measured on the CPU: 30–70 MiB above the heap at small sizes, depending on the build).
pub const PROCESS_BYTES: f64 = (48u64 << 20) as f64;

/// One term of a plan: bytes per device and what they are.
#[derive(Debug, Clone)]
pub struct Term {
    pub name: &'static str,
    pub bytes: f64,
    pub note: String,
}

/// Memory per device for a configured run: what stays for the whole run, and the larger of the
/// two transient phases of a step (the forward and backward pass of a micro-batch, or the
/// optimizer's update), plus the allocator's and process's overhead.
#[derive(Debug, Clone)]
pub struct Plan {
    pub header: Vec<String>,
    /// Weights, master values (where they are a copy), optimizer moments.
    pub resident: Vec<Term>,
    /// The phase with the larger peak: its name and terms.
    pub phase: (&'static str, Vec<Term>),
    /// The other phase's total, for the printout.
    pub other_phase: (&'static str, f64),
    pub overhead: Term,
    /// Host memory of the optimizer when it is offloaded (`optimizer.offload = "cpu"`): its
    /// state and the gradient slice, not counted in [`Plan::total`].
    pub host: Vec<Term>,
}

impl Plan {
    /// Tensor bytes at the step's peak: the resident and peak-phase terms.
    pub fn tensors(&self) -> f64 {
        self.resident.iter().chain(&self.phase.1).map(|t| t.bytes).sum()
    }

    pub fn total(&self) -> f64 {
        self.tensors() + self.overhead.bytes
    }

    /// Host bytes of the offloaded optimizer (0 when it is not offloaded).
    pub fn host_total(&self) -> f64 {
        self.host.iter().map(|t| t.bytes).sum()
    }

    /// The plan as printed by `--plan`: every term, then the largest ones.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.header {
            let _ = writeln!(out, "{line}");
        }
        let term = |out: &mut String, t: &Term| {
            let _ = writeln!(out, "  {:<22}{}  ({})", t.name, gib(t.bytes), t.note);
        };
        let _ = writeln!(out, "resident for the whole run:");
        for t in self.resident.iter().filter(|t| t.bytes > 0.0) {
            term(&mut out, t);
        }
        let _ = writeln!(
            out,
            "at the step's peak, during the {} (the {} needs {} less):",
            self.phase.0,
            self.other_phase.0,
            gib(self.phase.1.iter().map(|t| t.bytes).sum::<f64>() - self.other_phase.1).trim()
        );
        for t in self.phase.1.iter().filter(|t| t.bytes > 0.0) {
            term(&mut out, t);
        }
        term(&mut out, &self.overhead);
        let _ = writeln!(out, "  {:<22}{}", "total", gib(self.total()));
        let mut largest: Vec<&Term> = self.resident.iter().chain(&self.phase.1).collect();
        largest.sort_by(|a, b| b.bytes.total_cmp(&a.bytes));
        let shares: Vec<String> = largest.iter().take(3).map(|t| format!("{} {:.0} %", t.name, 100.0 * t.bytes / self.total())).collect();
        let _ = writeln!(out, "largest terms: {}", shares.join(", "));
        if self.host_total() > 0.0 {
            let _ = writeln!(out, "host memory of the offloaded optimizer (optimizer.offload = \"cpu\"), besides the process:");
            for t in self.host.iter().filter(|t| t.bytes > 0.0) {
                term(&mut out, t);
            }
            let _ = writeln!(out, "  {:<22}{}", "host total", gib(self.host_total()));
        }
        out
    }
}

/// The plan as printable text, per rank of a run over `world` processes (one per GPU).
pub fn plan(loaded: &LoadedConfig, world: usize) -> Result<String> {
    Ok(plan_of(loaded, world)?.render())
}

/// The plan per rank of a run over `world` processes (one per GPU): weights, one backward's
/// gradients and activations are whole on every rank; the gradient sums, AdamW moments and f32
/// master values of the trainable parameters are sharded ([`crate::shard`]).
pub fn plan_of(loaded: &LoadedConfig, world: usize) -> Result<Plan> {
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
    let gpu = c.device != crate::backend::Device::Cpu;
    // A LoRA run: the language model is frozen and trains through its adapters, which keep
    // activations like a trainable layer's.
    let lora = c.lora.enabled();
    let trains = |component: &str| if lora && component == "llm" { false } else { trains(component) };
    let trains_activations = |component: &str| trains(component) || (lora && component == "llm");
    let adapters = if lora { fila_model::lora::adapter_elements(&arch.llm, &c.lora.spec()) } else { 0 };
    // QLoRA: the decoder layers' projection weights in NF4 (`lora.base_bits = 4`).
    let nf4 = c.lora.quantized().then(|| Nf4Plan::of(&arch.llm, p));
    let trainable: usize = parts.iter().filter(|(n, _)| trains(n)).map(|(_, k)| k).sum::<usize>() + adapters;
    let frozen = counts.total() - (trainable - adapters);
    let slice = trainable as f64 / world as f64;

    let activations = activations(loaded, &arch, &trains_activations);

    let this_slice = if world > 1 { ", this rank's slice" } else { "" };
    let dtype = |bytes: usize| if bytes == 2 { "bf16" } else { "f32" };
    // In f32 on one rank the master values are the model's own weights (the update writes them
    // back as views of the slice); otherwise they are a copy.
    // ZeRO-3: the trainable weights live in the master slices; the model holds them only while a
    // segment runs (crate::zero3).
    let zero3 = c.distributed.zero_stage == 3;
    let recomputes = c.train.activation_checkpointing;
    let master_apart = p.master_apart() || world > 1 || zero3;
    // Trainable elements per segment of the checkpointed pass: the embeddings side (vision,
    // projector, token embeddings), one decoder layer, the head.
    let (embeddings_side, one_layer, head_part) = {
        let l = &arch.llm;
        let embed = l.vocab_size * l.hidden_size;
        let head = if l.tie_word_embeddings { 0 } else { embed } + l.hidden_size;
        let layers = l.num_hidden_layers.max(1);
        let vision: usize = parts.iter().filter(|(n, _)| *n != "llm" && trains(n)).map(|(_, k)| k).sum();
        if trains("llm") {
            (vision + embed, (counts.llm - embed - head) / layers, head)
        } else {
            (vision, adapters / layers, 0)
        }
    };
    // Offloaded, the master slice, the moments and the gradient slice live in host memory and the
    // update runs there in place (the CPU's fused pass).
    let offload = c.optimizer.offload == crate::config::Offload::Cpu;
    let on_device = |bytes: f64| if offload { 0.0 } else { bytes };
    let host = if offload {
        vec![
            Term { name: "master slice", bytes: slice * 4.0, note: format!("f32 values of the trainable parameters{this_slice}") },
            Term { name: "optimizer state", bytes: slice * p.optimizer_bytes() as f64, note: format!("AdamW moments, f32{this_slice}") },
            Term { name: "gradient slice", bytes: slice * 4.0, note: "f32 sum over micro-batches and ranks, the pieces added as they arrive".into() },
        ]
    } else {
        Vec::new()
    };
    let nf4_elements = nf4.as_ref().map_or(0, |q| q.elements);
    let resident = vec![
        Term {
            name: "weights",
            bytes: ((counts.total() - nf4_elements + adapters - if zero3 { trainable } else { 0 }) * p.weight_bytes()) as f64,
            note: format!(
                "{}{}{}{}",
                dtype(p.weight_bytes()),
                if zero3 { ", the frozen ones (the trainable ones are in the master slices)" } else { "" },
                if lora { ", LoRA adapters included" } else { "" },
                if nf4.is_some() { ", the LLM's projections apart (NF4)" } else { "" }
            ),
        },
        Term {
            name: "NF4 weights",
            bytes: nf4.as_ref().map_or(0.0, |q| q.stored as f64),
            note: format!(
                "the LLM's {nf4_elements} projection weights: 4-bit codes, a double-quantised scale per 64 ({:.3} bits per value)",
                nf4.as_ref().map_or(0.0, |q| 8.0 * q.stored as f64 / q.elements.max(1) as f64)
            ),
        },
        Term {
            name: "master slice",
            bytes: on_device(if master_apart { slice * 4.0 } else { 0.0 }),
            note: format!("f32 values of the trainable parameters the optimizer owns{this_slice}"),
        },
        Term { name: "optimizer state", bytes: on_device(slice * p.optimizer_bytes() as f64), note: format!("AdamW moments, f32{this_slice}") },
    ];
    let bucket = (c.distributed.bucket_elements.min(trainable) * 4) as f64;
    let wb = p.weight_bytes() as f64;
    let (gathered, gathered_note) = match (zero3, recomputes) {
        (false, _) => (0.0, String::new()),
        (true, true) => (
            embeddings_side as f64 * wb + (2 * one_layer).max(one_layer + head_part) as f64 * (wb + 4.0),
            "the embeddings side's for the whole pass, two segments' (one running, the next one prefetched) with their f32 buckets".to_string(),
        ),
        (true, false) => (trainable as f64 * wb + bucket, "the whole model for the step (one graph without checkpointing) and one f32 bucket".to_string()),
    };
    // Under ZeRO-3 with checkpointing a segment's gradients leave as their buckets start: the
    // largest segment's are alive at once.
    let grad_elements = if zero3 && recomputes { embeddings_side.max(one_layer).max(head_part) } else { trainable };
    let backward = vec![
        Term { name: "gathered weights", bytes: gathered, note: gathered_note },
        Term {
            name: "gradients",
            bytes: (grad_elements * p.grad_bytes()) as f64,
            note: format!("{}, {}", if zero3 && recomputes { "the largest segment's" } else { "one backward's" }, dtype(p.grad_bytes())),
        },
        Term {
            name: "gradient slice",
            bytes: on_device(if c.batch.accumulation_steps > 1 { slice * 4.0 } else { 0.0 }),
            note: format!("f32 sum over micro-batches and ranks{this_slice}, made by the first micro-batch"),
        },
        activations,
        Term {
            name: "buckets in flight",
            bytes: if world > 1 && c.distributed.overlap {
                let buckets = trainable.div_ceil(c.distributed.bucket_elements.max(1)).min(crate::optim::IN_FLIGHT + 1);
                buckets as f64 * bucket * (1.0 + 1.0 / world as f64)
            } else {
                0.0
            },
            note: format!("f32 gradient buckets and their pieces: {} being reduce-scattered while the pass goes on, one being built", crate::optim::IN_FLIGHT),
        },
        Term {
            name: "de-quantised weights",
            bytes: nf4.as_ref().map_or(0.0, |q| q.buffer),
            note: format!("one decoder layer's projections in {} while it runs, plus one de-quantisation's temporaries", dtype(p.weight_bytes())),
        },
    ];
    // The update: the CPU's fused pass works in place; the tensor ops on a GPU make new moments,
    // values and two temporaries before the old ones are freed. Then the slice is written back
    // bucket by bucket.
    let optimizer = vec![
        Term { name: "gradient slice", bytes: on_device(slice * 4.0), note: "the step's sum".into() },
        Term {
            name: "update temporaries",
            bytes: on_device(if gpu { slice.min(crate::optim::UPDATE_CHUNK as f64) * 4.0 * 10.0 } else { 0.0 }),
            note: "GPU: one chunk's new moments and values, LR and decay factors and temporaries (the update runs in chunks, in place)".into(),
        },
        Term { name: "write-back bucket", bytes: bucket, note: "one f32 bucket while the slice is written into the weights".into() },
    ];
    let sum = |terms: &[Term]| terms.iter().map(|t| t.bytes).sum::<f64>();
    let (backward_bytes, optimizer_bytes) = (sum(&backward), sum(&optimizer));
    let (phase, other_phase) = if backward_bytes >= optimizer_bytes {
        (("forward and backward pass", backward), ("update", optimizer_bytes))
    } else {
        (("update", optimizer), ("forward and backward pass", backward_bytes))
    };
    // Besides the process (PROCESS_BYTES): on the CPU, glibc keeps 10–20 % of the transient bytes
    // in freed blocks at the peak (crate::alloc keeps freed memory for reuse; measured, more with
    // checkpointing's many sizes, docs/memory-plan.md); a GPU memory pool's rounding and the CUDA
    // context are estimated at 10 %.
    let fragmentation = if gpu { 0.10 } else { 0.15 };
    let overhead = Term {
        name: "allocator, process",
        bytes: PROCESS_BYTES + fragmentation * sum(&phase.1),
        note: format!("{}: 48 MiB and {:.0} % of the step's transient tensors", if gpu { "estimate" } else { "measured on the CPU" }, 100.0 * fragmentation),
    };

    let mut header = vec![format!(
        "memory plan: stage {} on {} ({:?}), micro-batch {} × accumulation {}, max_len {}",
        c.stage, c.device, p, c.batch.micro_batch_size, c.batch.accumulation_steps, loaded.data.max_len
    )];
    if let Some(n) = note {
        header.push(format!("note: {n}"));
    }
    header.push("parameters:".into());
    for (name, k) in parts {
        header.push(format!("  {name:<10} {k:>14} {}", if trains(name) { "trainable" } else { "frozen" }));
    }
    if lora {
        header.push(format!("  {:<10} {:>14} trainable (r {}, {} of 7 projections per layer)", "adapters", adapters, c.lora.r, c.lora.targets.len()));
    }
    header.push(format!("  {:<10} {:>14} ({} trainable, {} frozen)", "total", counts.total() + adapters, trainable, frozen));
    header.push(if world == 1 {
        "memory per device (one device):".into()
    } else {
        format!(
            "memory per rank ({world} ranks, one GPU each; {}gradient sums, optimizer state and master values sharded {world} ways{}):",
            if zero3 { "trainable weights, " } else { "" },
            if zero3 { ", ZeRO-3" } else { "" }
        )
    });
    Ok(Plan { header, resident, phase, other_phase, overhead, host })
}

/// The NF4 storage of a QLoRA run's language model: the seven projections of every decoder layer.
struct Nf4Plan {
    /// Weights stored as NF4.
    elements: usize,
    /// Their device bytes (packed codes, double-quantised block scales, [`fila_model::nf4::device_bytes_of`]).
    stored: usize,
    /// The de-quantisation buffer: under activation checkpointing (required) one decoder layer
    /// runs at a time, and its products keep their de-quantised weights (in the compute dtype:
    /// bf16 under `bf16_mixed`, the f32 result freed after the cast) until the layer's backward
    /// pass is done; plus, for the largest projection being de-quantised, its f32 result and the
    /// operation's temporaries.
    buffer: f64,
}

impl Nf4Plan {
    fn of(llm: &LlamaConfig, p: crate::precision::Precision) -> Self {
        let sizes: Vec<usize> = fila_model::lora::LLAMA_TARGETS.iter().filter_map(|t| fila_model::lora::target_dims(llm, t)).map(|(i, o)| i * o).collect();
        let layers = llm.num_hidden_layers;
        let per_layer: usize = sizes.iter().sum();
        let largest = sizes.iter().copied().max().unwrap_or(0);
        let stored = layers * sizes.iter().map(|&n| fila_model::nf4::device_bytes_of(n)).sum::<usize>();
        let transient = 4 * largest + fila_model::nf4::dequantize_transient_bytes(largest);
        Self { elements: layers * per_layer, stored, buffer: (per_layer * p.weight_bytes() + transient) as f64 }
    }
}

/// The activations one micro-batch keeps at the peak of its forward and backward pass.
fn activations(loaded: &LoadedConfig, arch: &FilaConfig, trains: &dyn Fn(&str) -> bool) -> Term {
    let c = &loaded.config;
    let p = c.precision;
    let recompute = c.train.activation_checkpointing;
    let data = &loaded.data;
    let b = c.batch.micro_batch_size as f64;
    let act_scale = p.activation_scale();
    let llm_trains = trains("llm");
    let llm_layer =
        layer_bytes(arch.llm.hidden_size, arch.llm.num_key_value_heads * arch.llm.head_dim, arch.llm.intermediate_size, Block::Llama, llm_trains, p);
    let vit_layer = layer_bytes(arch.vision.hidden_size, arch.vision.hidden_size, arch.vision.intermediate_size, Block::Clip, trains("vit"), p);
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
    let head_rows = if recompute { (crate::recompute::HEAD_ROWS as f64).min(b * s_text) } else { b * s_text };
    let head = 3.0 * head_rows * vocab * 4.0;
    // One layer's attention scores at a time, `[B, heads, T, T]` f32: the unfused attention's
    // probabilities in the forward pass, recomputed in the backward pass (measured on the CPU; a
    // fused GPU kernel keeps less).
    let scores = b * arch.llm.num_attention_heads as f64 * s_text * s_text * 4.0;
    let llm_act = scores
        + if recompute {
            // Each layer's input (the f32 residual stream), the last layer's output and the gradient
            // of the hidden state, plus one chunk of the loss or, later, one layer's activations while
            // it is recomputed in the backward pass (crate::recompute).
            (layers + 2.0) * b * s_text * hidden * 4.0 + head.max(b * s_text * llm_layer)
        } else {
            layers * b * s_text * llm_layer + head
        };
    let feature_layer = arch.hybrid.feature_layer(arch.vision.num_hidden_layers);
    let first_tracked = if trains("vit") { 0 } else { arch.hybrid.fusion_layers.first().copied().unwrap_or(feature_layer) };
    let vit_layers = feature_layer.saturating_sub(first_tracked) as f64;
    let vit_tokens = (1.0 + g * g) * b * views;
    let strides = arch.convnext.stage_strides();
    let stage_cells = |k: usize| (hires_side_w / strides[k] as f64) * (hires_side_h / strides[k] as f64) * b;
    // One ConvNeXt layer's saved activations, in bytes (12 values per pixel and channel).
    let conv_layer = |k: usize| 12.0 * stage_cells(k) * arch.convnext.hidden_sizes[k] as f64 * 2.0 * act_scale;
    let convnext = arch.hybrid.use_convnext;
    let encoder_trains = trains("vit") || trains("cvfm") || (convnext && trains("convnext"));
    let encoder_act = if recompute && !encoder_trains {
        0.0
    } else if recompute {
        // Kept through the pass (crate::recompute::vision): each ViT layer's f32 input, each
        // ConvNeXt piece's input where ConvNeXt trains (else the four stage maps the fusions
        // read). One layer is recomputed at a time, after the LLM's segments, so its activations
        // count against the LLM's rather than beside them.
        let vit_stored = feature_layer as f64 * vit_tokens * arch.vision.hidden_size as f64 * 4.0;
        let conv_stored: f64 = match (convnext, trains("convnext")) {
            (false, _) => 0.0,
            (true, true) => (0..4).map(|k| (arch.convnext.depths[k] + 1) as f64 * stage_cells(k) * arch.convnext.hidden_sizes[k] as f64 * 4.0).sum(),
            (true, false) => (0..4).map(|k| stage_cells(k) * arch.convnext.hidden_sizes[k] as f64 * 4.0).sum(),
        };
        let vit_one = if vit_layers > 0.0 { vit_tokens * vit_layer } else { 0.0 };
        let conv_one = if convnext && trains("convnext") { (0..4).map(conv_layer).fold(0.0, f64::max) } else { 0.0 };
        vit_stored + conv_stored + (vit_one.max(conv_one) - llm_act).max(0.0)
    } else {
        let conv_kept = if convnext && trains("convnext") { (0..4).map(|k| conv_layer(k) * arch.convnext.depths[k] as f64).sum() } else { 0.0 };
        vit_layers * vit_tokens * vit_layer + conv_kept
    };
    Term {
        name: "activations",
        bytes: llm_act + encoder_act,
        note: format!(
            "{views} views/image, ConvNeXt {hires_side_w}x{hires_side_h}, {vit_layers} tracked ViT layers, encoder and LLM layers {}",
            if recompute { "recomputed (train.activation_checkpointing)" } else { "kept" }
        ),
    }
}

/// The exact trainable element count on a built tiny model (used by tests to check `plan`).
pub fn trainable_elements_of(loaded: &LoadedConfig) -> Result<usize> {
    let base = loaded.source.parent().unwrap_or(std::path::Path::new("."));
    let (config, _) = loaded.config.model.resolve(base)?;
    let device = Default::default();
    let model = crate::lora::attach(config.init::<Flex>(&device), &loaded.config.lora, &device)?;
    let (_, set) = apply_trainable(model, loaded.config.stage, &loaded.config.trainable)?;
    Ok(set.num_elements())
}
