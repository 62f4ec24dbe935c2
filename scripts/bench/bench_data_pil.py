#!/usr/bin/env python3
"""The same preprocessing as fila-data's bench_preprocess example, with PIL + numpy, on one core.

Stage 1: open, RGB, expand2square (CLIP mean colour), resize BICUBIC to 336 and 768, normalise to
f32 CHW. Stage 2: LLaVA-NeXT canvas choice, resize_and_pad (BICUBIC), 336 tiles row-major, global
view (canvas resized to 336), ConvNeXt canvas at x32/14 from the original, all normalised f32 CHW.
Reads the JPEGs the Rust example wrote (run it first) so both decode the same files.

    OMP_NUM_THREADS=1 python scripts/bench/bench_data_pil.py [--dir /tmp/fila_bench_images] [--iters 5]
"""
import argparse
import math
import pathlib
import time

import numpy as np
from PIL import Image

TILE, HIRES_TILE = 336, 768
CANVASES = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
FILL = tuple(int(x * 255) for x in MEAN.tolist())


def normalise(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return np.ascontiguousarray(((arr - MEAN) / STD).transpose(2, 0, 1))


def expand2square(img):
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), FILL)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def choose(w, h):
    best, be, bw = None, -1, None
    for c, r in CANVASES:
        cw, ch = c * TILE, r * TILE
        s = min(cw / w, ch / h)
        e = min(int(w * s) * int(h * s), w * h)
        wa = cw * ch - e
        if e > be or (e == be and wa < bw):
            best, be, bw = (c, r), e, wa
    return best


def resize_and_pad(img, cw, ch):
    w, h = img.size
    if cw / w < ch / h:
        nw, nh = cw, min(math.ceil(h * cw / w), ch)
    else:
        nw, nh = min(math.ceil(w * ch / h), cw), ch
    out = Image.new("RGB", (cw, ch), (0, 0, 0))
    out.paste(img.resize((nw, nh), Image.BICUBIC), ((cw - nw) // 2, (ch - nh) // 2))
    return out


def stage1(path):
    img = Image.open(path).convert("RGB")
    sq = expand2square(img)
    return [normalise(sq.resize((TILE, TILE), Image.BICUBIC)), normalise(sq.resize((HIRES_TILE, HIRES_TILE), Image.BICUBIC))]


def stage2(path):
    img = Image.open(path).convert("RGB")
    c, r = choose(*img.size)
    canvas = resize_and_pad(img, c * TILE, r * TILE)
    views = [normalise(canvas.resize((TILE, TILE), Image.BICUBIC))]
    for y in range(r):
        for x in range(c):
            views.append(normalise(canvas.crop((x * TILE, y * TILE, (x + 1) * TILE, (y + 1) * TILE))))
    return [np.stack(views), normalise(resize_and_pad(img, c * HIRES_TILE, r * HIRES_TILE))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fila_bench_images")
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    d = pathlib.Path(a.dir)
    for name, fn in [("stage1", stage1), ("stage2", stage2)]:
        for size in ["1024x768", "2000x1500"]:
            paths = sorted(d.glob(f"bench_{size}_*.jpg"))
            assert paths, f"no bench_{size}_*.jpg in {d}: run the Rust example first"
            fn(paths[0])
            t = time.perf_counter()
            for _ in range(a.iters):
                for p in paths:
                    fn(p)
            n = a.iters * len(paths)
            print(f"{name} {size}: {n / (time.perf_counter() - t):7.1f} images/s on 1 core (PIL {Image.__version__})")
    for size in ["1024x768", "2000x1500"]:
        paths = sorted(d.glob(f"bench_{size}_*.jpg"))
        t = time.perf_counter()
        for _ in range(a.iters):
            for p in paths:
                Image.open(p).convert("RGB")
        print(f"decode only {size}: {a.iters * len(paths) / (time.perf_counter() - t):7.1f} images/s on 1 core")


if __name__ == "__main__":
    main()
