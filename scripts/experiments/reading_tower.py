"""Teaches the tiny ConvNeXt to read the synthetic codes and measures how well it does.

An experiment tool for the open question of the quick start: can the tiny towers read? It generates
synthetic images with `fila data synth` (seed 7 by default; the quick start uses 0 and the tower
pretraining 1), prepares each image's ConvNeXt canvas the way fila-data does for stage 2, and
trains a transformers `ConvNextModel` with two linear reading heads, placed by each record's
`code_box`:

- stage 4 (stride 32, one cell per ViT token): for every cell, the characters whose centres fall
  in it, left to right, in 4 slots (an end class fills the rest);
- stage 2 (stride 8): for every cell, the character whose centre falls in it, or none.

Every 250 steps it reports, on the last 10 % of the normal-layout and fine-layout images:
`c4` (stage-4 character accuracy over the code characters), `cells` (code cells with every slot
right) and `c2` (stage-2 character accuracy). Chance is 1/34 for characters.

    cargo build --release -p fila-cli
    python scripts/experiments/reading_tower.py [--normal 8000] [--fine 8000] [--steps 3000] [--save DIR]

`--save DIR` writes the tower as a Hugging Face folder; the quick start takes it with
`--set 'model.convnext="DIR"'` on `configs/tiny/synth-stage1.toml`. `--hires 192` draws the
ConvNeXt canvas at 192 instead of 128 pixels per tile (fine glyphs 9.6 instead of 6.4 px tall),
to test how glyph size limits reading; such a tower does not fit the quick start's geometry.
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
from transformers import ConvNextConfig, ConvNextModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # scripts/: synth_labels, pretrain_tiny_towers

from pretrain_tiny_towers import HIRES, ROOT, fit, held_out, normalise, on_canvas, placement, select_canvas
from synth_labels import CODE_ALPHABET
from synth_labels import code_of as caption_code

NONE = len(CODE_ALPHABET)  # end of a cell's characters / no character
SLOTS = 4


def char_centres(record):
    """Centres of the code's characters in image pixels, from `code_box` and `glyph_px`."""
    left, top, _, height = record["code_box"]
    k = record["glyph_px"] / 7
    return [(left + 6 * k * i + 2.5 * k, top + height / 2) for i in range(len(code_of(record)))]


def code_of(record):
    answer = record["conversations"][1]["value"]
    if record["layout"] == "fine":
        return answer  # a `code` question
    return caption_code(answer)  # a stage-1 caption


def prepare(record, folder, hires):
    """The ConvNeXt canvas and the two targets of one record."""
    im = Image.open(os.path.join(folder, record["image"])).convert("RGB")
    cols, rows = select_canvas(*im.size)
    cw, ch = cols * hires, rows * hires
    (sw, sh), (ox, oy) = placement(*im.size, cw, ch)
    cells4 = np.full((ch // 32, cw // 32, SLOTS), NONE, dtype=np.int64)
    cells2 = np.full((ch // 8, cw // 8), NONE, dtype=np.int64)
    filled = {}
    for c, (x, y) in zip(code_of(record), char_centres(record)):
        x, y = ox + x * sw / im.size[0], oy + y * sh / im.size[1]
        cell = (min(int(y // 32), ch // 32 - 1), min(int(x // 32), cw // 32 - 1))
        slot = filled.get(cell, 0)
        if slot < SLOTS:
            cells4[cell + (slot,)] = CODE_ALPHABET.index(c)
            filled[cell] = slot + 1
        cells2[min(int(y // 8), ch // 8 - 1), min(int(x // 8), cw // 8 - 1)] = CODE_ALPHABET.index(c)
    return (cols, rows), np.asarray(on_canvas(im, cw, ch)), cells4, cells2


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--normal", type=int, default=8000, help="normal-layout images (stage-1 captions)")
    p.add_argument("--fine", type=int, default=8000, help="fine-layout images")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=7, help="synthetic-data seed")
    p.add_argument("--hires", type=int, default=HIRES, help="ConvNeXt pixels per tile (a multiple of 32)")
    p.add_argument("--init", default=os.path.join(ROOT, "datasets", "synth", "towers", "convnext"),
                   help="tower to start from (Hugging Face folder)")
    p.add_argument("--scratch", default="", help="start from random weights with these hidden sizes, e.g. 16,32,48,64")
    p.add_argument("--save", default="")
    p.add_argument("--fila", default=os.path.join(ROOT, "target", "release", "fila"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    assert args.hires % 32 == 0, "--hires must be a multiple of 32"
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)

    start = time.time()
    groups = {}  # (canvas, layout) -> canvases, stage-4 targets, stage-2 targets
    with tempfile.TemporaryDirectory() as data:
        subprocess.run([args.fila, "data", "synth", "--out", data, "--seed", str(args.seed), "--tile-size", "56",
                        "--stage1", str(args.normal), "--stage2", "0", "--heldout", "0", "--fine", str(args.fine)],
                       check=True, stdout=subprocess.DEVNULL)
        for split in ["stage1", "fine"]:
            for line in open(os.path.join(data, f"{split}.jsonl")):
                record = json.loads(line)
                canvas, pixels, cells4, cells2 = prepare(record, data, args.hires)
                g = groups.setdefault((canvas, record["layout"]), ([], [], []))
                g[0].append(pixels), g[1].append(cells4), g[2].append(cells2)
    groups = [(k, *(torch.from_numpy(np.stack(v)) for v in g)) for k, g in groups.items()]
    log(f"prepared {sum(len(g[1]) for g in groups)} images in {time.time() - start:.0f} s; "
        + ", ".join(f"{c}x{r} {layout}: {len(g[1])}" for ((c, r), layout), *g in groups))

    if args.scratch:
        sizes = [int(s) for s in args.scratch.split(",")]
        tower = ConvNextModel(ConvNextConfig(num_channels=3, patch_size=4, num_stages=4, hidden_sizes=sizes,
                                             depths=[1, 1, 2, 1]))
    else:
        tower = ConvNextModel.from_pretrained(args.init)
    widths = tower.config.hidden_sizes
    head4 = torch.nn.Linear(widths[3], SLOTS * (NONE + 1))
    head2 = torch.nn.Linear(widths[1], NONE + 1)
    ce = torch.nn.functional.cross_entropy

    def loss_and_scores(x, t4, t2):
        out = tower(pixel_values=normalise(x.numpy()), output_hidden_states=True)
        z4 = head4(out.last_hidden_state.permute(0, 2, 3, 1)).unflatten(-1, (SLOTS, NONE + 1))
        z2 = head2(out.hidden_states[2].permute(0, 2, 3, 1))
        # Code cells are rare: weight them up so the heads do not settle on "no character".
        code_cell = (t4 != NONE).any(-1)
        w4 = code_cell.float() * 4 + 0.2
        l4 = (ce(z4.flatten(0, 3), t4.flatten(), reduction="none").view(t4.shape).sum(-1) * w4).sum() / w4.sum()
        w2 = (t2 != NONE).float() * 10 + 0.1
        l2 = (ce(z2.flatten(0, 2), t2.flatten(), reduction="none").view(t2.shape) * w2).sum() / w2.sum()
        right4, chars4 = z4.argmax(-1) == t4, t4 != NONE
        right2, chars2 = z2.argmax(-1) == t2, t2 != NONE
        scores = torch.stack([
            (right4 & chars4).sum().float(), chars4.sum().float(),
            (right4.all(-1) & code_cell).sum().float(), code_cell.sum().float(),
            (right2 & chars2).sum().float(), chars2.sum().float(),
        ])
        return l4 + l2, scores

    start = time.time()

    def report(step, loss):
        totals = {}
        with torch.no_grad():
            for (_, layout), *group in groups:
                for batch in held_out(group):
                    totals[layout] = totals.get(layout, 0) + loss_and_scores(*batch)[1]
        scores = "  ".join(f"{layout}: c4 {s[0] / s[1]:.2f} cells {s[2] / s[3]:.2f} c2 {s[4] / s[5]:.2f}"
                           for layout, s in sorted(totals.items()))
        log(f"step {step}/{args.steps} loss {loss:.3f}  held-out {scores}  ({time.time() - start:.0f} s)")

    params = list(tower.parameters()) + list(head4.parameters()) + list(head2.parameters())
    fit(params, lambda *batch: loss_and_scores(*batch)[0], [g for _, *g in groups], args.steps, args.batch, args.lr,
        report)
    if args.save:
        tower.save_pretrained(args.save, safe_serialization=True)
        log(f"wrote {args.save}")


if __name__ == "__main__":
    sys.exit(main())
