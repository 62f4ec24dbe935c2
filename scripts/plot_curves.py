#!/usr/bin/env python3
"""Plots the quick start's training curves and eval accuracy into one PNG.

Reads, for each run NAME, `ROOT/NAME-stage1/metrics.jsonl` and `ROOT/NAME-stage2/metrics.jsonl`
(one JSON object per optimizer step, written by fila-train: `step`, `loss`, `lr`, ...) and the eval
reports `ROOT/NAME-stage2/final/eval-heldout.json` and `eval-fine.json` written by `fila eval`.
Left: the training loss of each stage. Right: exact-match accuracy per question type on the
held-out split, and on the `fine` split's codes.

    bash scripts/quickstart.sh --ablation          # runs `synth` and `synth-vit-only`
    pip install matplotlib
    python3 scripts/plot_curves.py                 # writes docs/quickstart-curves.png

Runs that are missing are left out; with no run at all it stops with a message.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {"synth": "FILA (ViT + ConvNeXt)", "synth-vit-only": "ViT only (ablation)"}
# Uniform-guess accuracy of the synthetic dataset's questions: 6 colours, 3 shapes, counts 1-5;
# a 3-4 character code from a 34-symbol alphabet is never guessed.
CHANCE = {"colour": 1 / 6, "shape": 1 / 3, "count": 1 / 5, "code": 0.0}
TYPES = ["colour", "count", "shape", "code"]


def read_metrics(path):
    """(steps, losses) of one run's metrics.jsonl, or None when the file is missing."""
    if not os.path.exists(path):
        return None
    steps, losses = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not a JSON line ({e})")
            steps.append(row["step"])
            losses.append(row["loss"])
    return steps, losses


def read_eval(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def moving_average(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.path.join(ROOT, "checkpoints"), help="folder holding the runs")
    p.add_argument("--runs", nargs="+", default=["synth", "synth-vit-only"], help="run names (NAME-stage1, NAME-stage2)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "quickstart-curves.png"))
    p.add_argument("--window", type=int, default=25, help="moving-average window of the loss, in steps")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for name in args.runs:
        s1 = read_metrics(os.path.join(args.root, f"{name}-stage1", "metrics.jsonl"))
        s2 = read_metrics(os.path.join(args.root, f"{name}-stage2", "metrics.jsonl"))
        if s1 is None and s2 is None:
            print(f"skipping {name}: no metrics.jsonl under {args.root}/{name}-stage1 or -stage2", file=sys.stderr)
            continue
        final = os.path.join(args.root, f"{name}-stage2", "final")
        runs.append((name, s1, s2, read_eval(os.path.join(final, "eval-heldout.json")),
                     read_eval(os.path.join(final, "eval-fine.json"))))
    if not runs:
        sys.exit(f"no runs found under {args.root} (run `bash scripts/quickstart.sh --ablation` first)")

    fig, (ax1, ax2, ax_acc) = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1, 1.5, 1.3]})
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, stage, title, window in [(ax1, 1, "Stage 1: captions, untiled", max(1, args.window // 5)),
                                     (ax2, 2, "Stage 2: questions, tiled views", args.window)]:
        for (name, *stages, _, _), colour in zip(runs, colours):
            metrics = stages[stage - 1]
            if metrics is None:
                continue
            steps, losses = metrics
            ax.plot(steps, losses, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(losses, window), color=colour, linewidth=1.8, label=LABELS.get(name, name))
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{title}\n(faint: per step; solid: mean of {window} steps)", fontsize=10)
        ax.grid(alpha=0.3)
    ax1.set_ylabel("training loss per supervised token")
    ax2.legend(loc="upper right")

    categories = [f"{t}" for t in TYPES] + ["fine code", "overall"]
    width = 0.8 / len(runs)
    for i, ((name, _, _, held, fine), colour) in enumerate(zip(runs, colours)):
        values = []
        for t in TYPES:
            values.append(held["by_type"][t]["accuracy"] if held and t in held["by_type"] else float("nan"))
        values.append(fine["overall"]["accuracy"] if fine else float("nan"))
        values.append(held["overall"]["accuracy"] if held else float("nan"))
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(categories))]
        bars = ax_acc.bar(xs, [100 * v for v in values], width, color=colour, label=LABELS.get(name, name))
        for bar, v in zip(bars, values):
            if v == v:  # not NaN
                ax_acc.text(bar.get_x() + bar.get_width() / 2, 100 * v + 1, f"{100 * v:.0f}", ha="center",
                            va="bottom", fontsize=8)
    for j, t in enumerate(TYPES):
        ax_acc.hlines(100 * CHANCE[t], j - 0.45, j + 0.45, color="black", linestyle=":", linewidth=1.2,
                      label="chance (uniform guess)" if j == 0 else None)
    ax_acc.set_xticks(range(len(categories)), categories)
    ax_acc.set_ylim(0, 112)
    ax_acc.set_ylabel("exact match, %")
    ax_acc.set_title("Exact match by question type\n(held-out split; `fine` split for the fine codes)", fontsize=10)
    ax_acc.legend(loc="upper right", fontsize=8)
    ax_acc.grid(alpha=0.3, axis="y")

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
