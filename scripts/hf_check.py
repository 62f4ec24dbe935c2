#!/usr/bin/env python3
"""Checks a FILA `final/` folder loaded by Hugging Face transformers against the `fila` binary.

For each question it compares
- the answer of `model.generate(**processor(images=image, text=question), max_new_tokens=N,
  do_sample=False)` with `fila generate --checkpoint FINAL --image IMG --prompt Q`;
- the prompt's token ids and logits of the transformers model with `fila forward` (same image and
  prompt, run config = the folder's run.toml with `[model] checkpoint` set to the folder), within
  `--tol` (default 1e-4), and the largest difference of the visual tokens;
- the processor's pixel tensors (global view, tiles, ConvNeXt input) with those of
  `fila data inspect` for the same record (FILA-train's data pipeline), which must be equal.

Prints one row per question and exits with status 1 on any mismatch.

    python scripts/hf_check.py checkpoints/synth-stage2/final
    python scripts/hf_check.py checkpoints/synth-stage1/final --data datasets/synth/generated/heldout.jsonl -n 12

Needs torch, transformers, pillow and safetensors, and a built `fila` (cargo build --release -p fila-cli).
The questions default to the quick start's held-out split (datasets/synth/generated/heldout.jsonl),
spread over its question types; `fine.jsonl` works too.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor

REPO = Path(__file__).resolve().parent.parent


def questions(data, count):
    """`count` records with an image, taken in turn from each question type (file order within a type)."""
    records = [json.loads(line) for line in open(data) if line.strip()]
    by_type = {}
    for index, r in enumerate(records):
        r["index"] = index
        if r.get("image"):
            by_type.setdefault(r.get("qtype", ""), []).append(r)
    picked, i = [], 0
    while len(picked) < count and any(i < len(v) for v in by_type.values()):
        for items in by_type.values():
            if i < len(items) and len(picked) < count:
                picked.append(items[i])
        i += 1
    out = []
    for r in picked:
        question = next(t["value"] for t in r["conversations"] if t["from"] == "human")
        answer = next((t["value"] for t in r["conversations"] if t["from"] == "gpt"), "")
        out.append(dict(id=r["id"], index=r["index"], image=str(Path(data).parent / r["image"]), question=question, reference=answer))
    return out


def forward_config(final, data, out):
    """The folder's run.toml with `[model]` = this checkpoint, the folder's tokenizer and `data` as
    the only record source."""
    text = (final / "run.toml").read_text()
    lines, skipping = [], False
    for line in text.splitlines():
        header = re.match(r"^\s*\[+([^\]]+)\]+\s*$", line)
        if header:
            name = header.group(1).strip()
            skipping = name == "model" or name.startswith("model.") or name == "data.sources"
            if skipping:
                continue
        if not skipping:
            lines.append(line)
    data = data.resolve()
    text = "\n".join(lines) + f"\n\n[model]\ncheckpoint = {json.dumps(str(final))}\n"
    text += f"\n[[data.sources]]\npath = {json.dumps(str(data))}\nimage_folder = {json.dumps(str(data.parent))}\n"
    text = re.sub(r'(?m)^(tokenizer\s*=\s*).*$', lambda m: m.group(1) + json.dumps(str(final / "tokenizer.json")), text, count=1)
    parsed = tomllib.loads(text)
    assert parsed["model"]["checkpoint"] == str(final) and parsed["data"]["tokenizer"] == str(final / "tokenizer.json")
    out.write_text(text)
    return out


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("final", type=Path, help="a final/ folder written by fila-train")
    ap.add_argument("--data", type=Path, default=REPO / "datasets/synth/generated/heldout.jsonl")
    ap.add_argument("-n", "--count", type=int, default=8, help="questions (default 8)")
    ap.add_argument("--fila", type=Path, default=REPO / "target/release/fila")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed |logit difference|")
    ap.add_argument("--json", type=Path, help="also write the rows and the summary here")
    o = ap.parse_args(argv)
    final = o.final.resolve()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(final, trust_remote_code=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = forward_config(final, o.data, tmp / "forward.toml")
        for q in questions(o.data, o.count):
            image = Image.open(q["image"])
            inputs = processor(images=image, text=q["question"], return_tensors="pt")
            with torch.no_grad():
                generated = model.generate(**inputs, max_new_tokens=o.max_new_tokens, do_sample=False)
                hf_answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :])
                out = model(**inputs)
                visual = model.encode_images(inputs["pixel_values"], inputs.get("hires_pixel_values"), inputs.get("image_grids"))
            fila_answer = run([o.fila, "generate", "--checkpoint", final, "--image", q["image"], "--prompt", q["question"], "--max-new-tokens", str(o.max_new_tokens)])
            fila_answer = fila_answer[:-1] if fila_answer.endswith("\n") else fila_answer
            trace = tmp / "forward.safetensors"
            run([o.fila, "forward", "--config", config, "--image", q["image"], "--prompt", q["question"], "--out", trace])
            ref = load_file(str(trace))
            ids_match = ref["input_ids"].long().tolist() == inputs["input_ids"].tolist()
            logit_diff = (out.logits.float() - ref["logits"]).abs().max().item() if ids_match else float("inf")
            visual_diff = (visual.float() - ref["visual_tokens"]).abs().max().item() if visual.shape == ref["visual_tokens"].shape else float("inf")
            pixels = tmp / "inspect.safetensors"
            run([o.fila, "data", "inspect", "--config", config, "--index", str(q["index"]), "--out", pixels])
            data = load_file(str(pixels))
            ours = [inputs["pixel_values"][:1], inputs["pixel_values"][1:], inputs["hires_pixel_values"][0]]
            theirs = [data["global"][None], data.get("tiles", torch.zeros(0, *data["global"].shape)), data["hires"]]
            pixel_diff = max((a.float() - b).abs().max().item() if a.shape == b.shape else float("inf") for a, b in zip(ours, theirs) if b.numel())
            rows.append(
                dict(
                    id=q["id"],
                    question=q["question"].replace("\n", " "),
                    reference=q["reference"],
                    hf=hf_answer,
                    fila=fila_answer,
                    answers_match=hf_answer == fila_answer,
                    ids_match=ids_match,
                    tokens=int(inputs["input_ids"].shape[1]),
                    max_logit_diff=logit_diff,
                    max_visual_diff=visual_diff,
                    max_pixel_diff=pixel_diff,
                    logits_ok=ids_match and logit_diff <= o.tol,
                    pixels_ok=pixel_diff == 0.0,
                )
            )
            r = rows[-1]
            print(
                f"{r['id']:<28} {r['tokens']:>5} tok  hf {r['hf']!r:<14} fila {r['fila']!r:<14} "
                f"{'same' if r['answers_match'] else 'DIFFERENT':<9}  ids {'=' if ids_match else '≠'}  "
                f"max|Δpixel| {pixel_diff:.1e}  max|Δvisual| {visual_diff:.2e}  max|Δlogit| {logit_diff:.2e}  "
                f"{'ok' if r['logits_ok'] and r['pixels_ok'] else 'MISMATCH'}",
                flush=True,
            )
    n = len(rows)
    same = sum(r["answers_match"] for r in rows)
    logits_ok = sum(r["logits_ok"] for r in rows)
    pixels_ok = sum(r["pixels_ok"] for r in rows)
    worst = max(r["max_logit_diff"] for r in rows) if rows else 0.0
    print(
        f"\n{final}: answers equal {same}/{n}, logits within {o.tol:g} {logits_ok}/{n} (max |logit diff| {worst:.3e}), "
        f"pixels equal {pixels_ok}/{n}"
    )
    if o.json:
        summary = dict(answers_equal=same, logits_ok=logits_ok, pixels_equal=pixels_ok, count=n, max_logit_diff=worst, tol=o.tol)
        o.json.write_text(json.dumps(dict(final=str(final), rows=rows, **summary), indent=2))
    return 0 if n and same == n and logits_ok == n and pixels_ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
