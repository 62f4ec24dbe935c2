"""Linear probes: how much of the synthetic images' colour, shape and count a checkpoint's features carry.

Runs `fila forward` on synthetic images (a stage-1 caption file, whose captions name each image's
count, colour and shape), mean-pools every traced feature (ConvNeXt stages over space, ViT layers
over the patch tokens of all views, the projector output over its tokens; the ConvNeXt stages
max-pooled as well, rows `max:`), fits a multinomial logistic regression per label on the first 3/4
of the images and reports test accuracy on the rest.
It answers where information is lost between the towers, the CVFM fusion and the projector:

    cargo build --release -p fila-cli
    python scripts/experiments/probe_features.py --config configs/tiny/synth-stage2.toml \\
        --checkpoint checkpoints/synth-stage2/final --data datasets/synth/generated/stage1.jsonl

`--config` supplies the data side (tokenizer, geometry, tiling); its `[model]` is replaced by
`--checkpoint`. Needs torch, safetensors, numpy.

`--target codes` asks the same question of the codes, cell by cell: for every stage-4 cell (one
ViT patch token of a tile) where a code character is centred (placed by the records' `code_box`),
the features of that cell alone (ConvNeXt stages averaged over the cell, the tile's patch token
after each ViT layer, its row of the projector input and output) are probed for the character
(the leftmost one centred there; chance 1/34). Images split 3/4 fit, 1/4 test. Works on stage-1
captions (normal layout) and on `fine.jsonl` (fine layout). Needs pillow too.

`--target first` probes the pooled features (as for labels) for the answer to "What is the first
character of the code?" in a file made by `scripts/experiments/code_variants.py --mode first` or `--mode one`
(records without that question are left out; use the stage-2 config, the views are tiled).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # scripts/: synth_labels, pretrain_tiny_towers

from pretrain_tiny_towers import HIRES, ROOT
from synth_labels import CODE_ALPHABET, COLOURS, SHAPES, labels_of


def pooled(name, t):
    """Mean-pooled feature vector of one traced tensor, or None for tensors that are not features."""
    if name.startswith("convnext.stage."):
        return t[0].mean((1, 2))  # [1, C, H, W]
    if name.startswith("max:convnext.stage."):
        return t[0].max((1, 2))
    if name.startswith("vit.hidden."):
        return t[:, 1:].mean((0, 1))  # [views, 1 + g², D], CLS dropped
    if name in ("image_features", "visual_tokens"):
        return t.mean(0)
    return None


def cell_features(name, t, grid, cell, g=4):
    """Features of one stage-4 cell `(row, col)` of a `grid = (cols, rows)` canvas, or None."""
    cols, rows = grid
    r, c = cell
    if name.startswith("convnext.stage."):
        f = t.shape[2] // (rows * g)  # map pixels per cell
        return t[0, :, r * f:(r + 1) * f, c * f:(c + 1) * f].mean((1, 2))
    tile, token = 1 + (r // g) * cols + c // g, (r % g) * g + c % g  # the global view is view 0
    if name.startswith("vit.hidden."):
        return t[tile, 1 + token]  # CLS first
    if name in ("image_features", "visual_tokens"):
        return t[tile * g * g + token]
    return None


def probe(x, y, classes, n, steps=500):
    """Test accuracy on rows `n..` of a standardised multinomial logistic regression (L2 1e-3,
    L-BFGS) fitted on rows `..n`."""
    x = torch.from_numpy(x).double()
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-6
    x = (x - mean) / std
    y = torch.from_numpy(y)
    w = torch.zeros(x.shape[1], classes, dtype=torch.double, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:n] @ w + b, y[:n]) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((x[n:] @ w + b).argmax(1) == y[n:]).double().mean().item()


def config_for(config, checkpoint):
    """The config's text with its `[model]` table replaced by `checkpoint = ...` (paths in the rest
    stay relative to the config's folder, so the copy is written next to it)."""
    text = open(config).read()
    tables = re.split(r"(?m)^(?=\[)", text)
    kept = [t for t in tables if not re.match(r"\[model[.\]]", t)]
    return "".join(kept) + f'\n[model]\ncheckpoint = "{os.path.abspath(checkpoint)}"\n'


def traces(fila, config, checkpoint, images, prompt):
    """`fila forward` traces (tensor name → array) of `checkpoint` on each image of `images`, asked
    `prompt`, under `config` with its `[model]` table pointing at the checkpoint; one at a time."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", dir=os.path.dirname(os.path.abspath(config)),
                                     prefix=".probe-") as cfg, tempfile.TemporaryDirectory() as tmp:
        cfg.write(config_for(config, checkpoint))
        cfg.flush()
        out = os.path.join(tmp, "trace.safetensors")
        for image in images:
            subprocess.run([fila, "forward", "--config", cfg.name, "--image", image, "--prompt", prompt, "--out", out],
                           check=True, capture_output=True)
            yield load_file(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="stage-1 caption JSONL of the synthetic dataset (or fine.jsonl for codes)")
    p.add_argument("--target", choices=["labels", "codes", "first"], default="labels",
                   help="colour / shape / count of whole images, code characters cell by cell, or the "
                        "answer to the first-character question of scripts/experiments/code_variants.py (pooled)")
    p.add_argument("-n", type=int, default=600, help="records read from --data (3/4 of the images fit, 1/4 test)")
    p.add_argument("--fila", default=os.path.join(ROOT, "target", "release", "fila"))
    args = p.parse_args()
    folder = os.path.dirname(os.path.abspath(args.data))
    records = [json.loads(line) for line in open(args.data)][: args.n]
    if args.target == "labels":
        labels = [("colour", len(COLOURS)), ("shape", len(SHAPES)), ("count", 5)]
        samples = [[(None, labels_of(r["conversations"][1]["value"]))] for r in records]
        features = lambda name, t, _: pooled(name, t)
    elif args.target == "first":
        from code_variants import first_answer  # imported here: it needs pillow
        labels = [("first character", len(CODE_ALPHABET))]
        records = [r for r in records if first_answer(r) is not None]
        samples = [[(None, [CODE_ALPHABET.index(first_answer(r))])] for r in records]
        features = lambda name, t, _: pooled(name, t)
    else:
        from reading_tower import NONE, prepare  # imported here: only codes need it
        labels = [("character", NONE)]
        samples = []
        for r in records:
            grid, _, cells4, _ = prepare(r, folder, HIRES)
            samples.append([((grid, (i, j)), [cells4[i, j, 0]]) for i, j in zip(*np.nonzero(cells4[:, :, 0] != NONE))])
        features = lambda name, t, where: cell_features(name, t, *where)
    y = np.array([label for cells in samples for _, label in cells])
    fit = sum(len(cells) for cells in samples[: len(samples) * 3 // 4])  # rows of the first 3/4 of the images
    feats = {}
    images = [os.path.join(folder, r["image"]) for r in records]
    for i, (traced, cells) in enumerate(zip(traces(args.fila, args.config, args.checkpoint, images, "What is shown?"), samples)):
        if args.target != "codes":  # max-pooled ConvNeXt maps too
            traced.update({"max:" + n: t for n, t in traced.items() if n.startswith("convnext.stage.")})
        for name, t in traced.items():
            for where, _ in cells:
                v = features(name, t, where)
                if v is not None:
                    feats.setdefault(name, []).append(v)
        if (i + 1) % 100 == 0:
            print(f"traced {i + 1}/{len(records)} images", file=sys.stderr, flush=True)
    unit = "code cells" if args.target == "codes" else "images"
    print(f"linear-probe test accuracy ({len(y) - fit} {unit}), " + " / ".join(n for n, _ in labels))
    # Data-flow order: ConvNeXt stages, ViT layers (fused where CVFM acts), projector output.
    def order(name):
        n = name.split(":")[-1]
        return (not n.startswith("convnext"), not n.startswith("vit"), int(n.rsplit(".", 1)[-1]) if n[-1].isdigit() else 0, name)

    for name, vs in sorted(feats.items(), key=lambda kv: order(kv[0])):
        x = np.stack(vs)
        accs = [probe(x, y[:, k], c, fit) for k, (_, c) in enumerate(labels)]
        print(f"  {name:18s} dim {x.shape[1]:4d}  " + " / ".join(f"{a:.2f}" for a in accs))


if __name__ == "__main__":
    sys.exit(main())
