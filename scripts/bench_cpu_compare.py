#!/usr/bin/env python3
"""One CPU training step of FILA: ours (`fila bench`) against its PyTorch twin, run alternately.

The twin is the same architecture as `fila bench --size tiny|mid` (crates/fila-cli/src/bench.rs):
transformers' CLIPVisionModel and LlamaForCausalLM built from configs, and a ConvNeXt, CVFM and
projector written here the way crates/fila-model defines them (docs/model.md). The batch is the
bench's: per sample one 2x2 canvas (global view + 4 tiles for the ViT, the canvas x 32/14 for the
ConvNeXt), its visual tokens followed by 32 text tokens, loss on the text. A step is forward,
backward, global-norm clipping at 1 and AdamW over the stage's trainable set (stage 1: CVFM and
projector, towers and LLM frozen but back-propagated through; stage 2: everything), on both sides.

Rounds alternate one `fila bench` process (one untimed warm-up step, then --steps timed steps)
and --steps timed steps of the twin in this process, so machine load hits both alike. Printed:
per-step times, the ratio ours / PyTorch of the median step times, and each side's CPU user time
over wall time during its timed steps (2.0 = both cores busy on a 2-core machine).

    cargo build --release -p fila-cli
    python3 scripts/bench_cpu_compare.py [--sizes tiny mid] [--stages 1 2] [--rounds 3] [--steps 3]

Needs `pip install torch transformers`.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting lose whole time slices when another process holds a
# core: on the shared 2-core machine torch's steps then took 1-16x their time. Passive waiting
# keeps them steady (--omp-active keeps the default). Read at import, so set before it.
if "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMAGE_TOKEN = 1000
TEXT_TOKENS = 32


def preset(size):
    """The numbers of `preset()` in crates/fila-cli/src/bench.rs."""
    tile, vit_dim, vit_layers, conv_dims, llm_dim, llm_layers = {
        "tiny": (56, 64, 5, [16, 32, 48, 64], 128, 2),
        "mid": (112, 256, 8, [48, 96, 192, 384], 512, 4),
    }[size]
    return dict(
        tile=tile,
        vit_dim=vit_dim,
        vit_layers=vit_layers,
        conv_dims=conv_dims,
        depths=[1, 1, 2, 1],
        fusion_layers=[k * (vit_layers - 1) // 4 for k in range(1, 5)],
        feature_layer=vit_layers - 1,  # select_layer = -2
        llm_dim=llm_dim,
        llm_layers=llm_layers,
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

    def forward(self, x):
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
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

    def view_features(self, stage_map, rows, cols, g):
        """[1, C, rows*g*r, cols*g*r] -> [1 + rows*cols, g*g, C], global view first."""
        aligned = self.align(stage_map)
        views = [F.adaptive_avg_pool2d(aligned, g)]
        views += [aligned[:, :, i * g:(i + 1) * g, j * g:(j + 1) * g] for i in range(rows) for j in range(cols)]
        return torch.cat(views, 0).flatten(2).transpose(1, 2)

    def forward(self, h, conv):
        cls, patches = h[:, :1], h[:, 1:]
        joined = torch.cat([self.norm_vit(patches), self.norm_conv(conv)], -1)
        return torch.cat([cls, patches + self.fc_out(F.gelu(self.fc_in(joined)))], 1)


class FilaTwin(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p
        d = p["vit_dim"]
        self.vit = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=d,
                intermediate_size=4 * d,
                num_hidden_layers=p["vit_layers"],
                num_attention_heads=d // 32,
                image_size=p["tile"],
                patch_size=14,
                hidden_act="quick_gelu",
            )
        )
        self.convnext = ConvNext(p["conv_dims"], p["depths"])
        self.cvfm = nn.ModuleList([Cvfm(d, c, 2 ** (3 - k)) for k, c in enumerate(p["conv_dims"])])
        dl = p["llm_dim"]
        self.projector = nn.Sequential(nn.Linear(d, dl), nn.GELU(), nn.Linear(dl, dl))
        self.llm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=1024,
                hidden_size=dl,
                intermediate_size=dl * 8 // 3,
                num_hidden_layers=p["llm_layers"],
                num_attention_heads=dl // 32,
                num_key_value_heads=dl // 64,
                head_dim=32,
                max_position_embeddings=4096,
                rms_norm_eps=1e-5,
                rope_theta=500000.0,
                tie_word_embeddings=False,
            )
        )

    def encode(self, views, hires, rows=2, cols=2):
        """views: [B*V, 3, t, t]; hires: [B, 3, H, W] -> [B*V*g*g, D] feature-layer patch tokens."""
        g = self.p["tile"] // 14
        maps = self.convnext(hires)
        vit = self.vit.vision_model if hasattr(self.vit, "vision_model") else self.vit
        h = vit.pre_layrnorm(vit.embeddings(views))
        for index, layer in enumerate(vit.encoder.layers[: self.p["feature_layer"]]):
            h = layer(h, None)
            if isinstance(h, tuple):
                h = h[0]
            if index + 1 in self.p["fusion_layers"]:
                k = self.p["fusion_layers"].index(index + 1)
                conv = [self.cvfm[k].view_features(maps[k][i : i + 1], rows, cols, g) for i in range(hires.shape[0])]
                h = self.cvfm[k](h, torch.cat(conv, 0))
        return h[:, 1:].reshape(-1, h.shape[-1])

    def forward(self, views, hires, ids, mask, labels):
        visual = self.projector(self.encode(views, hires))
        embeds = self.llm.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == IMAGE_TOKEN).unsqueeze(-1), visual)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


def make_batch(p, batch):
    g, t = p["tile"] // 14, p["tile"]
    views_per_image = 5
    visual = views_per_image * g * g
    ids = torch.tensor([[IMAGE_TOKEN] * visual + list(range(10, 10 + TEXT_TOKENS))] * batch)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    return (
        torch.randn(batch * views_per_image, 3, t, t),
        torch.randn(batch, 3, 2 * g * 32, 2 * g * 32),
        ids,
        torch.ones_like(ids),
        labels,
    )


class TorchSide:
    def __init__(self, size, stage, batch):
        torch.manual_seed(0)
        self.p = preset(size)
        self.batch = batch
        self.model = FilaTwin(self.p)
        for name, param in self.model.named_parameters():
            param.requires_grad_(stage == 2 or name.startswith(("cvfm.", "projector.")))
        self.trainable = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        for _ in range(2):  # warm-up: first steps allocate and pick kernels
            self.step()

    def step(self):
        inputs = make_batch(self.p, self.batch)
        start = time.perf_counter()
        loss = self.model(*inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def run(self, steps):
        before, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        times = [self.step() for _ in range(steps)]
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
        return dict(step_s=times, user_s=after.ru_utime - before.ru_utime, wall_s=wall)


def run_ours(fila, size, stage, batch, steps):
    cmd = [str(fila), "bench", "--size", size, "--batch", str(batch), "--steps", str(steps), "--stage", str(stage), "--optimizer", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    ap.add_argument("--stages", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--fila", default=str(ROOT / "target" / "release" / "fila"))
    ap.add_argument("--json-out", help="also write every measurement to this file")
    ap.add_argument("--omp-active", action="store_true", help="leave OMP_WAIT_POLICY at its default (spinning)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}; ours: {args.fila}",
        flush=True,
    )
    results = []
    for size in args.sizes:
        for stage in args.stages:
            torch_side = TorchSide(size, stage, args.batch)
            ours_steps, torch_steps = [], []
            ours_cpu, torch_cpu = [0.0, 0.0], [0.0, 0.0]
            for r in range(args.rounds):
                ours = run_ours(args.fila, size, stage, args.batch, args.steps)
                theirs = torch_side.run(args.steps)
                ours_steps += ours["step_s"]
                torch_steps += theirs["step_s"]
                ours_cpu = [ours_cpu[0] + (ours["user_s"] or 0.0), ours_cpu[1] + ours["wall_s"]]
                torch_cpu = [torch_cpu[0] + theirs["user_s"], torch_cpu[1] + theirs["wall_s"]]
                fmt = lambda xs: " ".join(f"{x * 1e3:7.1f}" for x in xs)
                print(f"{size:4s} stage {stage} round {r + 1}: ours [{fmt(ours['step_s'])}] ms   torch [{fmt(theirs['step_s'])}] ms", flush=True)
            o, t = statistics.median(ours_steps), statistics.median(torch_steps)
            row = dict(
                size=size,
                stage=stage,
                batch=args.batch,
                ours_median_s=o,
                torch_median_s=t,
                ratio=o / t,
                ours_user_over_wall=ours_cpu[0] / ours_cpu[1],
                torch_user_over_wall=torch_cpu[0] / torch_cpu[1],
                ours_steps_s=ours_steps,
                torch_steps_s=torch_steps,
            )
            results.append(row)
            print(
                f"{size:4s} stage {stage}: ours {o * 1e3:.1f} ms, torch {t * 1e3:.1f} ms, ratio ours/torch {o / t:.2f}x; "
                f"user/wall ours {row['ours_user_over_wall']:.2f}, torch {row['torch_user_over_wall']:.2f}",
                flush=True,
            )
            del torch_side
    print("\nsize  stage  ours ms  torch ms  ours/torch  user/wall ours  torch")
    for r in results:
        print(
            f"{r['size']:5s} {r['stage']:5d} {r['ours_median_s'] * 1e3:8.1f} {r['torch_median_s'] * 1e3:9.1f} "
            f"{r['ratio']:10.2f}x {r['ours_user_over_wall']:14.2f} {r['torch_user_over_wall']:6.2f}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
