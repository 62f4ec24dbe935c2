#!/usr/bin/env python3
"""PIL + numpy reference tensors for fila-data's pixel test (crates/fila-data/tests/pixels.rs).

Generates a few small images (committed next to the outputs) and runs LLaVA's PIL pipeline on them
with the tiny geometry the test uses (tile 28, patch 14, ConvNeXt factor 32/14 -> 64 per tile,
stage 1 sizes 28 / 64, canvases 1x2 2x1 2x2 3x1 1x3 in tiles):
  stage 1: expand2square with int(255*CLIP mean), resize(BICUBIC) to 28 and 64;
  stage 2: select_best_resolution rule, resize_and_pad_image (BICUBIC, black, centred), tiles
           row-major, global = padded canvas resized to 28x28, hires = original resized and padded
           to canvas*64/28.
PIL's 8-bit outputs are stored losslessly as raw uint8 HWC (`<image>.<tensor>.u8`, shapes in
manifest.json); one normalised f32 tensor pins numpy's normalisation formula. Fixtures stay < 1 MB.

    python scripts/data_pil_reference.py
"""
import json
import pathlib

import numpy as np
from PIL import Image

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates/fila-data/tests/fixtures/pil"
TILE, HIRES_TILE = 28, 64
SQUARE_VIT, SQUARE_HIRES = 28, 64
CANVASES = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]  # (cols, rows)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def make_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1234)

    def pattern(w: int, h: int) -> np.ndarray:
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        r = 128 + 100 * np.sin(x / 3.0) * np.cos(y / 5.0)
        g = 255 * x / max(w - 1, 1)
        b = 255 * ((x // 4 + y // 4) % 2)  # checkerboard: sharp edges stress the filter
        img = np.stack([r, g, b], -1) + rng.normal(0, 12, (h, w, 3))
        return np.clip(np.round(img), 0, 255).astype(np.uint8)

    return {
        "wide_61x37.png": Image.fromarray(pattern(61, 37)),
        "tall_40x90.jpg": Image.fromarray(pattern(40, 90)),
        "big_150x100.png": Image.fromarray(pattern(150, 100)),
        "small_17x23.png": Image.fromarray(pattern(17, 23)),
    }


def expand2square(img: Image.Image, fill: tuple) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def choose_canvas(w: int, h: int) -> tuple[int, int]:
    best, best_eff, best_waste = None, -1, None
    for cols, rows in CANVASES:
        cw, ch = cols * TILE, rows * TILE
        s = min(cw / w, ch / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cols, rows), eff, waste
    return best


def resize_and_pad(img: Image.Image, cw: int, ch: int) -> Image.Image:
    w, h = img.size
    sw, sh = cw / w, ch / h
    if sw < sh:
        nw, nh = cw, min(int(np.ceil(h * sw)), ch)
    else:
        nw, nh = min(int(np.ceil(w * sh)), cw), ch
    out = Image.new("RGB", (cw, ch), (0, 0, 0))
    out.paste(img.resize((nw, nh), Image.BICUBIC), ((cw - nw) // 2, (ch - nh) // 2))
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {}
    fill = tuple(int(x * 255) for x in CLIP_MEAN.tolist())

    def save(name: str, tensor: str, img: Image.Image) -> None:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        (OUT / f"{name}.{tensor}.u8").write_bytes(arr.tobytes())
        manifest[name][tensor] = list(arr.shape)

    for name, img in make_images().items():
        path = OUT / name
        if name.endswith(".jpg"):
            img.save(path, quality=90)
        else:
            img.save(path)
        img = Image.open(path).convert("RGB")  # what a trainer decodes, JPEG loss included
        manifest[name] = {}
        save(name, "decoded", img)
        sq = expand2square(img, fill)
        save(name, "s1_vit", sq.resize((SQUARE_VIT, SQUARE_VIT), Image.BICUBIC))
        save(name, "s1_hires", sq.resize((SQUARE_HIRES, SQUARE_HIRES), Image.BICUBIC))
        cols, rows = choose_canvas(*img.size)
        manifest[name]["grid"] = [cols, rows]
        canvas = resize_and_pad(img, cols * TILE, rows * TILE)
        save(name, "s2_global", canvas.resize((TILE, TILE), Image.BICUBIC))
        for r in range(rows):
            for c in range(cols):
                box = (c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE)
                save(name, f"s2_tile{r * cols + c}", canvas.crop(box))
        save(name, "s2_hires", resize_and_pad(img, cols * HIRES_TILE, rows * HIRES_TILE))

    # numpy's normalisation, as CLIPImageProcessor does it: x / 255, minus mean, over std, CHW.
    first = next(iter(manifest))
    shape = manifest[first]["s1_vit"]
    arr = np.frombuffer((OUT / f"{first}.s1_vit.u8").read_bytes(), np.uint8).reshape(shape)
    norm = ((arr.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
    (OUT / f"{first}.s1_vit_normalized.f32").write_bytes(np.ascontiguousarray(norm, "<f4").tobytes())
    manifest[first]["s1_vit_normalized"] = list(norm.shape)
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1))
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
