#!/usr/bin/env python3
"""Generate the small parity fixtures used by the Rust tests of `fila-model`.

What it writes (under crates/fila-model/tests/fixtures/):

  clip/        a whole tiny `CLIPModel` (vision + text towers) + vision-tower reference
               outputs, a probe loss and its gradients
  clip_gelu/   a bare tiny `CLIPVisionModel` with hidden_act="gelu" (tests the key prefix
               this transformers version writes and the exact-GELU path)
  convnext/    a tiny `ConvNextForImageClassification` + stage outputs, a probe loss and
               its gradients (non-square input)
  llama/       a tiny `LlamaForCausalLM` (GQA, llama3 RoPE scaling, untied head), saved
               in several shards with `model.safetensors.index.json`, + logits, hidden
               states, the masked causal-LM loss and its gradients
  llama_tied/  a tiny single-file `LlamaForCausalLM` with tied embeddings, + logits
  README.md    what each fixture holds, how to regenerate, versions, tolerance

Every fixture directory holds `config.json` and the weights exactly as Hugging Face's
`save_pretrained(..., safe_serialization=True)` writes them, `reference.safetensors`
(inputs and outputs, float32 contiguous, integer inputs int64) and `meta.json`
(versions, inputs, loss definition, notes, tensor shapes).

Nothing is downloaded: every model is built from a config object under a fixed seed.
Weights that initialise to constants (norm weights/biases, biases, layer scales) are
randomised so that a wrong mapping cannot pass by accident, and weight matrices are
re-drawn with std 1/sqrt(fan_in) so attention is far from uniform.

Run from the repository root (needs torch, transformers, safetensors, numpy):

    python scripts/gen_parity_fixtures.py

Re-running with the same library versions reproduces the same files.
"""

import copy
import json
import math
import os
import platform
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
import safetensors
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextForImageClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_ROOT = os.path.join(REPO_ROOT, "crates", "fila-model", "tests", "fixtures")
SEED = 20241211
TOLERANCE = 1e-4
REGEN_CMD = "python scripts/gen_parity_fixtures.py"

VERSIONS = {
    "transformers": transformers.__version__,
    "torch": torch.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
}


# --------------------------------------------------------------------------- helpers


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def fresh_dir(name):
    path = os.path.join(OUT_ROOT, name)
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def is_norm(module):
    cls = type(module).__name__
    return isinstance(module, torch.nn.LayerNorm) or cls.endswith("LayerNorm") or cls.endswith("RMSNorm")


@torch.no_grad()
def randomise(model, embedding_std=1.0):
    """Overwrite every parameter with seeded random values.

    * Linear / Conv weights: normal(0, 1/sqrt(fan_in)).
    * Embedding tables: normal(0, embedding_std).
    * Norm weights: 1 + 0.1*randn; every bias: 0.1*randn.
    * ConvNeXt layer scale: 0.5 + 0.1*randn; CLIP class embedding: randn.
    Returns the names of parameters that none of the rules touched (should be few).
    """
    touched = set()
    for _, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            w = params["weight"]
            fan_in = w[0].numel()
            w.copy_(torch.randn_like(w) / math.sqrt(fan_in))
            touched.add(id(w))
        elif isinstance(module, torch.nn.Embedding):
            w = params["weight"]
            w.copy_(torch.randn_like(w) * embedding_std)
            touched.add(id(w))
        elif is_norm(module) and "weight" in params:
            w = params["weight"]
            w.copy_(1.0 + 0.1 * torch.randn_like(w))
            touched.add(id(w))
        for pname, p in params.items():
            if pname == "bias":
                p.copy_(0.1 * torch.randn_like(p))
                touched.add(id(p))
            elif "layer_scale" in pname:
                p.copy_(0.5 + 0.1 * torch.randn_like(p))
                touched.add(id(p))
            elif pname == "class_embedding":
                p.copy_(torch.randn_like(p))
                touched.add(id(p))
    return [n for n, p in model.named_parameters() if id(p) not in touched]


def f32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def i64(t):
    return t.detach().to(torch.int64).contiguous().clone()


def saved_keys(dirpath):
    """Map of every tensor key in the saved weight files -> (shape, dtype, file)."""
    out = {}
    for fname in sorted(os.listdir(dirpath)):
        if not fname.endswith(".safetensors") or fname == "reference.safetensors":
            continue
        with safe_open(os.path.join(dirpath, fname), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = {"shape": list(sl.get_shape()), "dtype": sl.get_dtype(), "file": fname}
    return dict(sorted(out.items()))


def write_reference(dirpath, tensors):
    for k, v in tensors.items():
        assert v.is_contiguous(), k
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    save_file(tensors, os.path.join(dirpath, "reference.safetensors"), metadata={"format": "pt"})
    return {
        k: {
            "shape": list(v.shape),
            "dtype": str(v.dtype).replace("torch.", ""),
            "max_abs": float(v.abs().max()) if v.dtype == torch.float32 else int(v.abs().max()),
        }
        for k, v in tensors.items()
    }


def write_meta(dirpath, meta):
    meta = {"versions": VERSIONS, "seed": SEED, "tolerance_abs_f32": TOLERANCE,
            "regenerate": REGEN_CMD, **meta}
    with open(os.path.join(dirpath, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=False)
        f.write("\n")


def grads_of(model, names, cast=True):
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    assert not missing, f"parameters not found: {missing}"
    return {f"grad.{n}": (f32(params[n].grad) if cast else params[n].grad.detach().clone()) for n in names}


def check_in_file(keys, names):
    missing = [n for n in names if n not in keys]
    assert not missing, f"not in the saved file: {missing}"


def probe_like(*shape):
    """A random probe scaled by 1/sqrt(numel): keeps a probe loss sum(x * probe) and its gradients
    O(1), so f32 rounding stays far below the 1e-4 test tolerance (plain randn probes made some
    gradients reach |g| ~ 200 with f32 rounding errors above 1e-4)."""
    return torch.randn(*shape) / math.sqrt(math.prod(shape))


def f64_diffs(model, run, ref32, *inputs):
    """Re-run `run` on a float64 copy of the model and inputs; return, per output name, the max
    |f32 reference - f64 result|: the rounding noise already present in the f32 reference."""
    m64 = copy.deepcopy(model).double()
    args = [x.double() if x.is_floating_point() else x for x in inputs]
    out64 = run(m64, *args)
    return {k: float((ref32[k].double() - v.double()).abs().max()) for k, v in out64.items()}


def module_eps(model):
    """eps of every norm module, grouped by value -> list of module names."""
    groups = {}
    for name, m in model.named_modules():
        if is_norm(m):
            eps = getattr(m, "eps", getattr(m, "variance_epsilon", None))
            groups.setdefault(repr(eps), []).append(name)
    return groups


# --------------------------------------------------------------------------- 1. clip


def gen_clip():
    seed_all(SEED + 1)
    config = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                           num_attention_heads=4, image_size=56, patch_size=14,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, pad_token_id=1, bos_token_id=97,
                         eos_token_id=98),
        projection_dim=8,
    )
    config._attn_implementation = "eager"
    model = CLIPModel(config).eval()
    untouched = randomise(model)
    d = fresh_dir("clip")
    model.config.save_pretrained(d)
    model.save_pretrained(d, safe_serialization=True)
    keys = saved_keys(d)

    grad_names = [
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.pre_layrnorm.weight",
        "vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "vision_model.encoder.layers.2.mlp.fc1.weight",
        "vision_model.encoder.layers.3.layer_norm2.bias",
    ]
    check_in_file(keys, grad_names)
    pixel_values = torch.randn(2, 3, 56, 56)
    probe = probe_like(2, 17, 32)
    probe2 = probe_like(2, 17, 32)

    def run(m, pixel_values, probe, probe2):
        px = pixel_values.clone().requires_grad_(True)
        out = m.vision_model(pixel_values=px, output_hidden_states=True)
        hs = out.hidden_states
        assert len(hs) == 6, len(hs)
        loss = (out.last_hidden_state * probe).sum() + (hs[4] * probe2).sum()
        m.zero_grad()
        loss.backward()
        res = {f"hidden.{i}": h.detach() for i, h in enumerate(hs)}
        res["last_hidden_state"] = out.last_hidden_state.detach()
        res["pooler_output"] = out.pooler_output.detach()
        res["loss"] = loss.detach().reshape(1)
        res.update({k: v for k, v in grads_of(m, grad_names, cast=False).items()})
        res["grad.pixel_values"] = px.grad.detach()
        return res

    res = run(model, pixel_values, probe, probe2)
    with torch.no_grad():
        vm = model.vision_model
        emb = vm.pre_layrnorm(vm.embeddings(pixel_values))
        hs0_is_pre_ln = bool(torch.allclose(emb, res["hidden.0"], atol=1e-6, rtol=0))
        last_is_hs5 = bool(torch.equal(res["last_hidden_state"], res["hidden.5"]))
        pool = vm.post_layernorm(res["last_hidden_state"][:, 0])
        pooler_is_post_ln_cls = bool(torch.allclose(pool, res["pooler_output"], atol=1e-6))
    ref = {"pixel_values": f32(pixel_values)}
    for k in [f"hidden.{i}" for i in range(6)] + ["last_hidden_state", "pooler_output"]:
        ref[k] = f32(res[k])
    ref["probe"] = f32(probe)
    ref["probe2"] = f32(probe2)
    ref["loss"] = f32(res["loss"])
    for k in [f"grad.{n}" for n in grad_names] + ["grad.pixel_values"]:
        ref[k] = f32(res[k])
    diffs = f64_diffs(model, run, ref, pixel_values, probe, probe2)
    tensors = write_reference(d, ref)

    write_meta(d, {
        "fixture": "clip",
        "model_class": "CLIPModel",
        "run": "model.vision_model(pixel_values, output_hidden_states=True)",
        "inputs": ["pixel_values"],
        "attn_implementation": "eager",
        "loss": "(last_hidden_state * probe).sum() + (hidden_states[4] * probe2).sum()",
        "probes": "probe, probe2 = randn(shape) / sqrt(numel) (saved; the loss uses the saved values)",
        "f32_reference_vs_f64_max_abs_diff": diffs,
        "notes": [
            "hidden.i = hidden_states[i]; hidden.0 is the patch+class+position embeddings after "
            f"pre_layrnorm (checked: {hs0_is_pre_ln}); hidden.i (i>=1) is the output of encoder layer i "
            "(1-based), i.e. layers.(i-1) in the weight names.",
            f"last_hidden_state == hidden.5 (checked: {last_is_hs5}); it has NO post_layernorm.",
            f"pooler_output = post_layernorm(last_hidden_state[:, 0]) (checked: {pooler_is_post_ln_cls}).",
            "The weight file holds the whole CLIPModel: the Rust loader must ignore text_model.*, "
            "logit_scale, text_projection.weight and visual_projection.weight on purpose.",
            "vision_config is read from the 'vision_config' entry of config.json.",
            "Weights re-drawn after construction (see script docstring); parameters no rule touched: "
            + (", ".join(untouched) if untouched else "none"),
        ],
        "grad_params": grad_names,
        "reference_tensors": tensors,
        "weight_keys": keys,
        "weight_files": sorted(f for f in os.listdir(d) if f.endswith(".safetensors") and f != "reference.safetensors"),
    })
    return d


# --------------------------------------------------------------------------- 2. clip_gelu


def gen_clip_gelu():
    seed_all(SEED + 2)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, image_size=28, patch_size=14, hidden_act="gelu")
    config._attn_implementation = "eager"
    model = CLIPVisionModel(config).eval()
    untouched = randomise(model)
    d = fresh_dir("clip_gelu")
    model.config.save_pretrained(d)
    model.save_pretrained(d, safe_serialization=True)
    keys = saved_keys(d)
    prefixed = all(k.startswith("vision_model.") for k in keys)
    any_prefixed = any(k.startswith("vision_model.") for k in keys)

    pixel_values = torch.randn(1, 3, 28, 28)

    def run(m, pixel_values):
        with torch.no_grad():
            out = m(pixel_values=pixel_values, output_hidden_states=True)
        res = {f"hidden.{i}": h for i, h in enumerate(out.hidden_states)}
        res["last_hidden_state"] = out.last_hidden_state
        res["pooler_output"] = out.pooler_output
        return res

    res = run(model, pixel_values)
    assert len([k for k in res if k.startswith("hidden.")]) == 3
    tower = getattr(model, "vision_model", model)  # transformers 5: CLIPVisionModel is flat
    act = tower.encoder.layers[0].mlp.activation_fn
    module_layout = "CLIPVisionModel.vision_model.*" if tower is not model else "flat CLIPVisionModel.*"
    ref = {"pixel_values": f32(pixel_values)}
    ref.update({k: f32(v) for k, v in res.items()})
    diffs = f64_diffs(model, run, ref, pixel_values)
    tensors = write_reference(d, ref)
    write_meta(d, {
        "fixture": "clip_gelu",
        "f32_reference_vs_f64_max_abs_diff": diffs,
        "model_class": "CLIPVisionModel",
        "run": "model(pixel_values, output_hidden_states=True)",
        "inputs": ["pixel_values"],
        "attn_implementation": "eager",
        "keys_start_with_vision_model_prefix": prefixed,
        "any_key_has_vision_model_prefix": any_prefixed,
        "activation_module": f"{type(act).__module__}.{type(act).__name__}",
        "module_layout_in_memory": module_layout,
        "notes": [
            "Bare CLIPVisionModel saved by this transformers version: see "
            "keys_start_with_vision_model_prefix (transformers 4 writes 'vision_model.*', "
            "transformers 5 writes the keys without that prefix).",
            "hidden_act='gelu' is the exact (erf) GELU, not the tanh approximation.",
            "hidden.0 = embeddings after pre_layrnorm; hidden.i = output of encoder layer i (1-based); "
            "last_hidden_state == hidden.2 (no post_layernorm); pooler_output = post_layernorm(CLS).",
            "Parameters no randomisation rule touched: " + (", ".join(untouched) if untouched else "none"),
        ],
        "reference_tensors": tensors,
        "weight_keys": keys,
        "weight_files": sorted(f for f in os.listdir(d) if f.endswith(".safetensors") and f != "reference.safetensors"),
    })
    return d


# --------------------------------------------------------------------------- 3. convnext


def gen_convnext():
    seed_all(SEED + 3)
    config = ConvNextConfig(num_channels=3, patch_size=4, num_stages=4, hidden_sizes=[8, 16, 24, 32],
                            depths=[1, 1, 2, 1], hidden_act="gelu", layer_norm_eps=1e-6,
                            layer_scale_init_value=1e-6, drop_path_rate=0.0, num_labels=5,
                            image_size=128)
    model = ConvNextForImageClassification(config).eval()
    untouched = randomise(model)
    d = fresh_dir("convnext")
    model.config.save_pretrained(d)
    model.save_pretrained(d, safe_serialization=True)
    keys = saved_keys(d)

    grad_names = [
        "convnext.embeddings.patch_embeddings.weight",
        "convnext.embeddings.layernorm.weight",
        "convnext.encoder.stages.1.downsampling_layer.1.weight",
        "convnext.encoder.stages.2.layers.1.dwconv.weight",
        "convnext.encoder.stages.2.layers.1.layernorm.bias",
        "convnext.encoder.stages.3.layers.0.pwconv1.weight",
        "convnext.encoder.stages.3.layers.0.layer_scale_parameter",
    ]
    check_in_file(keys, grad_names)
    pixel_values = torch.randn(2, 3, 128, 96)
    stage_shapes = {1: (2, 8, 32, 24), 2: (2, 16, 16, 12), 3: (2, 24, 8, 6), 4: (2, 32, 4, 3)}
    probes = [probe_like(*stage_shapes[i]) for i in range(1, 5)]

    def run(m, pixel_values, *probes):
        px = pixel_values.clone().requires_grad_(True)
        out = m.convnext(pixel_values=px, output_hidden_states=True)
        hs = out.hidden_states
        assert len(hs) == 5, len(hs)
        loss = sum((hs[i] * probes[i - 1]).sum() for i in range(1, 5))
        m.zero_grad()
        loss.backward()
        res = {"stem": hs[0].detach()}
        res.update({f"stage.{i}": hs[i].detach() for i in range(1, 5)})
        res["last_hidden_state"] = out.last_hidden_state.detach()
        res["pooler_output"] = out.pooler_output.detach()
        res["loss"] = loss.detach().reshape(1)
        res["grad.pixel_values"] = px.grad.detach()
        res.update(grads_of(m, grad_names, cast=False))
        return res

    res = run(model, pixel_values, *probes)
    with torch.no_grad():
        stem = model.convnext.embeddings(pixel_values)
        stem_ok = bool(torch.allclose(stem, res["stem"], atol=1e-6))
        last_ok = bool(torch.equal(res["last_hidden_state"], res["stage.4"]))
        pool = model.convnext.layernorm(res["last_hidden_state"].mean(dim=(-2, -1)))
        pool_ok = bool(torch.allclose(pool, res["pooler_output"], atol=1e-6))
    ref = {"pixel_values": f32(pixel_values)}
    for k in ["stem"] + [f"stage.{i}" for i in range(1, 5)] + ["last_hidden_state", "pooler_output"]:
        ref[k] = f32(res[k])
    for i in range(1, 5):
        ref[f"probe.{i}"] = f32(probes[i - 1])
    for k in ["loss", "grad.pixel_values"] + [f"grad.{n}" for n in grad_names]:
        ref[k] = f32(res[k])
    diffs = f64_diffs(model, run, ref, pixel_values, *probes)
    tensors = write_reference(d, ref)

    # Which LayerNorms follow config.layer_norm_eps? Build a throw-away model with a distinctive
    # eps and look (numerically invisible at O(1) variance, but the Rust config mapping needs it).
    probe_cfg = ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], layer_norm_eps=1e-12)
    eps_probe = module_eps(ConvNextForImageClassification(probe_cfg))
    uses_config_eps = eps_probe.get(repr(1e-12), [])
    write_meta(d, {
        "fixture": "convnext",
        "f32_reference_vs_f64_max_abs_diff": diffs,
        "norms_following_config_layer_norm_eps": uses_config_eps,
        "norm_eps_when_config_layer_norm_eps_is_1e-12": eps_probe,
        "model_class": "ConvNextForImageClassification",
        "run": "model.convnext(pixel_values, output_hidden_states=True)",
        "inputs": ["pixel_values"],
        "loss": "sum over i=1..4 of (stage.i * probe.i).sum()",
        "probes": "probe.i = randn(shape of stage.i) / sqrt(numel) (saved; the loss uses the saved values)",
        "config_layer_norm_eps": config.layer_norm_eps,
        "norm_eps_by_module": module_eps(model),
        "notes": [
            f"stem = hidden_states[0] = embeddings (patchify conv + channels-first LayerNorm) (checked: {stem_ok}).",
            "stage.i = hidden_states[i] = output of stage i (1-based; weight names use stages.(i-1)); "
            "stage 1 has no downsampling layer, stages 2-4 start with "
            "downsampling_layer.0 (LayerNorm, channels-first) and downsampling_layer.1 (Conv2d k2 s2).",
            f"last_hidden_state == stage.4 (checked: {last_ok}).",
            f"pooler_output = convnext.layernorm(mean over H,W of last_hidden_state) (checked: {pool_ok}).",
            "LayerNorms that follow config.layer_norm_eps in this version: "
            + ", ".join(uses_config_eps) + "; every other LayerNorm has a fixed eps (see "
            "norm_eps_when_config_layer_norm_eps_is_1e-12). facebook/convnext-* configs say 1e-12.",
            "LayerNorms named 'layernorm' inside layers are channels-last (after permute); "
            "embeddings.layernorm and downsampling_layer.0 are channels-first (normalise over C per pixel).",
            "hidden_act='gelu' is the exact (erf) GELU. Input is non-square (H=128, W=96).",
            "classifier.* is in the weight file; the Rust side ignores it on purpose.",
            "Parameters no randomisation rule touched: " + (", ".join(untouched) if untouched else "none"),
        ],
        "grad_params": grad_names,
        "reference_tensors": tensors,
        "weight_keys": keys,
        "weight_files": sorted(f for f in os.listdir(d) if f.endswith(".safetensors") and f != "reference.safetensors"),
    })
    return d


# --------------------------------------------------------------------------- 4. llama


def llama3_inv_freq(theta, head_dim, factor, low, high, orig_max):
    """Own implementation of the llama3 RoPE frequency rule, returning the scaled inverse
    frequencies and a per-frequency classification (kept / smoothed / scaled)."""
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    low_wavelen = orig_max / low      # wavelengths above this are fully scaled
    high_wavelen = orig_max / high    # wavelengths below this are kept
    out, kinds = [], []
    for f in base.tolist():
        wl = 2 * math.pi / f
        if wl < high_wavelen:
            out.append(f)
            kinds.append("kept")
        elif wl > low_wavelen:
            out.append(f / factor)
            kinds.append("scaled")
        else:
            s = (orig_max / wl - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
            kinds.append("smoothed")
    return base, torch.tensor(out, dtype=torch.float64), kinds


def rope_check(theta, head_dim, factor, low, high, orig_max):
    base, scaled, kinds = llama3_inv_freq(theta, head_dim, factor, low, high, orig_max)
    return {
        "original_max_position_embeddings": orig_max,
        "head_dim": head_dim,
        "n_frequencies": head_dim // 2,
        "wavelengths": [round(2 * math.pi / f, 4) for f in base.tolist()],
        "classification": kinds,
        "n_kept": kinds.count("kept"),
        "n_smoothed": kinds.count("smoothed"),
        "n_scaled": kinds.count("scaled"),
        "n_changed": int((scaled != base).sum()),
        "inv_freq_unscaled": base.tolist(),
        "inv_freq_scaled": scaled.tolist(),
    }


def build_llama_config(orig_max):
    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": orig_max},
                  tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu")
    return LlamaConfig(**kwargs)


def save_sharded(model, d):
    """Save with the smallest of a few shard sizes that yields 2-4 shards."""
    for size in ["60KB", "100KB", "120KB", "150KB", "200KB"]:
        for f in os.listdir(d):
            if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".json")):
                os.remove(os.path.join(d, f))
        model.save_pretrained(d, safe_serialization=True, max_shard_size=size)
        shards = [f for f in os.listdir(d) if f.startswith("model-") and f.endswith(".safetensors")]
        if 2 <= len(shards) <= 4 and os.path.exists(os.path.join(d, "model.safetensors.index.json")):
            return size, sorted(shards)
    raise RuntimeError("no shard size gave 2-4 shards")


def gen_llama():
    head_dim, theta, factor, low, high = 16, 500000.0, 8.0, 1.0, 4.0
    requested = rope_check(theta, head_dim, factor, low, high, 16)
    orig_max = 16
    if not (requested["n_kept"] and requested["n_smoothed"] and requested["n_scaled"]):
        for cand in [24, 32, 40, 48, 56]:
            c = rope_check(theta, head_dim, factor, low, high, cand)
            # keep every frequency clear of a category boundary by >= 5 %
            wl = c["wavelengths"]
            margin_ok = all(abs(w - b) / b > 0.05 for w in wl for b in (cand / low, cand / high))
            if c["n_kept"] and c["n_smoothed"] and c["n_scaled"] and margin_ok:
                orig_max = cand
                break
        else:
            raise RuntimeError("no original_max_position_embeddings gives all three categories")
    chosen = rope_check(theta, head_dim, factor, low, high, orig_max)

    seed_all(SEED + 4)
    config = build_llama_config(orig_max)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    untouched = randomise(model)

    # compare our llama3 frequencies with the ones transformers actually uses
    hf_inv = model.model.rotary_emb.inv_freq.detach().to(torch.float64)
    hf_scale = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))
    rope_matches_hf = bool(torch.allclose(hf_inv, torch.tensor(chosen["inv_freq_scaled"], dtype=torch.float64),
                                          rtol=1e-6, atol=0))

    d = fresh_dir("llama")
    model.config.save_pretrained(d)
    shard_size, shards = save_sharded(model, d)
    keys = saved_keys(d)

    input_ids = torch.randint(0, 96, (2, 12), dtype=torch.int64)
    attention_mask = torch.ones(2, 12, dtype=torch.int64)
    attention_mask[1, 8:] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[attention_mask == 0] = -100

    grad_names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    check_in_file(keys, grad_names)

    def run(m, input_ids, attention_mask, labels):
        m.zero_grad()
        out = m(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        logits = out.logits
        # explicit shifted cross-entropy: logits at t predict labels at t+1
        shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1)
        loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="mean")
        loss.backward()
        res = {"logits": logits.detach(), "loss": loss.detach().reshape(1)}
        assert len(out.hidden_states) == 3, len(out.hidden_states)
        res.update({f"hidden.{i}": h.detach() for i, h in enumerate(out.hidden_states)})
        with torch.no_grad():
            embeds = m.model.embed_tokens(input_ids)
            res["inputs_embeds_logits"] = m(inputs_embeds=embeds, attention_mask=attention_mask).logits
        res.update(grads_of(m, grad_names, cast=False))
        return res

    res = run(model, input_ids, attention_mask, labels)
    n_targets = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        hf_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss_diff = float((hf_loss.detach().reshape(1) - res["loss"]).abs().max())
    assert loss_diff <= 1e-6, f"explicit loss {res['loss'].item()} vs HF {hf_loss.item()}"
    emb_diff = float((res["inputs_embeds_logits"] - res["logits"]).abs().max())

    # what is hidden_states[-1]? compare with the raw output of the last decoder layer
    captured = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("raw", (o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
        hook.remove()
        raw_last = captured["raw"]
        normed_last = model.model.norm(raw_last)
    last_is_normed = bool(torch.allclose(res["hidden.2"], normed_last, atol=1e-6))
    last_is_raw = bool(torch.allclose(res["hidden.2"], raw_last, atol=1e-6))
    if last_is_normed and not last_is_raw:
        hs_last_desc = ("hidden.2 = hidden_states[-1] = model.norm(output of decoder layer 1), i.e. the final "
                        "RMSNorm IS applied (== the input of lm_head).")
    elif last_is_raw and not last_is_normed:
        hs_last_desc = "hidden.2 = hidden_states[-1] = raw output of decoder layer 1 (final norm NOT applied)."
    else:
        hs_last_desc = f"hidden_states[-1]: normed={last_is_normed} raw={last_is_raw} (unexpected)"

    ref = {
        "input_ids": i64(input_ids),
        "attention_mask": i64(attention_mask),
        "labels": i64(labels),
        "logits": f32(res["logits"]),
        "loss": f32(res["loss"]),
    }
    for i in range(3):
        ref[f"hidden.{i}"] = f32(res[f"hidden.{i}"])
    ref["inputs_embeds_logits"] = f32(res["inputs_embeds_logits"])
    for n in grad_names:
        ref[f"grad.{n}"] = f32(res[f"grad.{n}"])
    diffs = f64_diffs(model, run, ref, input_ids, attention_mask, labels)
    tensors = write_reference(d, ref)

    write_meta(d, {
        "fixture": "llama",
        "f32_reference_vs_f64_max_abs_diff": diffs,
        "model_class": "LlamaForCausalLM",
        "run": "model(input_ids, attention_mask=attention_mask, output_hidden_states=True)",
        "inputs": ["input_ids", "attention_mask", "labels"],
        "attn_implementation": "eager",
        "loss": ("mean cross-entropy over targets != -100 with the causal shift: "
                 "F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), "
                 "ignore_index=-100, reduction='mean')"),
        "loss_n_targets": n_targets,
        "loss_abs_diff_vs_hf_outputs_loss": loss_diff,
        "inputs_embeds_logits_max_abs_diff_vs_logits": emb_diff,
        "hidden_states_last": hs_last_desc,
        "shard_size": shard_size,
        "shards": shards,
        "rope_llama3_check": {
            "requested_original_max_16": {k: v for k, v in requested.items()
                                          if k not in ("inv_freq_unscaled", "inv_freq_scaled")},
            "chosen": chosen,
            "chosen_differs_from_brief": orig_max != 16,
            "matches_transformers_inv_freq": rope_matches_hf,
            "transformers_attention_scaling": hf_scale,
            "config_json_rope_entries": {k: v for k, v in model.config.to_dict().items()
                                         if "rope" in k},
        },
        "notes": [
            "attention_mask: row 0 all ones; row 1 right-padded (positions 8..11 are 0).",
            "labels = input_ids with -100 at positions 0..3 of both rows and at the padded positions.",
            "logits at padded positions are what transformers computes: a padded query attends to the "
            "unpadded keys at or before it (padded keys get -inf). With right padding + causal masking the "
            "valid positions never see padded keys, so the mask changes ONLY the padded-position logits "
            "(by ~1 here): compare ALL positions, or an implementation that ignores the mask passes.",
            "Position ids are 0..11 for both rows (right padding, no position shift).",
            "hidden.0 = token embeddings; hidden.1 = output of decoder layer 0; " + hs_last_desc,
            "inputs_embeds_logits: logits of model(inputs_embeds=embed_tokens(input_ids), attention_mask).",
            "HF q_proj/k_proj weights use the rotate_half RoPE layout (first half / second half of each head).",
            "Weights re-drawn with std 1/sqrt(fan_in), embeddings std 1, so attention is far from uniform.",
            "Parameters no randomisation rule touched: " + (", ".join(untouched) if untouched else "none"),
        ],
        "grad_params": grad_names,
        "reference_tensors": tensors,
        "weight_keys": keys,
        "weight_files": sorted(f for f in os.listdir(d) if f.endswith(".safetensors") and f != "reference.safetensors"),
    })
    return d, chosen, requested, rope_matches_hf


# --------------------------------------------------------------------------- 5. llama_tied


def gen_llama_tied():
    seed_all(SEED + 5)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         attention_bias=False, mlp_bias=False, hidden_act="silu")
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    untouched = randomise(model)
    tied_in_memory = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    d = fresh_dir("llama_tied")
    model.config.save_pretrained(d)
    model.save_pretrained(d, safe_serialization=True)
    keys = saved_keys(d)

    input_ids = torch.randint(0, 50, (1, 7), dtype=torch.int64)
    attention_mask = torch.ones(1, 7, dtype=torch.int64)

    def run(m, input_ids, attention_mask):
        with torch.no_grad():
            return {"logits": m(input_ids=input_ids, attention_mask=attention_mask).logits}

    res = run(model, input_ids, attention_mask)
    ref = {"input_ids": i64(input_ids), "attention_mask": i64(attention_mask), "logits": f32(res["logits"])}
    diffs = f64_diffs(model, run, ref, input_ids, attention_mask)
    tensors = write_reference(d, ref)
    write_meta(d, {
        "fixture": "llama_tied",
        "f32_reference_vs_f64_max_abs_diff": diffs,
        "model_class": "LlamaForCausalLM",
        "run": "model(input_ids, attention_mask=attention_mask)",
        "inputs": ["input_ids", "attention_mask"],
        "attn_implementation": "eager",
        "tie_word_embeddings": True,
        "lm_head_tied_in_memory": bool(tied_in_memory),
        "lm_head_weight_in_saved_file": "lm_head.weight" in keys,
        "notes": [
            "Tied embeddings: lm_head uses model.embed_tokens.weight; the loader must tie them when "
            "lm_head.weight is absent from the file (see lm_head_weight_in_saved_file).",
            "No rope scaling, rope_theta = 10000, no GQA (4 heads, 4 kv heads), single weight file.",
            "Parameters no randomisation rule touched: " + (", ".join(untouched) if untouched else "none"),
        ],
        "reference_tensors": tensors,
        "weight_keys": keys,
        "weight_files": sorted(f for f in os.listdir(d) if f.endswith(".safetensors") and f != "reference.safetensors"),
    })
    return d


# --------------------------------------------------------------------------- README


def write_readme(rope):
    chosen = rope["chosen"]
    lines = f"""# Parity fixtures for `fila-model`

Tiny random Hugging Face models (built from config objects under a fixed seed; nothing was
downloaded), saved exactly as `save_pretrained(..., safe_serialization=True)` writes them, with
reference inputs/outputs computed by transformers.

Regenerate (from the repository root, needs `torch transformers safetensors numpy`):

    {REGEN_CMD}

Generated with transformers {VERSIONS['transformers']}, torch {VERSIONS['torch']},
safetensors {VERSIONS['safetensors']}, numpy {VERSIONS['numpy']}, Python {VERSIONS['python']} (CPU, float32).
Each `meta.json` repeats the versions and lists every reference tensor (shape, dtype, max |x|)
and every weight key in the saved files.

## Layout of every fixture directory

- `config.json`: the model's own config.
- `model.safetensors` (or shards + `model.safetensors.index.json`): weights as transformers saves them.
- `reference.safetensors`: inputs (float32; token ids/masks/labels int64) and outputs (float32).
- `meta.json`: versions, inputs, loss definition, notes, tensor list, weight keys.

All parameters were re-drawn after construction: weight matrices N(0, 1/fan_in), embedding
tables N(0, 1), norm weights 1 + 0.1·N(0,1), all biases 0.1·N(0,1), ConvNeXt layer scale
0.5 + 0.1·N(0,1), CLIP class embedding N(0,1). Constant-initialised parameters therefore cannot hide
a wrong mapping, and attention is far from uniform.

## Fixtures

### `clip/` — whole `CLIPModel` (vision 5 layers, width 32, 4 heads, patch 14, image 56, quick_gelu)
The file also holds `text_model.*`, `logit_scale`, `text_projection.weight`,
`visual_projection.weight`: the loader must ignore them on purpose. The vision config is the
`vision_config` entry of `config.json`. Run: `model.vision_model(pixel_values, output_hidden_states=True)`.
- `pixel_values` [2,3,56,56]; `hidden.0`..`hidden.5` [2,17,32] (`hidden.0` = embeddings after
  `pre_layrnorm`, `hidden.i` = output of encoder layer i, 1-based); `last_hidden_state` (= `hidden.5`,
  no post-LN); `pooler_output` [2,32] (= `post_layernorm` of the CLS token).
- Loss `(last_hidden_state*probe).sum() + (hidden.4*probe2).sum()`; `probe`, `probe2` (randn/sqrt(numel)), `loss` [1],
  `grad.pixel_values` and `grad.vision_model.*` for the parameters listed in `meta.json`.

### `clip_gelu/` — bare `CLIPVisionModel` (2 layers, width 32, 2 heads, image 28, exact GELU)
Tests the key prefix this transformers version writes for a bare vision model (`meta.json`:
`keys_start_with_vision_model_prefix`). `pixel_values` [1,3,28,28], `hidden.0..2`,
`last_hidden_state`, `pooler_output`.

### `convnext/` — `ConvNextForImageClassification` (dims 8-16-24-32, depths 1-1-2-1, exact GELU)
`classifier.*` is in the file and ignored by the Rust side. Input is non-square [2,3,128,96].
Run: `model.convnext(pixel_values, output_hidden_states=True)`.
- `stem` (= hidden_states[0]) [2,8,32,24]; `stage.1..4` (strides 4/8/16/32); `last_hidden_state`
  (= `stage.4`); `pooler_output` (= final LayerNorm of the spatial mean).
- Loss `sum_i (stage.i*probe.i).sum()`; `probe.1..4` (randn/sqrt(numel)), `loss` [1], `grad.pixel_values`, `grad.convnext.*`.
- LayerNorm eps: in this transformers version `config.layer_norm_eps` is used only by
  {rope['cnx_cfg_eps']}; every other ConvNeXt LayerNorm has a fixed eps 1e-6 (`meta.json`:
  `norms_following_config_layer_norm_eps`, `norm_eps_when_config_layer_norm_eps_is_1e-12`). This
  fixture's config says 1e-6; facebook/convnext-* configs say 1e-12.

### `llama/` — `LlamaForCausalLM` (2 layers, width 64, GQA 4/2 heads, head_dim 16, llama3 RoPE, untied)
Saved in {len(rope['shards'])} shards with `model.safetensors.index.json`.
RoPE: theta 500000, llama3 scaling factor 8, low/high freq factor 1/4,
original_max_position_embeddings {chosen['original_max_position_embeddings']}: of the 8 inverse
frequencies {chosen['n_kept']} kept, {chosen['n_smoothed']} smoothed, {chosen['n_scaled']} scaled
(details and the check against transformers' own `inv_freq` in `meta.json`).
- `input_ids`, `attention_mask` (row 1 right-padded, last 4 zero), `labels` (-100 at positions
  0..3 and at padding) [2,12] int64; `logits` [2,12,96]; `hidden.0..2` [2,12,64]; `inputs_embeds_logits`.
- Compare logits at ALL positions: with right padding the mask only changes the padded positions
  (a padded query attends to the unpadded keys at or before it).
- `loss` [1]: mean cross-entropy of `logits[:, :-1]` against `labels[:, 1:]`, ignore index -100
  (equal to transformers' `outputs.loss`); `grad.*` of that loss for the parameters in `meta.json`.
- {rope['hs_desc']}

### `llama_tied/` — `LlamaForCausalLM` with tied embeddings (1 layer, width 32, 4/4 heads, theta 10000)
Single file. `lm_head.weight` in the saved file: {rope['tied_has_head']}.
`input_ids`, `attention_mask` [1,7]; `logits` [1,7,50].

### `openclip_convnext/` — a whole tiny open_clip `CLIP` with a timm ConvNeXt trunk (OpenCLIP layout)
Written by `scripts/gen_openclip_convnext_fixture.py` (open_clip + timm, not transformers); what it
holds, its versions and its tolerance are in `openclip_convnext/README.md`.

## Tolerance

The Rust tests compare in f32 with an absolute tolerance of {TOLERANCE:g}. Reason: both sides compute in
f32 on the CPU, so the differences come only from summation order (matmul/conv blocking, softmax
and norm reductions). Measured: re-running every fixture in float64 from the same weights, the
largest |f32 reference - f64| over all reference tensors is {rope['max_noise']:.1e} ({rope['max_noise_at']});
per-tensor values are in `meta.json` (`f32_reference_vs_f64_max_abs_diff`). Probes are scaled by
1/sqrt(numel) to keep probe-loss gradients O(1) for this reason. Because all parameters are random,
mistakes show far above the tolerance (checked by hand with transformers 5.24.0): tanh instead of
erf GELU 6.5e-4, GELU instead of quick_gelu 6.7e-2, llama RoPE without llama3 scaling 0.86,
interleaved instead of rotate_half q/k layout 1.3, ignoring the attention mask 1.1 (padded positions
only). Not detectable: LayerNorm eps 1e-6 vs 1e-12 (~5e-6), so take eps from the config/code rules in
`convnext/meta.json`. `meta.json` also records max |x| of every tensor.

## Format facts seen with this transformers version

- Llama `config.json` has no top-level `rope_theta`/`rope_scaling`: both live in
  `rope_parameters` (`{{"rope_type": "llama3", "rope_theta": ..., "factor": ...}}`, or
  `{{"rope_type": "default", "rope_theta": ...}}`); it also writes `head_dim` and `dtype`.
  Checkpoints saved by transformers 4 (e.g. Meta-Llama-3-8B) use top-level `rope_theta` and
  `rope_scaling` instead: a config reader should accept both.
- A bare `CLIPVisionModel` is saved {rope['clip_prefix']}.
- `llama_tied/model.safetensors` {rope['tied_has_head_text']} `lm_head.weight`.
"""
    with open(os.path.join(OUT_ROOT, "README.md"), "w") as f:
        f.write(lines)


# --------------------------------------------------------------------------- main


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    print(f"transformers {VERSIONS['transformers']}  torch {VERSIONS['torch']}  "
          f"safetensors {VERSIONS['safetensors']}  numpy {VERSIONS['numpy']}  python {VERSIONS['python']}")
    os.makedirs(OUT_ROOT, exist_ok=True)

    gen_clip()
    gen_clip_gelu()
    gen_convnext()
    llama_dir, chosen, requested, matches = gen_llama()
    tied_dir = gen_llama_tied()

    with open(os.path.join(llama_dir, "meta.json")) as f:
        lmeta = json.load(f)
    with open(os.path.join(tied_dir, "meta.json")) as f:
        tmeta = json.load(f)
    noise, noise_at = 0.0, ""
    for name in ["clip", "clip_gelu", "convnext", "llama", "llama_tied"]:
        with open(os.path.join(OUT_ROOT, name, "meta.json")) as f:
            for k, v in json.load(f)["f32_reference_vs_f64_max_abs_diff"].items():
                if v > noise:
                    noise, noise_at = v, f"{name}/{k}"
    with open(os.path.join(OUT_ROOT, "clip_gelu", "meta.json")) as f:
        prefixed = json.load(f)["keys_start_with_vision_model_prefix"]
    with open(os.path.join(OUT_ROOT, "convnext", "meta.json")) as f:
        cnx_cfg_eps = ", ".join(f"`{n}`" for n in json.load(f)["norms_following_config_layer_norm_eps"])
    write_readme({"cnx_cfg_eps": cnx_cfg_eps, "chosen": chosen, "shards": lmeta["shards"], "hs_desc": lmeta["hidden_states_last"],
                  "tied_has_head": tmeta["lm_head_weight_in_saved_file"],
                  "tied_has_head_text": "holds" if tmeta["lm_head_weight_in_saved_file"] else "does NOT hold",
                  "clip_prefix": ("WITH the `vision_model.` key prefix" if prefixed
                                  else "WITHOUT the `vision_model.` key prefix (`embeddings.*`, `encoder.*`, "
                                       "`pre_layrnorm.*`, `post_layernorm.*`)"),
                  "max_noise": noise, "max_noise_at": noise_at})
    if noise > TOLERANCE / 10:
        print(f"WARNING: f32 rounding noise {noise:.1e} at {noise_at} is close to the tolerance {TOLERANCE:g}")
    for root, _, files in os.walk(OUT_ROOT):
        for fn in files:
            os.chmod(os.path.join(root, fn), 0o644)

    print(f"llama3 rope (orig_max=16): kept={requested['n_kept']} smoothed={requested['n_smoothed']} "
          f"scaled={requested['n_scaled']}; chosen orig_max={chosen['original_max_position_embeddings']}: "
          f"kept={chosen['n_kept']} smoothed={chosen['n_smoothed']} scaled={chosen['n_scaled']}; "
          f"matches transformers inv_freq: {matches}")
    total = 0
    for root, _, files in os.walk(OUT_ROOT):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    print(f"wrote {OUT_ROOT} ({total / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
