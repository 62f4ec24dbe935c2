"""FILA's processor for Hugging Face transformers (remote code written by fila-train's export).

It prepares an image and a question exactly as FILA-train's data pipeline (`fila-data`) and
`fila generate` do, from the settings of the training run that fila-train's export writes to
`processor_config.json`:

- stage-1 models (`image_mode = "square"`): the image is padded to a square with the mean colour
  (LLaVA's expand2square) and resized to the ViT side and the ConvNeXt side; one view;
- stage-2 models (`image_mode = "tiled"`): the canvas is chosen by LLaVA-NeXT's
  select_best_resolution rule, the image resized keeping its aspect ratio (the tighter side
  fills the canvas, the other is rounded up) and centre-padded; the canvas is cut row-major into
  tiles, the global view is the padded canvas resized to one tile, and the ConvNeXt input is the
  original image resized and padded the same way onto canvas x 32/14;
- resizing is bicubic (Catmull-Rom, a = -0.5, support widened when downscaling) computed as
  fila-data computes it: 8-bit pixels, a horizontal pass rounded to 8 bits, then a vertical pass,
  with integer weights; the result equals fila-data's pixel for pixel;
- each tower's input is normalised with its own mean and standard deviation (float32);
- the prompt follows the run's template (`llama3`: begin-of-text, the user turn, the assistant
  header; `plain`: begin-of-text and the prompt), every text piece tokenised on its own, with one
  `<image>` id per visual token where the image marker stands (put before the prompt when it has
  none).

`processor(images=image, text=question, return_tensors="pt")` gives `input_ids`,
`attention_mask`, `pixel_values`, `hires_pixel_values` and `image_grids` for
`FilaForCausalLM.generate`; `processor.decode` turns the generated ids into the answer text as
`fila generate` prints it.
"""

import json
import math
import os

import numpy as np

PROCESSOR_CONFIG = "processor_config.json"
# Characters Rust's `str::trim` removes (Unicode White_Space); Python's `str.strip` also removes
# U+001C..U+001F, which fila-data keeps.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


# ---------------------------------------------------------------------------------------------
# Resizing: separable Catmull-Rom convolution on 8-bit pixels with 16-bit integer weights.


def _catmull_rom(x):
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _round_half_away(values):
    magnitude = np.abs(values)
    floor = np.floor(magnitude)
    return np.sign(values) * (floor + (magnitude - floor >= 0.5))


def _weights(in_size, out_size):
    """Integer weights `[out_size, in_size]` and their precision (fractional bits) for one axis."""
    support = 2.0
    scale = float(in_size) / float(out_size)
    filter_scale = max(scale, 1.0)
    radius = support * filter_scale
    recip = 1.0 / filter_scale
    rows = []
    for out_x in range(out_size):
        in_center = 0.0 + (out_x + 0.5) * scale
        x_min = int(max(math.floor(in_center - radius), 0.0))
        x_max = int(min(math.ceil(in_center + radius), float(in_size)))
        center = in_center - 0.5
        values = [_catmull_rom((x - center) * recip) for x in range(x_min, x_max)]
        total = 0.0
        for v in values:
            total += v
        if total != 0.0:
            values = [v / total for v in values]
        rows.append((x_min, values))
    max_weight = max(max(v for _, values in rows for v in values), 0.0)
    precision = 0
    for bits in range(22):
        precision = bits
        if round_half_away_scalar(max_weight * float(1 << (bits + 1))) >= (1 << 15):
            break
    dense = np.zeros((out_size, in_size), dtype=np.float64)
    factor = float(1 << precision)
    for out_x, (start, values) in enumerate(rows):
        if values:
            ints = np.clip(_round_half_away(np.array(values, dtype=np.float64) * factor), -32768, 32767)
            dense[out_x, start : start + len(values)] = ints
    return dense, precision


def round_half_away_scalar(x):
    magnitude = abs(x)
    floor = math.floor(magnitude)
    value = floor + (1 if magnitude - floor >= 0.5 else 0)
    return int(value if x >= 0 else -value)


_WEIGHTS = {}


def _cached_weights(in_size, out_size):
    key = (in_size, out_size)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = _weights(in_size, out_size)
    return _WEIGHTS[key]


def _apply(weights, precision, src):
    """`src` `[in, N]` (float64 holding 8-bit values) -> 8-bit `[out, N]`."""
    acc = weights @ src + float(1 << (precision - 1))
    return np.clip(np.floor(acc / float(1 << precision)), 0, 255)


def resize(image, width, height):
    """Resize an 8-bit RGB array `[h, w, 3]` to `[height, width, 3]`: horizontal pass, then vertical."""
    h, w, _ = image.shape
    if (w, h) == (width, height):
        return image.copy()
    out = image.astype(np.float64)
    if w != width:
        weights, precision = _cached_weights(w, width)
        out = _apply(weights, precision, out.transpose(1, 0, 2).reshape(w, h * 3)).reshape(width, h, 3).transpose(1, 0, 2)
    if h != height:
        weights, precision = _cached_weights(h, height)
        out = _apply(weights, precision, np.ascontiguousarray(out).reshape(h, width * 3)).reshape(height, width, 3)
    return np.ascontiguousarray(out).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Geometry.


def select_canvas(width, height, canvases):
    """Index of the canvas (w, h) LLaVA-NeXT's select_best_resolution picks."""
    original = width * height
    best, best_effective, best_wasted = 0, 0, None
    for i, (cw, ch) in enumerate(canvases):
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), original)
        wasted = max(cw * ch - effective, 0)
        if effective > best_effective or (effective == best_effective and (best_wasted is None or wasted < best_wasted)):
            best, best_effective, best_wasted = i, effective, wasted
    return best


def fit_and_center(width, height, canvas_w, canvas_h):
    """(content w, content h, offset x, offset y) of LLaVA-NeXT's resize_and_pad_image."""
    scale_w = canvas_w / width
    scale_h = canvas_h / height
    if scale_w < scale_h:
        cw, ch = canvas_w, min(max(math.ceil(height * scale_w), 1), canvas_h)
    else:
        cw, ch = min(max(math.ceil(width * scale_h), 1), canvas_w), canvas_h
    return cw, ch, (canvas_w - cw) // 2, (canvas_h - ch) // 2


def pad(content, canvas_w, canvas_h, offset_x, offset_y, fill):
    out = np.empty((canvas_h, canvas_w, 3), dtype=np.uint8)
    out[:] = np.array(fill, dtype=np.uint8)
    h, w, _ = content.shape
    out[offset_y : offset_y + h, offset_x : offset_x + w] = content
    return out


class _Normaliser:
    """8-bit value -> ((v / 255) - mean) / std in float32, per channel."""

    def __init__(self, norm):
        mean = np.array(norm["mean"], dtype=np.float32)
        std = np.array(norm["std"], dtype=np.float32)
        levels = np.arange(256, dtype=np.float32)[:, None]
        self.table = ((levels / np.float32(255.0)) - mean[None, :]) / std[None, :]  # [256, 3]

    def __call__(self, pixels):
        """`[h, w, 3]` uint8 -> `[3, h, w]` float32."""
        out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)
        for c in range(3):
            out[c] = self.table[pixels[:, :, c], c]
        return out


# ---------------------------------------------------------------------------------------------


class FilaProcessor:
    """Image and text preprocessing of a FILA checkpoint; `tokenizer` is its PreTrainedTokenizerFast."""

    def __init__(self, settings, tokenizer, text_backend=None):
        self.settings = settings
        self.tokenizer = tokenizer
        self.backend = text_backend if text_backend is not None else getattr(tokenizer, "_tokenizer", None)
        g = settings["geometry"]
        self.tile = g["tile_size"]
        self.patch = g["patch_size"]
        num, den = g["hires_factor"]
        self.grid = self.tile // self.patch
        self.hires_tile = self.tile * num // den
        self.square_vit = g["square_vit_size"]
        self.square_hires = g["square_hires_size"]
        self.canvases = [tuple(c) for c in g["canvases"]]  # (columns, rows)
        self.vit_norm = _Normaliser(settings["vit_norm"])
        self.hires_norm = _Normaliser(settings["hires_norm"])
        self.square_fill = list(settings["square_pad_color"])
        self.canvas_fill = list(settings["canvas_pad_color"])
        self.image_marker = settings["image_marker"]
        self.image_token_id = int(settings["image_token_id"])
        self.pad_token_id = int(settings.get("pad_token_id", 0))
        self.stop_token_ids = [int(i) for i in settings.get("stop_token_ids", [])]
        self.padding_side = "left"

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """Called by AutoProcessor for remote code; the folder's auto_map already names this class."""
        cls._auto_class = auto_class

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from transformers import PreTrainedTokenizerFast

        path = str(path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, allow_patterns=["*.json", "*.py"])
        with open(os.path.join(path, PROCESSOR_CONFIG)) as f:
            settings = json.load(f)
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"), **_tokenizer_kwargs(path))
        backend = None
        try:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        except ImportError:
            pass
        return cls(settings, tokenizer, backend)

    def save_pretrained(self, path, **kwargs):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, PROCESSOR_CONFIG), "w") as f:
            json.dump(self.settings, f, indent=2)
        self.tokenizer.save_pretrained(path)

    # -- images ---------------------------------------------------------------------------------

    @staticmethod
    def to_rgb_array(image):
        """A PIL image, a path or an `[h, w, 3]` uint8 array -> `[h, w, 3]` uint8."""
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image

            with Image.open(image) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        if hasattr(image, "convert"):
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError("images must be PIL images, paths or [h, w, 3] uint8 arrays")
        return array

    def visual_tokens(self, width, height):
        if self.settings["image_mode"] == "square":
            side = self.square_vit // self.patch
            return side * side
        cols, rows = self.canvases[self.canvas_index(width, height)]
        return (1 + cols * rows) * self.grid * self.grid

    def canvas_index(self, width, height):
        sizes = [(cols * self.tile, rows * self.tile) for cols, rows in self.canvases]
        return select_canvas(width, height, sizes)

    def process_image(self, image):
        """(views `[n, 3, t, t]`, hires `[3, H, W]`, grid (rows, cols, tiled)) as float32 arrays."""
        pixels = self.to_rgb_array(image)
        if self.settings["image_mode"] == "square":
            return self._square(pixels)
        return self._tiled(pixels)

    def _square(self, pixels):
        h, w, _ = pixels.shape
        side = max(w, h)
        square = pixels if w == h else pad(pixels, side, side, (side - w) // 2, (side - h) // 2, self.square_fill)
        vit = resize(square, self.square_vit, self.square_vit)
        hires = resize(square, self.square_hires, self.square_hires)
        return self.vit_norm(vit)[None], self.hires_norm(hires), (1, 1, 0)

    def _tiled(self, pixels):
        h, w, _ = pixels.shape
        cols, rows = self.canvases[self.canvas_index(w, h)]
        t = self.tile
        canvas_w, canvas_h = cols * t, rows * t
        cw, ch, ox, oy = fit_and_center(w, h, canvas_w, canvas_h)
        canvas = pad(resize(pixels, cw, ch), canvas_w, canvas_h, ox, oy, self.canvas_fill)
        views = [self.vit_norm(resize(canvas, t, t))]
        for row in range(rows):
            for col in range(cols):
                views.append(self.vit_norm(canvas[row * t : (row + 1) * t, col * t : (col + 1) * t]))
        hires_w, hires_h = cols * self.hires_tile, rows * self.hires_tile
        cw, ch, ox, oy = fit_and_center(w, h, hires_w, hires_h)
        hires = pad(resize(pixels, cw, ch), hires_w, hires_h, ox, oy, self.canvas_fill)
        return np.stack(views), self.hires_norm(hires), (rows, cols, 1)

    # -- text -----------------------------------------------------------------------------------

    def _token_id(self, name):
        if self.backend is not None:
            found = self.backend.token_to_id(name)
        else:
            found = self.tokenizer.convert_tokens_to_ids(name)
        if found is None:
            raise ValueError(f"the tokenizer has no token `{name}`")
        return int(found)

    def _tokenize(self, text):
        if not text:
            return []
        if self.backend is not None:
            return list(self.backend.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, prompt, visual_tokens):
        """Ids of `prompt` up to where the answer begins; `visual_tokens[i]` ids for image i."""
        s = self.settings
        ids = []
        placed = [0]

        def text(piece):
            ids.extend(self._tokenize(piece))

        def content(piece):
            parts = piece.split(self.image_marker)
            text(parts[0])
            for part in parts[1:]:
                k = placed[0]
                if k >= len(visual_tokens):
                    raise ValueError(f"marker {k + 1} has no image")
                ids.extend([self.image_token_id] * visual_tokens[k])
                placed[0] += 1
                text(part)

        def header(role):
            ids.append(self._token_id("<|start_header_id|>"))
            text(role)
            ids.append(self._token_id("<|end_header_id|>"))
            text("\n\n")

        if s.get("bos_token"):
            ids.append(self._token_id(s["bos_token"]))
        if s["template"] == "plain":
            content(prompt.strip(WHITESPACE))
        else:
            eot = self._token_id("<|eot_id|>")
            if s.get("system_prompt") is not None:
                header("system")
                text(s["system_prompt"])
                ids.append(eot)
            header("user")
            content(prompt.strip(WHITESPACE))
            ids.append(eot)
            header("assistant")
        if placed[0] != len(visual_tokens):
            raise ValueError(f"{placed[0]} `{self.image_marker}` marker(s) in the prompt for {len(visual_tokens)} image(s)")
        return ids

    # -- both -----------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, return_tensors=None, **kwargs):
        """One prompt per text (a string or a list); one image (or None) per prompt."""
        if text is None:
            raise ValueError("text is required (the question)")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if images is None:
            per_text = [None] * len(texts)
        elif single or not isinstance(images, (list, tuple)):
            per_text = [images] if single else [images] * len(texts)
        else:
            per_text = list(images)
        if len(per_text) != len(texts):
            raise ValueError(f"{len(per_text)} images for {len(texts)} prompts")
        rows, views, hires, grids = [], [], [], []
        for prompt, image in zip(texts, per_text):
            if image is None:
                rows.append(self.encode_prompt(prompt, []))
                continue
            v, x, grid = self.process_image(image)
            if self.image_marker not in prompt:
                prompt = f"{self.image_marker}\n{prompt}"
            rows.append(self.encode_prompt(prompt, [(1 + (grid[0] * grid[1] if grid[2] else 0)) * self.grid * self.grid]))
            views.append(v)
            hires.append(x[None])
            grids.append(grid)
        width = max(len(r) for r in rows)
        pad_id = self.pad_token_id if self.pad_token_id != self.image_token_id else self.pad_token_id + 1
        ids, mask = [], []
        for r in rows:
            fill = width - len(r)
            if self.padding_side == "left":
                ids.append([pad_id] * fill + r)
                mask.append([0] * fill + [1] * len(r))
            else:
                ids.append(r + [pad_id] * fill)
                mask.append([1] * len(r) + [0] * fill)
        data = {"input_ids": np.array(ids, dtype=np.int64), "attention_mask": np.array(mask, dtype=np.int64)}
        if views:
            data["pixel_values"] = np.concatenate(views, 0)
            same = all(x.shape == hires[0].shape for x in hires)
            data["hires_pixel_values"] = np.concatenate(hires, 0) if same else hires
            data["image_grids"] = np.array(grids, dtype=np.int64)
        return _batch(data, return_tensors)

    def decode(self, ids, skip_special_tokens=True, **kwargs):
        """The answer text of generated ids (stop tokens dropped), as `fila generate` prints it."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        kept = [int(i) for i in ids if int(i) not in self.stop_token_ids]
        if self.backend is not None:
            return self.backend.decode(kept, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(kept, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens=True, **kwargs):
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "hires_pixel_values", "image_grids"]


def _tokenizer_kwargs(path):
    """Special tokens named by tokenizer_config.json."""
    file = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        config = json.load(f)
    keys = ("bos_token", "eos_token", "pad_token", "model_max_length", "clean_up_tokenization_spaces")
    return {k: config[k] for k in keys if k in config}


def _batch(data, return_tensors):
    from transformers import BatchFeature

    if return_tensors == "pt":
        import torch

        data = {k: ([torch.from_numpy(x) for x in v] if isinstance(v, list) else torch.from_numpy(v)) for k, v in data.items()}
    elif return_tensors not in (None, "np"):
        raise ValueError(f"return_tensors={return_tensors!r}: use 'pt' or 'np'")
    return BatchFeature(data=data)


__all__ = ["FilaProcessor"]
