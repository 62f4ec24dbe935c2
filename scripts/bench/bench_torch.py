#!/usr/bin/env python3
"""The PyTorch twin of `fila bench` (crates/fila-cli/src/bench.rs): the same model, batch and step.

Model: transformers' CLIPVisionModel and LlamaForCausalLM built from configs at random init (SDPA
attention), and a ConvNeXt, CVFM and projector written here the way crates/fila-model defines
them (docs/model.md). Sizes: tiny and mid (the CPU demo presets) and real (CLIP ViT-L/14-336,
ConvNeXt-L, Llama-3-8B; FILA's published architecture, no download).

Batch: `canvas2x2` gives every sample one 2x2 canvas (global view + 4 tiles for the ViT, the
canvas x 32/14 for the ConvNeXt); `recipe` is the stage's: stage 1 one view at micro-batch 16,
stage 2 FILA's five canvases in turn at micro-batch 1. Each sample is its visual tokens, then the
text tokens (all scored), right-padded to the longest sample.

Step: forward and backward with the loss on the scored positions only (the LM head projects
those rows, as ours does), activation checkpointing when set: the LLM decoder layers through
transformers' gradient checkpointing (non-reentrant: each layer's forward again in the backward),
and the encoder's pieces as fila_train::recompute cuts them (each ConvNeXt stem, downsampling and
block, each ViT layer with its fusion) through torch.utils.checkpoint, non-reentrant,
and with --optimizer AdamW over the stage's trainable set after global-norm clipping at 1. With
--optimizer-world W (default 8 for real stage 2, like ours) AdamW covers whole parameters in order
up to 1/W of the trainable elements: one rank's update work, without collectives.

Precision: `f32`, or on CUDA `bf16_mixed` as fila-train's policy: bf16 autocast, weights read by
products (rank >= 2 `.weight`, no embedding) stored in bf16, the optimizer's f32 master values.

Printed: per-step time, tokens/s, samples/s, FLOPs and MFU (same FLOP count as ours,
`step_flops` below = crates/fila-cli/src/flops.rs), peak memory (CUDA: torch's allocator peak and
the device's total - free sampled every 2 ms like ours; CPU: peak RSS during the timed steps).

    python3 scripts/bench/bench_torch.py --size tiny --stage 2 --optimizer
    python3 scripts/bench/bench_torch.py --size real --stage 1 --device cuda --optimizer --json

Needs `pip install torch transformers`. scripts/bench/bench_cpu_compare.py and scripts/gpu/gpu_bench.sh
import or run it next to `fila bench`.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time

# PyTorch runs at its defaults (threads, OpenMP wait policy): as its users run it.

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

# FILA's stage-2 canvases, [columns, rows] of tiles (configs/stage2.toml); sample n gets n mod 5.
STAGE2_CANVASES = [(2, 2), (1, 2), (2, 1), (1, 3), (3, 1)]
H200_BF16_TFLOPS = 989.0


def preset(size):
    """The numbers of `preset()` in crates/fila-cli/src/bench.rs."""
    if size == "real":
        return dict(
            tile=336,
            vit_dim=1024,
            vit_ffn=4096,
            vit_layers=24,
            vit_heads=16,
            conv_dims=[192, 384, 768, 1536],
            depths=[3, 3, 27, 3],
            fusion_layers=[2, 6, 12, 20],
            feature_layer=23,  # select_layer = -2
            llm_dim=4096,
            llm_ffn=14336,
            llm_layers=32,
            llm_heads=32,
            llm_kv_heads=8,
            head_dim=128,
            vocab=128256,
            max_positions=8192,
            image_token=128002,
        )
    tile, vit_dim, vit_layers, conv_dims, llm_dim, llm_layers = {
        "tiny": (56, 64, 5, [16, 32, 48, 64], 128, 2),
        "mid": (112, 256, 8, [48, 96, 192, 384], 512, 4),
    }[size]
    return dict(
        tile=tile,
        vit_dim=vit_dim,
        vit_ffn=4 * vit_dim,
        vit_layers=vit_layers,
        vit_heads=vit_dim // 32,
        conv_dims=conv_dims,
        depths=[1, 1, 2, 1],
        fusion_layers=[k * (vit_layers - 1) // 4 for k in range(1, 5)],
        feature_layer=vit_layers - 1,  # select_layer = -2
        llm_dim=llm_dim,
        llm_ffn=llm_dim * 8 // 3,
        llm_layers=llm_layers,
        llm_heads=llm_dim // 32,
        llm_kv_heads=llm_dim // 64,
        head_dim=32,
        vocab=1024,
        max_positions=4096,
        image_token=1000,
    )


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm (timm's LayerNorm2d)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNextBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 1e-6))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(F.gelu(self.pwconv1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNext(nn.Module):
    """Stem (4x4 patchify + LN), stages 2-4 open with LN + 2x2 stride-2 conv; returns the 4 stage maps."""

    def __init__(self, dims, depths):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.ModuleList()
        for i, (c, depth) in enumerate(zip(dims, depths)):
            down = [] if i == 0 else [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], c, 2, stride=2)]
            self.stages.append(nn.Sequential(*down, *[ConvNextBlock(c) for _ in range(depth)]))

    checkpointed = False

    def piece(self, module, x):
        return checkpoint(module, x, use_reentrant=False) if self.checkpointed else module(x)

    def forward(self, x):
        x = self.piece(self.stem, x)
        maps = []
        for stage in self.stages:
            for i, module in enumerate(stage):
                if isinstance(module, nn.Conv2d):
                    continue  # runs with the LayerNorm before it: one downsampling piece
                if isinstance(module, LayerNorm2d):
                    down = nn.Sequential(module, stage[i + 1])
                    x = self.piece(down, x)
                else:
                    x = self.piece(module, x)
            maps.append(x)
        return maps


class Cvfm(nn.Module):
    """h' = h + W_out GELU(W_in [LN(h); LN(c)]) on the patch tokens; W_out starts at zero."""

    def __init__(self, d, c, ratio):
        super().__init__()
        self.align = nn.Conv2d(c, c, ratio, stride=ratio)
        self.norm_vit = nn.LayerNorm(d, eps=1e-5)
        self.norm_conv = nn.LayerNorm(c, eps=1e-5)
        self.fc_in = nn.Linear(d + c, d)
        self.fc_out = nn.Linear(d, d)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def view_features(self, stage_map, grid, g):
        """[1, C, rows*g*r, cols*g*r] -> [views, g*g, C], global view first (an untiled image: the map itself)."""
        rows, cols, tiled = grid
        aligned = self.align(stage_map)
        views = [aligned if (rows, cols) == (1, 1) else F.adaptive_avg_pool2d(aligned, g)]
        if tiled:
            views += [aligned[:, :, i * g : (i + 1) * g, j * g : (j + 1) * g] for i in range(rows) for j in range(cols)]
        return torch.cat(views, 0).flatten(2).transpose(1, 2)

    def forward(self, h, conv):
        cls, patches = h[:, :1], h[:, 1:]
        joined = torch.cat([self.norm_vit(patches), self.norm_conv(conv)], -1)
        return torch.cat([cls, patches + self.fc_out(F.gelu(self.fc_in(joined)))], 1)


def num_views(grid):
    rows, cols, tiled = grid
    return 1 + (rows * cols if tiled else 0)


class FilaTwin(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p
        d = p["vit_dim"]
        self.vit = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=d,
                intermediate_size=p["vit_ffn"],
                num_hidden_layers=p["vit_layers"],
                num_attention_heads=p["vit_heads"],
                image_size=p["tile"],
                patch_size=14,
                hidden_act="quick_gelu",
                attn_implementation="sdpa",
            )
        )
        self.convnext = ConvNext(p["conv_dims"], p["depths"])
        self.cvfm = nn.ModuleList([Cvfm(d, c, 2 ** (3 - k)) for k, c in enumerate(p["conv_dims"])])
        dl = p["llm_dim"]
        self.projector = nn.Sequential(nn.Linear(d, dl), nn.GELU(), nn.Linear(dl, dl))
        self.llm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=p["vocab"],
                hidden_size=dl,
                intermediate_size=p["llm_ffn"],
                num_hidden_layers=p["llm_layers"],
                num_attention_heads=p["llm_heads"],
                num_key_value_heads=p["llm_kv_heads"],
                head_dim=p["head_dim"],
                max_position_embeddings=p["max_positions"],
                rms_norm_eps=1e-5,
                rope_theta=500000.0,
                tie_word_embeddings=False,
                use_cache=False,
                attn_implementation="sdpa",
            )
        )

    def encode(self, views, hires, grids):
        """views: [sum V, 3, t, t]; hires: one [1, 3, H, W] per image -> [sum V*g*g, D] feature-layer patch tokens."""
        g = self.p["tile"] // 14
        # ConvNeXt batched when every image has the same size, as ours.
        if len(hires) > 1 and all(x.shape == hires[0].shape for x in hires):
            stages = self.convnext(torch.cat(hires, 0))
            maps = [[s[i : i + 1] for s in stages] for i in range(len(hires))]
        else:
            maps = [self.convnext(x) for x in hires]
        vit = self.vit.vision_model if hasattr(self.vit, "vision_model") else self.vit
        h = vit.pre_layrnorm(vit.embeddings(views))

        def unit(index, layer, h):
            h = layer(h, None)
            if isinstance(h, tuple):
                h = h[0]
            if index + 1 in self.p["fusion_layers"]:
                k = self.p["fusion_layers"].index(index + 1)
                conv = [self.cvfm[k].view_features(m[k], grid, g) for m, grid in zip(maps, grids)]
                h = self.cvfm[k](h, torch.cat(conv, 0))
            return h

        for index, layer in enumerate(vit.encoder.layers[: self.p["feature_layer"]]):
            if self.convnext.checkpointed:
                h = checkpoint(unit, index, layer, h, use_reentrant=False)
            else:
                h = unit(index, layer, h)
        return h[:, 1:].reshape(-1, h.shape[-1])

    def forward(self, views, hires, grids, ids, mask, labels):
        """Mean cross-entropy over the scored positions (position i predicts labels[i + 1])."""
        visual = self.projector(self.encode(views, hires, grids))
        embeds = self.llm.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == self.p["image_token"]).unsqueeze(-1), visual.to(embeds.dtype))
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        scored = targets != -100
        logits = self.llm.lm_head(hidden[:, :-1][scored])
        return F.cross_entropy(logits.float(), targets[scored])


def grids_of(o, step):
    """The images of step `step`'s samples: (rows, cols, tiled) each; = BenchOptions::grids."""
    out = []
    for i in range(o.batch):
        if o.batch_shape == "canvas2x2":
            out.append((2, 2, True))
        elif o.stage == 1:
            out.append((1, 1, False))
        else:
            cols, rows = STAGE2_CANVASES[(step * o.batch + i) % len(STAGE2_CANVASES)]
            out.append((rows, cols, True))
    return out


def make_batch(p, grids, text, device):
    """Visual tokens then `text` scored text tokens per sample, right-padded: (views, hires, ids, mask, labels, tokens)."""
    g, t = p["tile"] // 14, p["tile"]
    lengths = [num_views(grid) * g * g + text for grid in grids]
    length = max(lengths)
    words = [10 + i % 900 for i in range(text)]
    ids, labels, mask = [], [], []
    for grid, n in zip(grids, lengths):
        visual = num_views(grid) * g * g
        ids.append([p["image_token"]] * visual + words + [0] * (length - n))
        labels.append([-100] * visual + words + [-100] * (length - n))
        mask.append([1] * n + [0] * (length - n))
    views = torch.randn(sum(num_views(grid) for grid in grids), 3, t, t, device=device)
    hires = [torch.randn(1, 3, rows * g * 32, cols * g * 32, device=device) for rows, cols, _ in grids]
    as_tensor = lambda x: torch.tensor(x, device=device)  # noqa: E731
    return views, hires, as_tensor(ids), as_tensor(mask), as_tensor(labels), sum(lengths), length


def trains_of(stage):
    """Which components train: stage 1 CVFM + projector, stage 2 everything (fila_train::trainable)."""
    return dict(vit=stage == 2, convnext=stage == 2, cvfm=True, projector=True, llm=stage == 2)


def step_flops(p, grids, seq_len, scored, trains, recompute):
    """Matrix-product and convolution FLOPs of one step by the rules of crates/fila-cli/src/flops.rs:
    returns (forward, backward, recompute)."""
    fwd = bwd = 0

    def weight_op(f, weight_grad, input_grad):
        nonlocal fwd, bwd
        fwd += f
        bwd += f * (int(weight_grad) + int(input_grad))

    def activation_op(f, grad):
        nonlocal fwd, bwd
        fwd += f
        bwd += 2 * f * int(grad)

    d, ffn, g = p["vit_dim"], p["vit_ffn"], p["tile"] // 14
    views = sum(num_views(grid) for grid in grids)
    s = g * g + 1
    dims, strides = p["conv_dims"], [4, 8, 16, 32]
    again = 0
    before = fwd
    for rows, cols, _ in grids:
        h, w = rows * g * 32, cols * g * 32
        cells = lambda stride: (h // stride) * (w // stride)  # noqa: E731
        weight_op(2 * cells(4) * 3 * 16 * dims[0], trains["convnext"], False)
        for k, depth in enumerate(p["depths"]):
            n, c = cells(strides[k]), dims[k]
            if k > 0:
                weight_op(2 * n * 4 * dims[k - 1] * c, trains["convnext"], trains["convnext"])
            for _ in range(depth):
                weight_op(2 * n * c * 49, trains["convnext"], trains["convnext"])
                weight_op(2 * n * c * 4 * c, trains["convnext"], trains["convnext"])
                weight_op(2 * n * 4 * c * c, trains["convnext"], trains["convnext"])
    if recompute and trains["convnext"]:
        again += fwd - before
    weight_op(2 * views * g * g * 3 * 14 * 14 * d, trains["vit"], False)
    if recompute and trains["vit"]:
        again += 2 * views * g * g * 3 * 14 * 14 * d
    tracked = trains["vit"]
    for layer in range(1, p["feature_layer"] + 1):
        before = fwd
        weight_op(2 * views * s * d * 3 * d, trains["vit"], tracked)
        activation_op(2 * views * s * s * d, tracked)
        activation_op(2 * views * s * s * d, tracked)
        weight_op(2 * views * s * d * d, trains["vit"], tracked)
        weight_op(2 * views * s * d * ffn, trains["vit"], tracked)
        weight_op(2 * views * s * ffn * d, trains["vit"], tracked)
        if layer in p["fusion_layers"]:
            k = p["fusion_layers"].index(layer)
            c, ratio = dims[k], 2 ** (3 - k)
            for rows, cols, _ in grids:
                weight_op(2 * rows * g * cols * g * ratio * ratio * c * c, trains["cvfm"], trains["convnext"])
            fused_in = tracked or trains["cvfm"] or trains["convnext"]
            weight_op(2 * views * g * g * (d + c) * d, trains["cvfm"], fused_in)
            weight_op(2 * views * g * g * d * d, trains["cvfm"], fused_in)
            tracked = fused_in
        if recompute and tracked:
            again += fwd - before
    visual, dl = views * g * g, p["llm_dim"]
    for i in range(2):
        weight_op(2 * visual * (d if i == 0 else dl) * dl, trains["projector"], tracked)
        tracked = tracked or trains["projector"]
    tracked = tracked or trains["llm"]
    rows, t = len(grids) * seq_len, seq_len
    q, kv, inter = p["llm_heads"] * p["head_dim"], p["llm_kv_heads"] * p["head_dim"], p["llm_ffn"]
    before = fwd
    for _ in range(p["llm_layers"]):
        weight_op(2 * rows * dl * q, trains["llm"], tracked)
        weight_op(2 * 2 * rows * dl * kv, trains["llm"], tracked)
        activation_op(2 * len(grids) * t * t * q, tracked)
        activation_op(2 * len(grids) * t * t * q, tracked)
        weight_op(2 * rows * q * dl, trains["llm"], tracked)
        weight_op(2 * 2 * rows * dl * inter, trains["llm"], tracked)
        weight_op(2 * rows * inter * dl, trains["llm"], tracked)
    again += fwd - before if recompute else 0
    weight_op(2 * scored * dl * p["vocab"], trains["llm"], tracked)
    return fwd, bwd, again


def store_product_weights_bf16(model):
    """fila-train's bf16_mixed storage: weights read by products (rank >= 2 `.weight`, not an embedding) in bf16."""
    for name, param in model.named_parameters():
        if param.dim() >= 2 and name.endswith(".weight") and "embed" not in name:
            param.data = param.data.to(torch.bfloat16)


def optimizer_slice(params, world):
    """Whole parameters in order up to 1/world of the elements (= optimizer_slice in bench.rs)."""
    if world <= 1:
        return list(params)
    target = -(-sum(q.numel() for q in params) // world)
    out, taken = [], 0
    for q in params:
        if taken >= target:
            break
        out.append(q)
        taken += q.numel()
    return out


class PeakMemory:
    """Peak memory over the timed steps: CUDA: torch's allocator peak and the device's total - free
    sampled every 2 ms (ours reads the latter); CPU: peak RSS (VmHWM) after resetting it."""

    def __init__(self, device):
        self.device = device
        self.peak = 0
        self.stop = threading.Event()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.reset = True
            except OSError:
                self.reset = False

    def _sample(self):
        while not self.stop.is_set():
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak, total - free)
            time.sleep(0.002)

    def finish(self):
        if self.device.type == "cuda":
            self.stop.set()
            self.thread.join()
            return dict(
                peak_memory_bytes=self.peak,
                peak_memory_source="device memory in use during the timed steps (total - free every 2 ms, CUDA context included)",
                torch_max_allocated_bytes=torch.cuda.max_memory_allocated(self.device),
                torch_max_reserved_bytes=torch.cuda.max_memory_reserved(self.device),
            )
        kb = None
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    kb = int(line.split()[1])
        except OSError:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        when = "during the timed steps" if self.reset else "since its start"
        return dict(peak_memory_bytes=kb * 1024 if kb else None, peak_memory_source=f"peak RSS of the process {when} (VmHWM)")


def options(argv=None, **overrides):
    """The flags of `fila bench` with its defaults (BenchOptions::from_args); `overrides` set fields directly."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "mid", "real"])
    ap.add_argument("--stage", type=int, default=2, choices=[1, 2])
    ap.add_argument("--batch-shape", choices=["canvas2x2", "recipe"])
    ap.add_argument("--batch", type=int)
    ap.add_argument("--text-tokens", type=int)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", choices=["f32", "bf16_mixed"])
    ap.add_argument("--activation-checkpointing", choices=["true", "false"])
    ap.add_argument("--optimizer", action="store_true")
    ap.add_argument("--optimizer-world", type=int)
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", action="store_true")
    o = ap.parse_args(argv if argv is not None else [])
    for k, v in overrides.items():
        setattr(o, k, v)
    real = o.size == "real"
    o.batch_shape = o.batch_shape or ("recipe" if real else "canvas2x2")
    recipe = o.batch_shape == "recipe"
    o.batch = o.batch or (16 if recipe and o.stage == 1 else 1)
    o.text_tokens = o.text_tokens or ((64 if o.stage == 1 else 512) if real else 32)
    o.warmup = o.warmup if o.warmup is not None else (len(STAGE2_CANVASES) if recipe and o.stage == 2 else 1)
    o.precision = o.precision or ("bf16_mixed" if real else "f32")
    ac = o.activation_checkpointing
    o.activation_checkpointing = real if ac is None else ac in (True, "true")
    o.optimizer_world = o.optimizer_world or (8 if real and o.stage == 2 else 1)
    o.device = torch.device(o.device)
    if o.peak_tflops is None and o.device.type == "cuda":
        o.peak_tflops = H200_BF16_TFLOPS
    if o.precision == "bf16_mixed" and o.device.type != "cuda":
        raise SystemExit("bf16_mixed is for CUDA devices (as in fila-train); on cpu use f32")
    return o


class TorchSide:
    """The twin model, its optimizer and a step counter; `warmup` untimed steps at construction."""

    def __init__(self, o):
        self.built = time.perf_counter()
        torch.manual_seed(0)
        self.o = o
        self.p = preset(o.size)
        self.trains = trains_of(o.stage)
        with torch.device(o.device):
            self.model = FilaTwin(self.p)
        self.model.train()
        prefixes = ("cvfm.", "projector.") if o.stage == 1 else ("",)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name.startswith(prefixes))
        self.bf16 = o.precision == "bf16_mixed"
        if self.bf16:
            store_product_weights_bf16(self.model)
        if o.activation_checkpointing:
            # Each decoder layer's forward again in the backward pass (non-reentrant), as fila_train::recompute.
            llm, kwargs = self.model.llm, {"use_reentrant": False}
            if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            # The encoder's pieces likewise (ConvNext.checkpointed also switches the ViT layers).
            self.model.convnext.checkpointed = True
        self.trainable = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = None
        if o.optimizer:
            self.slice = optimizer_slice(self.trainable, o.optimizer_world)
            # f32 master values where the model stores bf16 (fila-train keeps them in the optimizer's slice).
            self.master = [q if q.dtype == torch.float32 else q.detach().float().clone().requires_grad_(True) for q in self.slice]
            self.optimizer = torch.optim.AdamW(self.master, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.optimizer_elements = sum(q.numel() for q in self.slice) if o.optimizer else None
        self.counts = (sum(q.numel() for q in self.trainable), sum(q.numel() for q in self.model.parameters()))
        self.sync()
        self.build_s = time.perf_counter() - self.built
        self.progress(f"model built in {self.build_s:.1f} s")
        self.index = 0
        self.warmup_s = []
        for _ in range(o.warmup):
            r = self.step()
            self.warmup_s.append(r["seconds"])
            self.progress(step_line(self.index - 1, r, "warm-up"))

    def progress(self, line):
        """Per-step lines: stdout for text, stderr under --json (so a run stopped by a time limit still shows them)."""
        if not getattr(self.o, "quiet", False):
            print(line, file=sys.stderr if self.o.json else sys.stdout, flush=True)

    def sync(self):
        if self.o.device.type == "cuda":
            torch.cuda.synchronize(self.o.device)

    def step(self):
        o = self.o
        grids = grids_of(o, self.index)
        self.index += 1
        views, hires, ids, mask, labels, tokens, length = make_batch(self.p, grids, o.text_tokens, o.device)
        scored = int((labels[:, 1:] != -100).sum())
        flops = step_flops(self.p, grids, length, scored, self.trains, o.activation_checkpointing)
        self.sync()
        start = time.perf_counter()
        with torch.autocast(o.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(views, hires, grids, ids, mask, labels)
        loss.backward()
        loss.item()
        if self.optimizer is not None:
            for m, q in zip(self.master, self.slice):
                if m is not q:
                    m.grad = None if q.grad is None else q.grad.float()
            torch.nn.utils.clip_grad_norm_(self.master, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for m, q in zip(self.master, self.slice):
                    if m is not q:
                        q.copy_(m)
        self.model.zero_grad(set_to_none=True)
        self.sync()
        seconds = time.perf_counter() - start
        canvases = [[cols, rows] if tiled else [1, 1] for rows, cols, tiled in grids]
        return dict(seconds=seconds, tokens=tokens, samples=len(grids), flops=flops, canvases=canvases)

    def run(self, steps):
        """`steps` timed steps: per-step records and the summary of `fila bench --json`'s fields."""
        memory = PeakMemory(self.o.device)
        before, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        records = []
        for _ in range(steps):
            records.append(self.step())
            self.progress(step_line(self.index - 1, records[-1], "step"))
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
        counts = dict(build_s=self.build_s, warmup_s=self.warmup_s, optimizer_elements=self.optimizer_elements, trainable=self.counts[0], parameters=self.counts[1])
        return summary(self.o, records, memory.finish(), **counts, user_s=after.ru_utime - before.ru_utime, system_s=after.ru_stime - before.ru_stime, wall_s=wall)


def canvas_text(canvases):
    each = [f"{c}x{r}" for c, r in canvases]
    return f"{each[0]} ×{len(each)}" if len(each) > 1 and len(set(each)) == 1 else " ".join(each)


def step_line(index, r, what):
    return (
        f"{what} {index + 1:>3}: {r['seconds'] * 1e3:8.1f} ms, {r['tokens']:>6} tokens, {r['tokens'] / r['seconds']:9.1f} tokens/s, "
        f"{r['samples'] / r['seconds']:7.2f} samples/s, {sum(r['flops']) / 1e9:.2f} GFLOP, canvases {canvas_text(r['canvases'])}"
    )


def summary(o, records, memory, **extra):
    times = [r["seconds"] for r in records]
    seconds = sum(times)
    fwd, bwd, rec = (sum(r["flops"][i] for r in records) for i in range(3))
    steps = len(records)
    peak = o.peak_tflops
    return dict(
        side="pytorch",
        torch=torch.__version__,
        size=o.size,
        stage=o.stage,
        batch=o.batch,
        batch_shape=o.batch_shape,
        text_tokens=o.text_tokens,
        device=str(o.device),
        precision=o.precision,
        activation_checkpointing=o.activation_checkpointing,
        optimizer=o.optimizer,
        optimizer_world=o.optimizer_world,
        warmup_steps=o.warmup,
        steps=steps,
        step_s=times,
        step_tokens=[r["tokens"] for r in records],
        step_canvases=[r["canvases"] for r in records],
        step_flops=[sum(r["flops"]) for r in records],
        mean_s=seconds / steps,
        median_s=sorted(times)[steps // 2],
        tokens_per_s=sum(r["tokens"] for r in records) / seconds,
        samples_per_s=sum(r["samples"] for r in records) / seconds,
        flops_per_step=dict(forward=fwd // steps, backward=bwd // steps, recompute=rec // steps, total=(fwd + bwd + rec) // steps),
        achieved_tflops=(fwd + bwd + rec) / seconds / 1e12,
        peak_tflops=peak,
        mfu=(fwd + bwd + rec) / seconds / (peak * 1e12) if peak else None,
        mfu_without_recompute=(fwd + bwd) / seconds / (peak * 1e12) if peak else None,
        **memory,
        **extra,
    )


def print_text(s):
    print(
        f"pytorch {s['size']} stage {s['stage']}: batch {s['batch']} ({s['batch_shape']}), {s['text_tokens']} text tokens per sample, "
        f"{s['precision']}, activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}"
        + (f", AdamW over one rank's slice of a {s['optimizer_world']}-way sharding" if s["optimizer"] and s["optimizer_world"] > 1 else "")
    )
    mfu = f"{s['mfu'] * 100:.1f} % of {s['peak_tflops']} TFLOP/s" if s["mfu"] is not None else "n/a (give --peak-tflops)"
    print(
        f"mean {s['mean_s'] * 1e3:.1f} ms/step, median {s['median_s'] * 1e3:.1f} ms/step; {s['tokens_per_s']:.1f} tokens/s, "
        f"{s['samples_per_s']:.2f} samples/s; FLOPs per step {s['flops_per_step']['total'] / 1e12:.3f} T, MFU {mfu}"
    )
    if s["peak_memory_bytes"] is not None:
        print(f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB: {s['peak_memory_source']}")
    if "torch_max_allocated_bytes" in s:
        print(f"torch.cuda.max_memory_allocated {s['torch_max_allocated_bytes'] / 2**30:.2f} GiB, max_memory_reserved {s['torch_max_reserved_bytes'] / 2**30:.2f} GiB")


def main(argv=None):
    o = options(sys.argv[1:] if argv is None else argv)
    if o.threads:
        torch.set_num_threads(o.threads)
    side = TorchSide(o)
    s = side.run(o.steps)
    if o.json:
        print(json.dumps(s))
    else:
        print_text(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
