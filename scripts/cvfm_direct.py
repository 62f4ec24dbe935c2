"""Can a CVFM block pass the code's character when the loss asks it directly? A reading diagnostic.

Traces a FILA checkpoint's plain ViT (CVFM outputs zeroed in a temporary copy) and its ConvNeXt
with `fila forward` on records made by `scripts/code_variants.py --mode one` (or `first`), then
trains, in PyTorch, one fresh CVFM block as the project defines it (design notes §1.2, alignment
by pooling: stage 4 already lies on the ViT grid) at the last fusion point, the feature layer:
`h' = h + W_out · GELU(W_in · [LN(h) ; LN(c)])`, `W_out` starting at zero. Its output tokens are
mean-pooled over all views (what an LLM attending evenly would see) and a linear head names the
answer to "What is the first character of the code?". The same head on the plain ViT tokens is
the baseline. Steps, batch, optimiser and rate follow the tiny stage 2 (Adam 2e-3, batches of 4).

    python scripts/cvfm_direct.py --config configs/tiny/synth-stage2.toml \\
        --checkpoint checkpoints/synth-stage1/final --data /tmp/one-char/stage2_train.jsonl

Needs torch, safetensors, numpy, pillow (through code_variants).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from code_variants import first_answer
from probe_features import ROOT, config_for
from synth_labels import CODE_ALPHABET

G = 4  # ViT cells per tile side in the tiny geometry (56-pixel tiles, patch 14)


def zeroed_copy(checkpoint, folder):
    """A copy of `checkpoint` whose CVFM output layers are zero: its ViT states are the plain ViT's."""
    for name in os.listdir(checkpoint):
        if name != "model.safetensors":
            shutil.copy(os.path.join(checkpoint, name), folder)
    tensors = load_file(os.path.join(checkpoint, "model.safetensors"))
    save_file({k: v * 0 if ".fc_out." in k else v for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))


def view_cells(stage4):
    """ConvNeXt stage-4 map `[C, rows·G, cols·G]` → `[views, G², C]`: the global view (the map
    pooled to G×G) then the tiles row-major, as CVFM cuts it."""
    c, height, width = stage4.shape
    rows, cols = height // G, width // G
    views = [stage4] if (rows, cols) == (1, 1) else [stage4.reshape(c, G, rows, G, cols).mean((2, 4))]
    views += [stage4[:, i * G:(i + 1) * G, j * G:(j + 1) * G] for i in range(rows) for j in range(cols)]
    return np.stack([v.reshape(c, G * G).T for v in views])


def train(h, c, y, fit, fuse, steps, seed=0):
    """(train, test) accuracy of the mean-pooled tokens' linear head, with or without a CVFM block."""
    torch.manual_seed(seed)
    d, k = h[0].shape[-1], c[0].shape[-1]
    ln_h, ln_c, fc_in, fc_out = torch.nn.LayerNorm(d), torch.nn.LayerNorm(k), torch.nn.Linear(d + k, d), torch.nn.Linear(d, d)
    torch.nn.init.zeros_(fc_out.weight)
    torch.nn.init.zeros_(fc_out.bias)
    head = torch.nn.Linear(d, len(CODE_ALPHABET))
    modules = [head] + ([ln_h, ln_c, fc_in, fc_out] if fuse else [])
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=2e-3)

    def pooled(i):
        x, conv = torch.from_numpy(h[i]), torch.from_numpy(c[i])
        if fuse:
            x = x + fc_out(torch.nn.functional.gelu(fc_in(torch.cat([ln_h(x), ln_c(conv)], -1))))
        return x.mean((0, 1))

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = rng.integers(0, fit, 4)
        loss = torch.nn.functional.cross_entropy(head(torch.stack([pooled(i) for i in batch])), torch.tensor(y[batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        right = np.array([head(pooled(i)).argmax().item() == y[i] for i in range(len(y))])
    return right[:fit].mean(), right[fit:].mean()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the stage-2 config (tiled views)")
    p.add_argument("--checkpoint", required=True, help="a FILA checkpoint with the ConvNeXt branch")
    p.add_argument("--data", required=True, help="records from scripts/code_variants.py --mode one|first")
    p.add_argument("-n", type=int, default=1000, help="records with the question (3/4 fit, 1/4 test)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--fila", default=os.path.join(ROOT, "target", "release", "fila"))
    args = p.parse_args()
    folder = os.path.dirname(os.path.abspath(args.data))
    records = [r for r in map(json.loads, open(args.data)) if first_answer(r) is not None][: args.n]
    h, c = [], []
    y = np.array([CODE_ALPHABET.index(first_answer(r)) for r in records])
    with tempfile.TemporaryDirectory() as tmp, tempfile.NamedTemporaryFile(
            "w", suffix=".toml", dir=os.path.dirname(os.path.abspath(args.config)), prefix=".probe-") as cfg:
        zeroed_copy(args.checkpoint, tmp)
        cfg.write(config_for(args.config, tmp))
        cfg.flush()
        out = os.path.join(tmp, "trace.safetensors")
        for r in records:
            subprocess.run([args.fila, "forward", "--config", cfg.name, "--image", os.path.join(folder, r["image"]),
                            "--prompt", "What is shown?", "--out", out], check=True, capture_output=True)
            t = load_file(out)
            layers = sorted(int(n.rsplit(".", 1)[1]) for n in t if n.startswith("vit.hidden."))
            h.append(t[f"vit.hidden.{layers[-1]}"][:, 1:])  # the feature layer's patch tokens
            c.append(view_cells(t["convnext.stage.4"][0]))
    fit = len(y) * 3 // 4
    print(f"{len(y)} records ({fit} fit, {len(y) - fit} test), {args.steps} steps of 4; chance 1/{len(CODE_ALPHABET)}")
    for fuse in (False, True):
        tr, te = train(h, c, y, fit, fuse, args.steps)
        print(f"  {'CVFM block + head' if fuse else 'ViT tokens + head'}: train {tr:.1%}, test {te:.1%}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
