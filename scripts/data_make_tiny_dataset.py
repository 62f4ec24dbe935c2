#!/usr/bin/env python3
"""Write datasets/tiny: a handful of small images and LLaVA records (pretraining captions, multi-turn
instructions, one text-only record) for CPU demos and tests of the tiny configuration.

    python scripts/data_make_tiny_dataset.py
"""
import json
import pathlib

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent / "datasets/tiny"
SHAPES = [(48, 32), (32, 48), (40, 40), (90, 28), (28, 90), (120, 90), (64, 36), (20, 20)]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "grey"]


def main() -> None:
    rng = np.random.default_rng(7)
    (ROOT / "images").mkdir(parents=True, exist_ok=True)
    pretrain, instruct = [], []
    for i, ((w, h), colour) in enumerate(zip(SHAPES, COLOURS)):
        y, x = np.mgrid[0:h, 0:w]
        base = np.array(Image.new("RGB", (1, 1), colour).getpixel((0, 0)), dtype=np.float32)
        img = base * (0.6 + 0.4 * np.sin((x + 2 * y) / 5.0))[..., None] + rng.normal(0, 8, (h, w, 3))
        name = f"{i:02d}_{colour}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(ROOT / "images" / name)
        pretrain.append({"id": f"pre{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"A {colour} pattern of waves, {w} pixels wide and {h} high."}]})
        instruct.append({"id": f"ins{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the image?"},
            {"from": "gpt", "value": f"It is mostly {colour}."},
            {"from": "human", "value": "Is it wider than it is tall?"},
            {"from": "gpt", "value": "Yes." if w > h else "No."}]})
    instruct.append({"id": "text0", "conversations": [
        {"from": "human", "value": "What is the capital of France?"},
        {"from": "gpt", "value": "Paris."}]})
    with open(ROOT / "pretrain.jsonl", "w") as f:
        for r in pretrain:
            f.write(json.dumps(r) + "\n")
    (ROOT / "instruct.json").write_text(json.dumps(instruct, indent=1))
    print("wrote", ROOT)


if __name__ == "__main__":
    main()
