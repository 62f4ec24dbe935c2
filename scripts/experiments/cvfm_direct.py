"""Can a CVFM block pass the code's character when the loss asks it directly? A reading diagnostic.

Traces a FILA checkpoint's plain ViT (CVFM outputs zeroed in a temporary copy) and its ConvNeXt
with `fila forward` on records made by `scripts/experiments/code_variants.py --mode one` (or `first`), then
trains, in PyTorch, one fresh CVFM block as the project defines it (docs/model.md, "CVFM"; alignment
by pooling: stage 4 already lies on the ViT grid) at the last fusion point, the feature layer:
`h' = h + W_out · GELU(W_in · [LN(h) ; LN(c)])`, `W_out` starting at zero. Its output tokens are
mean-pooled over all views (what an LLM attending evenly would see) and a linear head names the
answer to "What is the first character of the code?". The same head on the plain ViT tokens is
the baseline. Steps, batch, optimiser and rate follow the tiny stage 2 (Adam 2e-3, batches of 4).

`--readout llm` replaces the pooled head by the checkpoint's projector and LLM (loaded into
transformers' Llama): the block's tokens go through the projector into the `<image>` positions of
the question in the llama3 template (the `input_ids` that `fila forward` traces), and all three
train on the answer and `<|eot_id|>` as stage 2 does (gradient norm clipped at 1). That is stage 2
of the one-character task re-implemented outside Burn, with fusion at the feature layer only.
Steps along that path: `--readout projector` puts the checkpoint's projector (trained) before the
pooled head; `--readout llm-one-token` gives the LLM one visual token, the mean of the projected
ones; `--copy-steps N` first teaches the LLM to copy (`scripts/experiments/copy_llm.py`), and `--freeze-llm`
keeps it fixed while the block and the projector train.

    python scripts/experiments/cvfm_direct.py --config configs/tiny/synth-stage2.toml \\
        --checkpoint checkpoints/synth-stage1/final --data /tmp/one-char/stage2_train.jsonl

Needs torch, safetensors, numpy, pillow (through code_variants); transformers and tokenizers for
`--readout llm`.
"""

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # scripts/: synth_labels, pretrain_tiny_towers

from code_variants import FIRST, first_answer
from copy_llm import copy_pretrain, load_llm
from probe_features import ROOT, traces
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


class CvfmBlock(torch.nn.Module):
    """One fresh CVFM block on aligned cells: `h + W_out · GELU(W_in · [LN(h) ; LN(c)])`, `W_out` zero."""

    def __init__(self, d, k):
        super().__init__()
        self.ln_h, self.ln_c, self.fc_in, self.fc_out = torch.nn.LayerNorm(d), torch.nn.LayerNorm(k), torch.nn.Linear(d + k, d), torch.nn.Linear(d, d)
        torch.nn.init.zeros_(self.fc_out.weight)
        torch.nn.init.zeros_(self.fc_out.bias)

    def forward(self, h, c):
        return h + self.fc_out(torch.nn.functional.gelu(self.fc_in(torch.cat([self.ln_h(h), self.ln_c(c)], -1))))


def checkpoint_projector(weights):
    """The checkpoint's MLP projector (Linear, GELU, ..., Linear) as a torch module."""
    layers = sorted({int(k.split(".")[2]) for k in weights if k.startswith("projector.layers.")})
    linears = [torch.nn.Linear(*weights[f"projector.layers.{i}.weight"].shape[::-1]) for i in layers]
    for i, lin in zip(layers, linears):
        lin.weight.data, lin.bias.data = (torch.from_numpy(weights[f"projector.layers.{i}.{n}"]) for n in ("weight", "bias"))
    return torch.nn.Sequential(*[m for lin in linears for m in (lin, torch.nn.GELU())][:-1])


def train(h, c, y, fit, fuse, steps, seed=0, projector=None):
    """(train, test) accuracy of the mean-pooled tokens' linear head, with or without a CVFM block,
    and with or without the checkpoint's projector (trained too) between the tokens and the pooling."""
    torch.manual_seed(seed)
    d = h[0].shape[-1]
    block = CvfmBlock(d, c[0].shape[-1])
    tail = projector if projector is not None else torch.nn.Identity()
    head = torch.nn.Linear(tail(torch.zeros(1, d)).shape[-1], len(CODE_ALPHABET))
    modules = [head, tail] + ([block] if fuse else [])
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=2e-3)

    def pooled(i):
        x = torch.from_numpy(h[i])
        if fuse:
            x = block(x, torch.from_numpy(c[i]))
        return tail(x.reshape(-1, d)).mean(0)

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


def train_through_llm(h, c, ids, answers, fit, steps, checkpoint, tokenizer, seed=0, one_token=False, copy_steps=0,
                      freeze_llm=False):
    """(train, test) accuracy of the first answer token when the block's tokens reach the answer
    through the checkpoint's projector and LLM, all three trained (stage 2 in PyTorch). With
    `one_token`, the `<image>` span shrinks to one position holding the mean of the projected tokens.
    With `copy_steps`, the LLM first learns to copy (`copy_llm.copy_pretrain`). With
    `freeze_llm`, only the block and the projector train in the stage-2 part."""
    from tokenizers import Tokenizer

    torch.manual_seed(seed)
    llm, weights, config = load_llm(checkpoint)
    image_id = config["image_token_id"]
    projector = checkpoint_projector(weights)
    d = h[0].shape[-1]
    block = CvfmBlock(d, c[0].shape[-1])
    tok = Tokenizer.from_file(tokenizer)
    answer_ids = [tok.token_to_id(a) for a in answers]
    eot = tok.token_to_id("<|eot_id|>")
    rng = np.random.default_rng(seed)
    if copy_steps:
        copied = copy_pretrain(llm, ids[:fit], image_id, tok, copy_steps, seed)
        print(f"  copy task after {copy_steps} steps of 32: {copied:.1%} of 500 fresh spans", flush=True)

    def logits(i, with_answer):
        x = block(torch.from_numpy(h[i]), torch.from_numpy(c[i]))
        seq = torch.from_numpy(ids[i])
        if with_answer:
            seq = torch.cat([seq, torch.tensor([answer_ids[i], eot])])
        visual = projector(x.reshape(-1, d))
        if one_token:
            later = (seq == image_id).nonzero()[1:, 0]
            seq = seq[torch.isin(torch.arange(len(seq)), later, invert=True)]
            visual = visual.mean(0, keepdim=True)
        places = (seq == image_id).nonzero()[:, 0]
        embeds = llm.model.embed_tokens(seq).index_put((places,), visual)
        return llm(inputs_embeds=embeds[None]).logits[0], seq

    params = [p for m in ((projector, block) if freeze_llm else (llm, projector, block)) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)
    for _ in range(steps):
        loss = 0
        for i in rng.integers(0, fit, 4):
            out, seq = logits(i, True)
            loss = loss + torch.nn.functional.cross_entropy(out[-3:-1], seq[-2:]) / 4
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    with torch.no_grad():
        right = np.array([logits(i, False)[0][-1].argmax().item() == answer_ids[i] for i in range(len(ids))])
    return right[:fit].mean(), right[fit:].mean()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the stage-2 config (tiled views)")
    p.add_argument("--checkpoint", required=True, help="a FILA checkpoint with the ConvNeXt branch")
    p.add_argument("--data", required=True, help="records from scripts/experiments/code_variants.py --mode one|first")
    p.add_argument("-n", type=int, default=1000, help="records with the question (3/4 fit, 1/4 test)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--readout", choices=["pooled", "projector", "llm", "llm-one-token"], default="pooled",
                   help="a linear head on the mean-pooled tokens (`projector`: on the checkpoint's projector's "
                        "output tokens), or the checkpoint's projector and LLM (`llm-one-token`: the LLM sees "
                        "one visual token, the mean of the projected ones)")
    p.add_argument("--copy-steps", type=int, default=0,
                   help="with --readout llm*: first train the LLM alone to copy a character (scripts/experiments/copy_llm.py)")
    p.add_argument("--freeze-llm", action="store_true", help="with --readout llm*: train only the block and the projector")
    p.add_argument("--fila", default=os.path.join(ROOT, "target", "release", "fila"))
    args = p.parse_args()
    folder = os.path.dirname(os.path.abspath(args.data))
    records = [r for r in map(json.loads, open(args.data)) if first_answer(r) is not None][: args.n]
    h, c, ids = [], [], []
    y = np.array([CODE_ALPHABET.index(first_answer(r)) for r in records])
    with tempfile.TemporaryDirectory() as plain:
        zeroed_copy(args.checkpoint, plain)
        for t in traces(args.fila, args.config, plain, [os.path.join(folder, r["image"]) for r in records], FIRST):
            layers = sorted(int(n.rsplit(".", 1)[1]) for n in t if n.startswith("vit.hidden."))
            h.append(t[f"vit.hidden.{layers[-1]}"][:, 1:])  # the feature layer's patch tokens
            c.append(view_cells(t["convnext.stage.4"][0]))
            ids.append(t["input_ids"][0].astype(np.int64))  # the question in the config's template
    fit = len(y) * 3 // 4
    print(f"{len(y)} records ({fit} fit, {len(y) - fit} test), {args.steps} steps of 4; chance 1/{len(CODE_ALPHABET)}")
    if args.readout.startswith("llm"):
        tokenizer = os.path.join(args.checkpoint, "tokenizer.json")
        one = args.readout == "llm-one-token"
        tr, te = train_through_llm(h, c, ids, [first_answer(r) for r in records], fit, args.steps, args.checkpoint,
                                   tokenizer, one_token=one, copy_steps=args.copy_steps,
                                   freeze_llm=args.freeze_llm)
        print(f"  CVFM block + projector + LLM{' (one visual token)' if one else ''}: train {tr:.1%}, test {te:.1%}")
        return
    projector = checkpoint_projector(load_file(os.path.join(args.checkpoint, "model.safetensors"))) \
        if args.readout == "projector" else None
    for fuse in (False, True):
        tr, te = train(h, c, y, fit, fuse, args.steps, projector=copy.deepcopy(projector))
        name = ("CVFM block" if fuse else "ViT tokens") + (" + projector" if projector is not None else "")
        print(f"  {name} + head: train {tr:.1%}, test {te:.1%}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
