#!/usr/bin/env python3
"""Generate the OpenCLIP ConvNeXt fixture of `fila-model`'s tests.

FILA and Mini-Gemini take their ConvNeXt from OpenCLIP's `convnext_large_d_320`
(`laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup`): a timm `convnext_large` trunk
inside a whole CLIP model, saved under timm names (`visual.trunk.stem.0.weight`, ...) beside a
projection head (`visual.head.mlp.*`) and a text tower. This script writes, under
crates/fila-model/tests/fixtures/openclip_convnext/:

  open_clip_model.safetensors   a tiny random open_clip `CLIP` whose vision tower is a timm
                                ConvNeXt (dims 8-16-24-32, depths 2-1-3-1), built by open_clip
                                itself, so every key name is the real one; `model.state_dict()`
                                saved as open_clip's `save_for_hf` saves it
  open_clip_config.json         `{"model_cfg": ..., "preprocess_cfg": ...}` as on the hub
  reference.safetensors         input, stem and stage outputs (Mini-Gemini's
                                `trunk.stem` then `trunk.stages[i]`), the pooled vector, a probe
                                loss over the four stages and the gradients of a few parameters
  convnext_large_d_320.keys.json
                                name, shape and dtype of every tensor in the REAL
                                `convnext_large_d_320` state dict (open_clip builds it with no
                                weights; nothing is downloaded), so the tests check the full-size
                                key layout without the 1.4 GB file
  meta.json                     versions, notes, tensor list, f32-vs-f64 check
  README.md                     the same in prose, with the tolerance and its reason

The tiny trunk is registered in timm under the name `convnext_fila_fixture`; the Rust side reads a
timm ConvNeXt's sizes from its tensors, not from the name.

Run from the repository root (needs torch, timm, open_clip_torch, safetensors, numpy):

    pip install torch timm open_clip_torch safetensors numpy
    python scripts/gen_openclip_convnext_fixture.py

Re-running with the same library versions reproduces the same files.
"""

import json
import math
import os
import platform
import shutil

import numpy as np
import open_clip
import safetensors
import timm
import torch
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.convnext import _create_convnext

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO_ROOT, "crates", "fila-model", "tests", "fixtures", "openclip_convnext")
SEED = 20241212
DIMS = (8, 16, 24, 32)
DEPTHS = (2, 1, 3, 1)
PIXELS = (1, 3, 64, 96)  # non-square, divisible by 32
REGEN_CMD = "python scripts/gen_openclip_convnext_fixture.py"

VERSIONS = {
    "open_clip": open_clip.__version__,
    "timm": timm.__version__,
    "torch": torch.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
}


@register_model
def convnext_fila_fixture(pretrained=False, **kwargs):
    # Built the way timm builds `convnext_large` (same factory and class), at test size.
    assert not pretrained
    return _create_convnext("convnext_fila_fixture", pretrained=False, depths=DEPTHS, dims=DIMS, **kwargs)


# open_clip's own config for the real model, with the trunk swapped for the tiny one and a tiny text
# tower; pool "" and proj "mlp" are what put `head.norm` in the trunk and `visual.head.mlp` beside it.
MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {
        "timm_model_name": "convnext_fila_fixture",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "mlp",
        "timm_drop": 0.0,
        "timm_drop_path": 0.0,
        "image_size": 64,
    },
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@torch.no_grad()
def randomise(model):
    """Seeded random values for every parameter, so that no constant init hides a wrong mapping:
    conv / linear weights N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.1 N, layer scale
    (`gamma`) 0.5 + 0.1 N, anything else (text embeddings, projections) N(0, 0.1)."""
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if leaf == "bias" or name.endswith("in_proj_bias"):
            p.copy_(0.1 * torch.randn_like(p))
        elif leaf == "gamma":
            p.copy_(0.5 + 0.1 * torch.randn_like(p))
        elif "norm" in type(owner).__name__.lower() and leaf == "weight":
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif p.ndim >= 2 and leaf.endswith("weight"):
            p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
        else:
            p.copy_(0.1 * torch.randn_like(p))


def run(trunk, pixel_values, probes, grad_names):
    """Mini-Gemini's ConvNeXt forward (stem, then each stage), the pooled vector and a probe loss."""
    px = pixel_values.clone()
    stem = trunk.stem(px)
    x, stages = stem, []
    for stage in trunk.stages:
        x = stage(x)
        stages.append(x)
    pooled = trunk.forward_head(trunk.forward_features(px), pre_logits=True)
    loss = sum((s * p).sum() for s, p in zip(stages, probes))
    trunk.zero_grad()
    loss.backward()
    params = dict(trunk.named_parameters())
    out = {"stem": stem, "pooler_output": pooled, "loss": loss.reshape(1)}
    out.update({f"stage.{i + 1}": s for i, s in enumerate(stages)})
    out.update({f"grad.visual.trunk.{n}": params[n].grad for n in grad_names})
    return {k: v.detach() for k, v in out.items()}


def real_key_manifest():
    """Every tensor of the full-size `convnext_large_d_320` state dict, built without weights."""
    model = open_clip.create_model("convnext_large_d_320", pretrained=None)
    state = model.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    return {k: list(v.shape) for k, v in state.items()}


def main():
    torch.manual_seed(SEED)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)

    model = open_clip.CLIP(**MODEL_CFG).eval()
    randomise(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, "open_clip_model.safetensors"))
    with open(os.path.join(OUT, "open_clip_config.json"), "w") as f:
        json.dump({
            "model_cfg": MODEL_CFG,
            "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
        }, f, indent=2)

    trunk = model.visual.trunk
    grad_names = [
        "stem.0.weight",
        "stem.1.bias",
        "stages.0.blocks.1.conv_dw.weight",
        "stages.1.downsample.0.weight",
        "stages.2.downsample.1.weight",
        "stages.2.blocks.2.mlp.fc1.weight",
        "stages.3.blocks.0.gamma",
    ]
    pixel_values = torch.randn(*PIXELS)
    with torch.no_grad():
        shapes = [tuple(s.shape) for s in run_shapes(trunk, pixel_values)]
    probes = [torch.randn(*s) / math.sqrt(float(np.prod(s))) for s in shapes]
    res = run(trunk, pixel_values, probes, grad_names)

    # The same computation in float64: how far f32 itself is from exact (the Rust tolerance's basis).
    trunk64 = open_clip.CLIP(**MODEL_CFG).eval()
    trunk64.load_state_dict(model.state_dict())
    trunk64 = trunk64.visual.trunk.double()
    res64 = run(trunk64, pixel_values.double(), [p.double() for p in probes], grad_names)
    f64_diff = {k: float((res[k].double() - res64[k]).abs().max()) for k in res}

    ref = {"pixel_values": pixel_values}
    ref.update({f"probe.{i + 1}": p for i, p in enumerate(probes)})
    ref.update(res)
    ref = {k: v.to(torch.float32).contiguous() for k, v in ref.items()}
    save_file(ref, os.path.join(OUT, "reference.safetensors"))

    manifest = real_key_manifest()
    with open(os.path.join(OUT, "convnext_large_d_320.keys.json"), "w") as f:
        # One tensor per line, so a diff after a library upgrade shows exactly what was renamed.
        f.write('{\n"model": "open_clip convnext_large_d_320 (laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup), float32",\n')
        f.write(f'"versions": {json.dumps(VERSIONS)},\n"tensors": {{\n')
        f.write(",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items()))
        f.write("\n}\n}\n")

    ignored = sorted({k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("visual.head") else "")
                      for k in state if not k.startswith("visual.trunk.")})
    meta = {
        "fixture": "openclip_convnext",
        "regenerate": REGEN_CMD,
        "versions": VERSIONS,
        "model": f"open_clip.CLIP({json.dumps(MODEL_CFG)}); trunk = timm ConvNeXt dims {list(DIMS)} depths {list(DEPTHS)}",
        "run": "stem = trunk.stem(px); stage.i = trunk.stages[i-1](stage.(i-1)) (Mini-Gemini's basic_forward); "
               "pooler_output = trunk.forward_head(trunk.forward_features(px), pre_logits=True) (avg pool, head.norm)",
        "loss": "sum over i=1..4 of (stage.i * probe.i).sum(); probe.i = randn / sqrt(numel)",
        "f32_reference_vs_f64_max_abs_diff": f64_diff,
        "notes": [
            "Weights are `model.state_dict()` of a real open_clip CLIP, as open_clip's save_for_hf writes "
            "open_clip_model.safetensors: trunk under visual.trunk.*, plus tensors FILA ignores on purpose: "
            + ", ".join(ignored) + ".",
            "timm's stem is Conv2d(k=s=4) then LayerNorm2d (stem.0, stem.1); stages 1-3 open with "
            "downsample.0 (LayerNorm2d) then downsample.1 (Conv2d k=s=2); stage 0 has no downsample. "
            "Blocks: conv_dw (7x7 depthwise), norm (channels-last LayerNorm), mlp.fc1, GELU (erf), mlp.fc2, gamma. "
            "Every LayerNorm has eps 1e-6; norm_pre is Identity; head.fc is Identity after open_clip's reset_classifier(0).",
            "The trunk's head.norm is the pooler norm; FILA and Mini-Gemini use the stage maps only.",
        ],
        "grad_params": ["visual.trunk." + n for n in grad_names],
        "reference_tensors": {k: list(v.shape) for k, v in ref.items()},
        "weight_keys": {k: list(v.shape) for k, v in state.items()},
    }
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    write_readme(f64_diff, ignored, len(manifest))
    for name in sorted(os.listdir(OUT)):
        print(f"{name}: {os.path.getsize(os.path.join(OUT, name))} bytes")
    print("max |f32 - f64|:", max(f64_diff.values()))


def write_readme(f64_diff, ignored, manifest_len):
    worst = max(f64_diff, key=f64_diff.get)
    text = f"""# `openclip_convnext/`: the OpenCLIP ConvNeXt layout at test size

FILA and Mini-Gemini take their ConvNeXt from OpenCLIP `convnext_large_d_320`
(`laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup`): a timm `convnext_large` trunk inside
a whole CLIP model. This folder holds the same thing at test size, built by open_clip itself (so the
key names are the real ones), and the full-size model's key list.

Regenerate from the repository root (needs `torch timm open_clip_torch safetensors numpy`):

    {REGEN_CMD}

Generated with open_clip {VERSIONS['open_clip']}, timm {VERSIONS['timm']}, torch {VERSIONS['torch']},
safetensors {VERSIONS['safetensors']}, numpy {VERSIONS['numpy']}, Python {VERSIONS['python']} (CPU, float32).

## Files

- `open_clip_model.safetensors`: `state_dict()` of `open_clip.CLIP` with a timm ConvNeXt trunk
  (dims {list(DIMS)}, depths {list(DEPTHS)}, patch 4, layer scale) registered as `convnext_fila_fixture`,
  `timm_pool = ""`, `timm_proj = "mlp"` as in `convnext_large_d_320`, and a 1-layer text tower. The
  trunk is under `visual.trunk.`; FILA ignores on purpose: {", ".join(ignored)}.
  All parameters are random (conv/linear N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.1 N,
  layer scale 0.5 + 0.1 N), so no constant init hides a wrong mapping.
- `open_clip_config.json`: `{{"model_cfg", "preprocess_cfg"}}` as on the hub (CLIP mean/std).
- `reference.safetensors`: `pixel_values` {list(PIXELS)} (non-square); `stem` = `trunk.stem(px)`;
  `stage.1..4` = each of `trunk.stages` in turn (Mini-Gemini's forward); `pooler_output` = average
  pool then `head.norm` (`trunk.forward_head(..., pre_logits=True)`); `probe.1..4` (randn/sqrt(numel)),
  `loss` = sum of (stage.i * probe.i).sum(), and `grad.visual.trunk.*` of that loss for 7 parameters.
- `convnext_large_d_320.keys.json`: name and shape of all {manifest_len} tensors of the real
  `convnext_large_d_320` state dict, from `open_clip.create_model("convnext_large_d_320")` (no
  weights downloaded), so a test checks the full-size layout without the 1.4 GB file.
- `meta.json`: versions, notes, shapes of every reference and weight tensor.

## timm facts the Rust side relies on (checked in timm {VERSIONS['timm']} `models/convnext.py`)

- Stem: `stem.0` Conv2d(k = s = 4), `stem.1` LayerNorm2d. Stages 1-3 open with `downsample.0`
  (LayerNorm2d) then `downsample.1` (Conv2d k = s = 2); stage 0 has no downsample.
- Block: `conv_dw` (7x7 depthwise), `norm` (channels-last LayerNorm), `mlp.fc1`, exact GELU,
  `mlp.fc2`, `gamma` (layer scale), residual. Every LayerNorm has eps 1e-6 (ConvNeXt-T..XL).
- `norm_pre` is Identity; the pooler norm is `head.norm`; open_clip resets `head.fc` to Identity,
  so a whole OpenCLIP file has no `visual.trunk.head.fc`.

## Tolerance

The Rust test compares in f32 with an absolute tolerance of 1e-4, as the other parity fixtures:
both sides compute in f32 on the CPU and differ only in summation order. Measured here: the same
computation in float64 differs from the f32 reference by at most {f64_diff[worst]:.1e} ({worst}).
"""
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(text)


def run_shapes(trunk, pixel_values):
    x = trunk.stem(pixel_values)
    for stage in trunk.stages:
        x = stage(x)
        yield x


if __name__ == "__main__":
    main()
