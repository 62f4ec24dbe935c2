#!/usr/bin/env python3
"""Convert an OpenCLIP hub folder's `open_clip_pytorch_model.bin` to `open_clip_model.safetensors`.

FILA loads safetensors only. Hugging Face repositories of OpenCLIP models ship
`open_clip_pytorch_model.bin` (a PyTorch pickle) and, for many of them, also
`open_clip_model.safetensors`; download the safetensors file when it is there. When a repository
has the pickle only, convert it once:

    pip install torch safetensors
    python scripts/convert_openclip_to_safetensors.py models/CLIP-convnext_large_d_320

The pickle is read with `torch.load(..., weights_only=True)`, PyTorch's restricted unpickler that
accepts tensors and plain containers and refuses arbitrary objects, so converting an untrusted file
runs none of its code. Every tensor is written unchanged (names, shapes, dtype); the result is
checked by reading it back. The safetensors file goes beside the pickle, where the FILA loader looks
for it (`open_clip_model.safetensors`), and the pickle can then be deleted.
"""

import argparse
import os
import sys

import torch
from safetensors.torch import load_file, save_file

PICKLE = "open_clip_pytorch_model.bin"
SAFE = "open_clip_model.safetensors"


def state_dict_of(path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints wrap the weights; DDP prefixes every name with `module.`.
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        sys.exit(f"{path}: not a state dict of tensors")
    if all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    # safetensors refuses tensors that share storage; a copy of each keeps every name.
    return {k: v.detach().clone().contiguous() for k, v in checkpoint.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help=f"a downloaded OpenCLIP repository holding {PICKLE}")
    parser.add_argument("--force", action="store_true", help=f"overwrite an existing {SAFE}")
    args = parser.parse_args()
    source = os.path.join(args.folder, PICKLE)
    target = os.path.join(args.folder, SAFE)
    if not os.path.exists(source):
        sys.exit(f"{source} not found: download it with `huggingface-cli download REPO {PICKLE} --local-dir {args.folder}`")
    if os.path.exists(target) and not args.force:
        sys.exit(f"{target} exists already (use --force to write it again)")
    tensors = state_dict_of(source)
    tmp = target + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt", "converted_from": PICKLE})
    back = load_file(tmp)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    os.replace(tmp, target)
    trunk = sum(1 for k in tensors if k.startswith("visual.trunk."))
    print(f"wrote {target}: {len(tensors)} tensors ({trunk} under visual.trunk.)")


if __name__ == "__main__":
    main()
