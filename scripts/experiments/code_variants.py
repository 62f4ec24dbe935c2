"""Variants of the synthetic dataset's code questions, for the reading experiments (docs/reading-experiments.md).

Reads a stage-2 or held-out file of the built-in synthetic dataset (`fila data synth`) and writes
a copy whose code questions ask something simpler, with the images they need:

    python scripts/experiments/code_variants.py --mode one --data datasets/synth/generated/heldout.jsonl \\
        --out /tmp/one-char --layout normal --glyph-px 14

`--mode first`  "What is the first character of the code?", answered by the code's first character;
`--mode one`    the same, with every other character painted out of the image (one character per
                image; images rewritten into OUT/images, the others left out of OUT);
`--mode where`  "Where is the code?", answered by the third of the image (across and down) that
                holds the centre of `code_box`: `top left`, `top`, ..., `centre`, ..., `bottom right`.

`--only-code` keeps just the code turn of each record (records without one are dropped, and
counted). `--layout` and `--glyph-px` keep only images of that layout and glyph height. The output
file has the input's name; its records point at images relative to OUT (`--mode one`) or at the
input's folder (other modes: pass `image_folder` to the trainer accordingly). Needs numpy and
pillow. Deterministic: the painted pixels are drawn from a fixed seed.
"""

import argparse
import json
import os
import re
import sys

import numpy as np
from PIL import Image

CODE_QUESTION = re.compile(r"What code is written in the image\?|What is the code\?")
FIRST = "What is the first character of the code?"
WHERE = "Where is the code?"
INK_MAX = 90  # crates/fila-synth/src/scene.rs: code ink is below this in every channel
THIRDS_DOWN = ["top", "", "bottom"]
THIRDS_ACROSS = ["left", "", "right"]


def first_answer(record):
    """The answer to a record's first-character question, or None if it has none."""
    conv = record["conversations"]
    return next((conv[i + 1]["value"] for i in range(0, len(conv) - 1, 2) if conv[i]["value"].endswith(FIRST)), None)


def region(box, width, height):
    """The 3×3 region name of the centre of `box = [x, y, w, h]` in a `width × height` image."""
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    down, across = THIRDS_DOWN[min(int(3 * cy / height), 2)], THIRDS_ACROSS[min(int(3 * cx / width), 2)]
    return " ".join(p for p in (down, across) if p) or "centre"


def paint_out_all_but_first(pixels, box, glyph_px, rng):
    """Replaces the ink of every code character after the first with background pixels of the box.

    Glyphs are 5×7 cells at scale `k = glyph_px / 7`, `k` pixels apart (font.rs)."""
    x, y, w, h = box
    k = glyph_px // 7
    area = pixels[y:y + h, x:x + w]  # a view: painting writes into `pixels`
    ink = (area < INK_MAX).all(-1)
    later = np.zeros_like(ink)
    later[:, 5 * k + k // 2:] = True
    background = area[~ink]
    target = ink & later
    area[target] = background[rng.integers(0, len(background), target.sum())]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["first", "one", "where"], required=True)
    p.add_argument("--data", required=True, help="stage2_train.jsonl or heldout.jsonl of a synthetic dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--only-code", action="store_true", help="keep only the code turn of each record")
    p.add_argument("--layout", choices=["normal", "fine"], help="keep only images of this layout")
    p.add_argument("--glyph-px", type=int, help="keep only images with glyphs this many pixels tall")
    args = p.parse_args()
    folder = os.path.dirname(os.path.abspath(args.data))
    os.makedirs(os.path.join(args.out, "images") if args.mode == "one" else args.out, exist_ok=True)
    rng = np.random.default_rng(0)
    kept, skipped, painted = 0, {"layout or glyph size": 0, "no code question": 0}, set()
    lines = []
    for number, line in enumerate(open(args.data), 1):
        r = json.loads(line)
        if (args.layout and r["layout"] != args.layout) or (args.glyph_px and r["glyph_px"] != args.glyph_px):
            skipped["layout or glyph size"] += 1
            continue
        types = r["qtypes"] if "qtypes" in r else [r["qtype"]]
        if "code" not in types and args.only_code:
            skipped["no code question"] += 1
            continue
        conv = r["conversations"]
        image = os.path.join(folder, r["image"])
        if "code" in types:
            i = types.index("code")
            question, answer = conv[2 * i]["value"], conv[2 * i + 1]["value"]
            if not CODE_QUESTION.search(question):
                sys.exit(f"{args.data}:{number}: record {r['id']}: unknown code question {question!r}")
            if args.mode == "where":
                width, height = Image.open(image).size
                new_q, new_a = WHERE, region(r["code_box"], width, height)
            else:
                new_q, new_a = FIRST, answer[0]
            conv[2 * i]["value"], conv[2 * i + 1]["value"] = CODE_QUESTION.sub(new_q, question), new_a
            if args.mode == "where":  # scored as its own question type by `fila eval`
                types[i] = "where"  # `types` is the record's own `qtypes` list where it has one
                if "qtype" in r:
                    r["qtype"] = "where"
            if args.only_code:
                r["conversations"] = [{"from": "human", "value": "<image>\n" + new_q}, conv[2 * i + 1]]
                if "qtypes" in r:
                    r["qtypes"] = [types[i]]
        if args.mode == "one":
            name = "images/" + os.path.basename(r["image"])
            if name not in painted:
                pixels = np.array(Image.open(image).convert("RGB"))
                paint_out_all_but_first(pixels, r["code_box"], r["glyph_px"], rng)
                Image.fromarray(pixels).save(os.path.join(args.out, name))
                painted.add(name)
            r["image"] = name
        lines.append(json.dumps(r))
        kept += 1
    out = os.path.join(args.out, os.path.basename(args.data))
    with open(out, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    print(f"wrote {kept} records to {out} ({len(painted)} images painted); left out: "
          + ", ".join(f"{n} ({why})" for why, n in skipped.items()))


if __name__ == "__main__":
    main()
