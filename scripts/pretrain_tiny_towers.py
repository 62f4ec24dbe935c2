"""Pretrains the tiny CLIP-ViT and ConvNeXt towers of the synthetic quick start.

The real FILA recipe starts from pretrained towers (CLIP ViT-L/14-336 and a CLIP ConvNeXt);
the tiny configurations need tiny stand-ins. This script makes them: it generates images with
`fila data synth` (a seed the quick start does not use), prepares each image the way fila-data
does (stage 1's padded square; stage 2's canvas, global view and tiles, and the ConvNeXt canvas),
trains a transformers `CLIPVisionModel` and a `ConvNextModel` with the tiny quick-start sizes to
name each image's shape colour, shape kind and shape count from its mean-pooled features (three
linear heads, cross-entropy; the ViT pools the penultimate layer's patch tokens of all views, as
FILA reads them), and saves both towers as Hugging Face folders (`config.json` +
`model.safetensors`) that `fila-train` loads like any other checkpoint:

    datasets/synth/towers/clip/       CLIPVisionModel (hidden 64, 5 layers, 56-px input, patch 14)
    datasets/synth/towers/convnext/   ConvNextModel (hidden sizes 16/32/48/64, depths 1/1/2/1)

The committed towers were made by this script with its defaults (CPU, 2 threads). Usage:

    cargo build --release -p fila-cli
    python scripts/pretrain_tiny_towers.py [--images 6000] [--steps 4000] [--batch 32]

Needs torch, transformers, safetensors, pillow, numpy.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel

from synth_labels import COLOURS, SHAPES, labels_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The data pipeline normalises both towers' inputs with CLIP's statistics (`vit_norm`, `hires_norm`).
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
TILE, HIRES = 56, 128  # ViT tile and ConvNeXt pixels per tile (56 x 32/14)
CANVASES = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]  # (cols, rows), the stage-2 default


def normalise(pixels):
    """uint8 `[..., H, W, 3]` -> float `[..., 3, H, W]` with CLIP's statistics."""
    x = (torch.from_numpy(pixels).float() / 255 - torch.from_numpy(MEAN)) / torch.from_numpy(STD)
    return x.movedim(-1, -3)


def square_view(im, side):
    """Stage 1's untiled view: the image fitted into a `side` square (aspect kept, centred,
    padded with the mean colour)."""
    w, h = im.size
    s = side / max(w, h)
    im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in MEAN))
    canvas.paste(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
    return np.asarray(canvas)


def select_canvas(w, h):
    """LLaVA-NeXT's choice (largest effective resolution, then least waste), as fila-data makes it."""
    best, key = None, None
    for cols, rows in CANVASES:
        cw, ch = cols * TILE, rows * TILE
        scale = min(cw / w, ch / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        k = (effective, -(cw * ch - effective))
        if key is None or k > key:
            best, key = (cols, rows), k
    return best


def placement(w, h, cw, ch):
    """Where a `w x h` image lands in a `cw x ch` canvas (aspect kept, centred): (size, offset)."""
    if cw / w < ch / h:
        size = (cw, min(ch, max(1, int(np.ceil(h * cw / w)))))
    else:
        size = (min(cw, max(1, int(np.ceil(w * ch / h)))), ch)
    return size, ((cw - size[0]) // 2, (ch - size[1]) // 2)


def on_canvas(im, cw, ch):
    """The image fitted into a `cw x ch` canvas (aspect kept, centred, black padding)."""
    size, offset = placement(*im.size, cw, ch)
    canvas = Image.new("RGB", (cw, ch))
    canvas.paste(im.resize(size, Image.BICUBIC), offset)
    return canvas


def tiled_views(im, grid):
    """Stage 2's views: the global view (the padded canvas squeezed to one tile) then the tiles in
    row-major order, `[1 + cols*rows, t, t, 3]`; and the ConvNeXt canvas at 128 pixels per tile."""
    cols, rows = grid
    canvas = on_canvas(im, cols * TILE, rows * TILE)
    views = [np.asarray(canvas.resize((TILE, TILE), Image.BICUBIC))]
    a = np.asarray(canvas)
    views += [a[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] for r in range(rows) for c in range(cols)]
    return np.stack(views), np.asarray(on_canvas(im, cols * HIRES, rows * HIRES))


def fit(params, loss_of, groups, steps, batch, lr, report):
    """AdamW (no weight decay) with a one-cycle schedule on `params`. `groups`: tuples of tensors
    whose first dimension is the example (one tuple per input shape); each step draws one group in
    proportion to its size, then a batch from its first 90 %, and minimises `loss_of(*batch)`.
    `report(step, loss)` runs every 250 steps and at the end; the last 10 % of each group is left
    for it to score."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([float(len(g[0])) for g in groups])
    for step in range(1, steps + 1):
        group = groups[torch.multinomial(sizes, 1, generator=gen).item()]
        idx = torch.randint(0, max(1, len(group[0]) * 9 // 10), (batch,), generator=gen)
        loss = loss_of(*(t[idx] for t in group))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            report(step, loss.item())


def held_out(group, size=64):
    """The last 10 % of a group's tensors, in slices of `size`."""
    n = len(group[0])
    for i in range(n * 9 // 10, n, size):
        yield tuple(t[i:i + size] for t in group)


def train(name, tower, features, groups, steps, batch, lr, log):
    """Trains `tower` with three linear heads (colour, shape, count) on `features(tower, x)`.
    `groups`: (uint8 inputs, labels) tensors of equal view shapes (the square views, then one per
    canvas). Held-out accuracy is measured on the tiled groups (all but the first)."""
    dim = features(tower, normalise(groups[0][0][:1].numpy())).shape[-1]
    heads = torch.nn.Linear(dim, len(COLOURS) + len(SHAPES) + 5)
    splits = [0, len(COLOURS), len(COLOURS) + len(SHAPES), len(COLOURS) + len(SHAPES) + 5]
    hits = [0.0, 0.0, 0.0]

    def losses_and_hits(x, y):
        z = heads(features(tower, normalise(x.numpy())))
        parts = [z[:, splits[k]:splits[k + 1]] for k in range(3)]
        loss = sum(torch.nn.functional.cross_entropy(parts[k], y[:, k]) for k in range(3))
        return loss, [(parts[k].argmax(1) == y[:, k]).float().sum().item() for k in range(3)]

    start = time.time()

    def report(step, loss):
        total, sums = 0, [0.0, 0.0, 0.0]
        with torch.no_grad():
            for group in groups[1:]:
                for x, y in held_out(group):
                    sums = [a + b for a, b in zip(sums, losses_and_hits(x, y)[1])]
                    total += len(y)
        hits[:] = [h / total for h in sums]
        log(f"{name} step {step}/{steps} loss {loss:.3f} held-out (tiled views) colour/shape/count "
            f"{hits[0]:.2f}/{hits[1]:.2f}/{hits[2]:.2f} ({time.time() - start:.0f} s)")

    params = list(tower.parameters()) + list(heads.parameters())
    fit(params, lambda x, y: losses_and_hits(x, y)[0], groups, steps, batch, lr, report)
    return tower, hits


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=1, help="synthetic-data seed (the quick start uses 0)")
    p.add_argument("--out", default=os.path.join(ROOT, "datasets", "synth", "towers"))
    p.add_argument("--fila", default=os.path.join(ROOT, "target", "release", "fila"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)

    with tempfile.TemporaryDirectory() as data:
        subprocess.run([args.fila, "data", "synth", "--out", data, "--seed", str(args.seed), "--tile-size", str(TILE),
                        "--stage1", str(args.images), "--stage2", "0", "--heldout", "0", "--fine", "0"], check=True)
        records = [json.loads(line) for line in open(os.path.join(data, "stage1.jsonl"))]
        labels = np.array([labels_of(r["conversations"][1]["value"]) for r in records])
        square_vit, square_conv, by_canvas = [], [], {g: ([], [], []) for g in CANVASES}
        for r, y in zip(records, labels):
            im = Image.open(os.path.join(data, r["image"])).convert("RGB")
            square_vit.append(square_view(im, TILE))
            square_conv.append(square_view(im, HIRES))
            grid = select_canvas(*im.size)
            views, hires = tiled_views(im, grid)
            group = by_canvas[grid]
            group[0].append(views), group[1].append(hires), group[2].append(y)
    log(f"{len(records)} images (seed {args.seed}); canvases " + ", ".join(f"{c}x{r}: {len(g[2])}" for (c, r), g in by_canvas.items()))
    tensor = lambda y: torch.from_numpy(np.array(y))
    canvas_groups = [g for g in by_canvas.values() if g[2]]
    vit_groups = [(tensor(np.stack(square_vit)[:, None]), tensor(labels))] + [(tensor(np.stack(v)), tensor(y)) for v, _, y in canvas_groups]
    conv_groups = [(tensor(np.stack(square_conv)), tensor(labels))] + [(tensor(np.stack(h)), tensor(y)) for _, h, y in canvas_groups]

    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                                            num_attention_heads=4, image_size=TILE, patch_size=14))

    def clip_features(m, x):
        # All views of an image (`[B, V, 3, t, t]`): FILA reads the penultimate layer's patch tokens
        # (select_layer = -2) of every view; the mean over all of them.
        b, v = x.shape[:2]
        h = m(pixel_values=x.flatten(0, 1), output_hidden_states=True).hidden_states[-2][:, 1:]
        return h.reshape(b, -1, h.shape[-1]).mean(1)

    clip, clip_hits = train("clip", clip, clip_features, vit_groups, args.steps, args.batch, 1e-3, log)

    convnext = ConvNextModel(ConvNextConfig(num_channels=3, patch_size=4, num_stages=4,
                                            hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1]))
    conv_features = lambda m, x: m(pixel_values=x).last_hidden_state.mean((2, 3))
    convnext, conv_hits = train("convnext", convnext, conv_features, conv_groups, args.steps, args.batch, 2e-3, log)

    for name, model, hits in [("clip", clip, clip_hits), ("convnext", convnext, conv_hits)]:
        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        log(f"wrote {d} (held-out colour/shape/count on tiled views {hits[0]:.2f}/{hits[1]:.2f}/{hits[2]:.2f})")


if __name__ == "__main__":
    sys.exit(main())
