#!/usr/bin/env python3
"""One CPU training step of FILA: ours (`fila bench`) against its PyTorch twin, run alternately.

The twin is scripts/bench/bench_torch.py (the same architecture as `fila bench --size tiny|mid`,
crates/fila-cli/src/bench.rs: transformers' CLIPVisionModel and LlamaForCausalLM built from
configs, and a ConvNeXt, CVFM and projector written the way crates/fila-model defines them,
docs/model.md). The batch is the bench's default: per sample one 2x2 canvas (global view + 4 tiles
for the ViT, the canvas x 32/14 for the ConvNeXt), its visual tokens followed by 32 text tokens,
loss on the text (the LM head on the scored positions only, on both sides). A step is forward,
backward, global-norm clipping at 1 and AdamW over the stage's trainable set (stage 1: CVFM and
projector, towers and LLM frozen but back-propagated through; stage 2: everything), on both sides.

Rounds alternate one `fila bench` process (one untimed warm-up step, then --steps timed steps)
and --steps timed steps of the twin in this process, so machine load hits both alike. Printed:
per-step times, the ratio ours / PyTorch of the median step times, and each side's CPU user time
over wall time during its timed steps (2.0 = both cores busy on a 2-core machine).

    cargo build --release -p fila-cli
    python3 scripts/bench/bench_cpu_compare.py [--sizes tiny mid] [--stages 1 2] [--rounds 3] [--steps 3]

Needs `pip install torch transformers`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# PyTorch runs as its users run it: its own thread count (one per core) and OpenMP's default wait
# policy. Noise from the shared machine is handled alike for both sides: alternated rounds and
# medians. An OMP_* or MKL_* variable already in the environment is reported, not set here.
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_torch  # noqa: E402  (the twin: model, batch, step; shared with scripts/gpu/gpu_bench.sh)

ROOT = Path(__file__).resolve().parent.parent.parent


class TorchSide(bench_torch.TorchSide):
    """The twin at this script's settings: f32, the 2x2-canvas batch, AdamW over the whole trainable set, two warm-up steps."""

    def __init__(self, size, stage, batch):
        o = bench_torch.options(["--size", size, "--stage", str(stage), "--batch", str(batch), "--optimizer", "--warmup", "2"], quiet=True)
        super().__init__(o)


def run_ours(fila, size, stage, batch, steps):
    cmd = [str(fila), "bench", "--size", size, "--batch", str(batch), "--steps", str(steps), "--stage", str(stage), "--optimizer", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    ap.add_argument("--stages", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's own, one thread per core)")
    ap.add_argument("--fila", default=str(ROOT / "target" / "release" / "fila"))
    ap.add_argument("--json-out", help="also write every measurement to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}; ours: {args.fila}",
        flush=True,
    )
    results = []
    for size in args.sizes:
        for stage in args.stages:
            torch_side = TorchSide(size, stage, args.batch)
            ours_steps, torch_steps = [], []
            ours_cpu, torch_cpu = [0.0, 0.0], [0.0, 0.0]
            for r in range(args.rounds):
                ours = run_ours(args.fila, size, stage, args.batch, args.steps)
                theirs = torch_side.run(args.steps)
                ours_steps += ours["step_s"]
                torch_steps += theirs["step_s"]
                ours_cpu = [ours_cpu[0] + (ours["user_s"] or 0.0), ours_cpu[1] + ours["wall_s"]]
                torch_cpu = [torch_cpu[0] + theirs["user_s"], torch_cpu[1] + theirs["wall_s"]]
                fmt = lambda xs: " ".join(f"{x * 1e3:7.1f}" for x in xs)
                print(f"{size:4s} stage {stage} round {r + 1}: ours [{fmt(ours['step_s'])}] ms   torch [{fmt(theirs['step_s'])}] ms", flush=True)
            o, t = statistics.median(ours_steps), statistics.median(torch_steps)
            row = dict(
                size=size,
                stage=stage,
                batch=args.batch,
                ours_median_s=o,
                torch_median_s=t,
                ratio=o / t,
                ours_user_over_wall=ours_cpu[0] / ours_cpu[1],
                torch_user_over_wall=torch_cpu[0] / torch_cpu[1],
                ours_steps_s=ours_steps,
                torch_steps_s=torch_steps,
            )
            results.append(row)
            print(
                f"{size:4s} stage {stage}: ours {o * 1e3:.1f} ms, torch {t * 1e3:.1f} ms, ratio ours/torch {o / t:.2f}x; "
                f"user/wall ours {row['ours_user_over_wall']:.2f}, torch {row['torch_user_over_wall']:.2f}",
                flush=True,
            )
            del torch_side
    print("\nsize  stage  ours ms  torch ms  ours/torch  user/wall ours  torch")
    for r in results:
        print(
            f"{r['size']:5s} {r['stage']:5d} {r['ours_median_s'] * 1e3:8.1f} {r['torch_median_s'] * 1e3:9.1f} "
            f"{r['ratio']:10.2f}x {r['ours_user_over_wall']:14.2f} {r['torch_user_over_wall']:6.2f}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
