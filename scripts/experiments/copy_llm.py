"""Teaches a FILA checkpoint's LLM to copy a character out of the `<image>` span. Reading experiment.

The quick start's tiny LLM starts from random weights and learns language and image together;
trained that way, the tiny FILA never learns to read a character (docs/reading-experiments.md).
Real FILA starts from a pretrained LLaMA-3, which can already copy what it attends to. This script
gives the tiny LLM that one skill, on text alone, in PyTorch (transformers' Llama): the stage-2
question "What is the first character of the code?" in the config's template, its `<image>` span
filled with random non-character tokens and one character, answered by that character. It writes a
copy of the checkpoint with the trained LLM; stage 2 then trains CVFM and the projector with this
LLM frozen (`scripts/experiments/reading_demo.sh`):

    python scripts/experiments/copy_llm.py --config configs/tiny/synth-stage2.toml \\
        --checkpoint /tmp/reading/stage1/final --data /tmp/reading/one/stage2_train.jsonl \\
        --out /tmp/reading/copy-llm

The questions' token ids are those `fila forward` feeds the LLM for records of `--data` (records
from `scripts/experiments/code_variants.py --mode one|first`), so the span lengths are those of the tiled views.
Needs torch, transformers, tokenizers, safetensors.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # scripts/: synth_labels, pretrain_tiny_towers

from code_variants import FIRST, first_answer
from probe_features import ROOT, traces
from synth_labels import CODE_ALPHABET


def load_llm(checkpoint):
    """(transformers Llama with the checkpoint's LLM weights, all the checkpoint's tensors, its config.json)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.load(open(os.path.join(checkpoint, "config.json")))
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config["llm"].items() if v is not None}, attn_implementation="eager"))
    llm.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items() if k.startswith(("model.", "lm_head."))})
    return llm, weights, config


def copy_pretrain(llm, ids, image_id, tokenizer, steps, seed, batch_size=32):
    """Trains `llm` alone on the questions `ids` (token id arrays) with their `<image>` span replaced by
    random non-character tokens and one character, answered by that character and `<|eot_id|>`
    (Adam 2e-3, gradient norm clipped at 1). Returns the copy accuracy on 500 fresh spans."""
    chars = torch.tensor([tokenizer.token_to_id(a) for a in CODE_ALPHABET])
    # Sorted: the vocabulary comes back in a different order in every process.
    others = torch.tensor(sorted(j for t, j in tokenizer.get_vocab().items() if j not in chars and not t.startswith("<")))
    eot = tokenizer.token_to_id("<|eot_id|>")
    gen = torch.Generator().manual_seed(seed)

    def batch(n):
        seq = torch.from_numpy(ids[torch.randint(len(ids), (1,), generator=gen).item()])
        span = (seq == image_id).nonzero()[:, 0]
        answer = chars[torch.randint(len(chars), (n,), generator=gen)]
        out = torch.cat([seq, torch.tensor([0, eot])]).repeat(n, 1)
        out[:, span] = others[torch.randint(len(others), (n, len(span)), generator=gen)]
        out[torch.arange(n), span[torch.randint(len(span), (n,), generator=gen)]] = answer
        out[:, -2] = answer
        return out

    opt = torch.optim.Adam(llm.parameters(), lr=2e-3)
    for _ in range(steps):
        b = batch(batch_size)
        out = llm(input_ids=b).logits[:, -3:-1]
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), b[:, -2:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        b = batch(500)
        return (llm(input_ids=b[:, :-2]).logits[:, -1].argmax(-1) == b[:, -2]).float().mean().item()


def question_ids(fila, config, checkpoint, records, folder):
    """The LLM input ids of the first-character question on each record's image, as `fila forward` builds them."""
    images = [os.path.join(folder, r["image"]) for r in records]
    return [t["input_ids"][0].astype(np.int64) for t in traces(fila, config, checkpoint, images, FIRST)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the stage-2 config (template and tiled views)")
    p.add_argument("--checkpoint", required=True, help="the FILA checkpoint whose LLM learns to copy")
    p.add_argument("--data", required=True, help="records from scripts/experiments/code_variants.py --mode one|first")
    p.add_argument("--out", required=True, help="the new checkpoint folder (must not exist)")
    p.add_argument("-n", type=int, default=32, help="records whose questions are traced (their span lengths)")
    p.add_argument("--steps", type=int, default=3000, help="steps of 32 questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fila", default=os.path.join(ROOT, "target", "release", "fila"))
    args = p.parse_args()
    from tokenizers import Tokenizer

    if os.path.exists(args.out):
        sys.exit(f"{args.out} exists: choose a new folder")
    records = [r for r in map(json.loads, open(args.data)) if first_answer(r) is not None][: args.n]
    ids = question_ids(args.fila, args.config, args.checkpoint, records, os.path.dirname(os.path.abspath(args.data)))
    torch.manual_seed(args.seed)
    llm, weights, config = load_llm(args.checkpoint)
    tokenizer = Tokenizer.from_file(os.path.join(args.checkpoint, "tokenizer.json"))
    copied = copy_pretrain(llm, ids, config["image_token_id"], tokenizer, args.steps, args.seed)
    print(f"copy task after {args.steps} steps of 32: {copied:.1%} of 500 fresh spans "
          f"(span lengths {sorted({int((i == config['image_token_id']).sum()) for i in ids})})")
    trained = {k: v.detach().numpy() for k, v in llm.state_dict().items()}
    tmp = args.out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.checkpoint, tmp)
    save_file({k: trained.get(k, v) for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
    os.rename(tmp, args.out)
    print(f"wrote {args.out}: {args.checkpoint} with the copying LLM")


if __name__ == "__main__":
    sys.exit(main())
