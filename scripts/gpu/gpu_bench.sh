#!/usr/bin/env bash
# The real-size benchmark on one GPU in one call: `fila bench --size real` and its PyTorch twin
# (scripts/bench/bench_torch.py) for stage 1 and stage 2 on the same device (ours stage 1, ours stage 2,
# then PyTorch's: ours first, as the PyTorch numbers can be had on any GPU later), then a
# side-by-side markdown table (ours, PyTorch, ratio) printed and written to OUT_DIR/real-bench.md
# with every run's JSON beside it. scripts/gpu/check.sh runs it as one of its steps.
#
# What runs (docs/gpu-notes.md, "Real-size benchmark"): CLIP ViT-L/14-336 + ConvNeXt-L +
# Llama-3-8B at random init, bf16_mixed, activation checkpointing of the LLM layers, AdamW
# (stage 2: one rank's 1/8 slice); stage 1 micro-batch 16 (one 336² view, ConvNeXt 768²),
# stage 2 micro-batch 1 over FILA's five canvases (5 warm-up steps: each canvas once).
# Each run has a time limit, cut to what is left of BUDGET; a run without 20 s left is skipped.
#
# Usage (from the repository root; BIN_DIR holds a `--features cuda` build of `fila`, optionally `fila-train`):
#   bash scripts/gpu/gpu_bench.sh BIN_DIR OUT_DIR
# Dry run on a machine without a GPU (tiny size, CPU, f32; checks the script and both sides):
#   bash scripts/gpu/gpu_bench.sh BIN_DIR OUT_DIR --device cpu --size tiny
# Environment: STEPS1 / STEPS2 (timed steps, default 3 / 5), LIMIT_OURS / LIMIT_TORCH (seconds
# per run, default 150 / 90: ours compiles and autotunes its kernels in the warm-up), BUDGET
# (seconds for the whole script, default 480), PYTHON (default python3).
set -u
bin=$(cd "$1" && pwd)
out=$(mkdir -p "$2" && cd "$2" && pwd)
shift 2
device=cuda:0
size=real
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."
py=${PYTHON:-python3}
steps1=${STEPS1:-3}
steps2=${STEPS2:-5}
limit_ours=${LIMIT_OURS:-150}
limit_torch=${LIMIT_TORCH:-90}
budget=${BUDGET:-480}
SECONDS=0

# Both sides take the same flags; the size's defaults (bench.rs `BenchOptions::from_args`, bench_torch.py
# `options`) give the recipe batch, precision and checkpointing. The dry run asks for the recipe batch
# at tiny size with checkpointing, like the real run.
common=(--size "$size" --batch-shape recipe --activation-checkpointing true --optimizer --json)
if [ "$device" = cpu ]; then
  torch_device=cpu
  common+=(--precision f32)
else
  torch_device=cuda:${device#cuda:}
  common+=(--precision bf16_mixed)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
"$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

# run NAME LIMIT COMMAND...: the last stdout line (the JSON) to OUT/NAME.json, stderr to OUT/runs.log
# (OUT keeps few files: at most 8 come back from the device machine).
export PYTHONUNBUFFERED=1
run() {
  local name=$1 limit=$2
  shift 2
  # 15 s stay for the table.
  local left=$((budget - SECONDS - 15))
  if [ "$left" -lt 20 ]; then
    echo "== $name SKIPPED: ${left} s of the budget left" | tee -a "$out/runs.log"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  echo "== $name (limit ${limit} s): $*" | tee -a "$out/runs.log"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.out" 2> "$out/$name.err"
  local rc=$?
  tail -n 1 "$out/$name.out" > "$out/$name.json"
  cat "$out/$name.err" >> "$out/runs.log"
  tail -n 3 "$out/$name.err"
  rm -f "$out/$name.out" "$out/$name.err"
  echo "   $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/runs.log"
}

for side in ours torch; do
  for stage in 1 2; do
    steps=$([ $stage = 1 ] && echo "$steps1" || echo "$steps2")
    if [ $side = ours ]; then
      run "ours-stage$stage" "$limit_ours" "$bin/fila" bench --device "$device" --stage $stage --steps "$steps" "${common[@]}"
    else
      run "torch-stage$stage" "$limit_torch" "$py" scripts/bench/bench_torch.py --device "$torch_device" --stage $stage --steps "$steps" "${common[@]}"
    fi
  done
done

"$py" - "$out" "$size" "$device" <<'PY' | tee "$out/real-bench.md"
import json, sys
from pathlib import Path

out, size, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def load(name):
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None

gib = lambda b: ("n/a" if not b else f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB")
pct = lambda x: f"{100 * x:.1f} %" if x is not None else "n/a"
rows = [
    ("tokens/s (higher is better)", lambda s: s["tokens_per_s"], lambda x: f"{x:,.0f}"),
    ("samples/s", lambda s: s["samples_per_s"], lambda x: f"{x:.2f}"),
    ("step time, mean (lower is better)", lambda s: s["mean_s"], lambda x: f"{x:.3f} s"),
    ("peak memory reserved (driver total − free)", lambda s: s["peak_memory_bytes"], gib),
    ("MFU (recomputation counted)", lambda s: s["mfu"], pct),
    ("MFU without the recomputation", lambda s: s["mfu_without_recompute"], pct),
    ("TFLOP per step (same count)", lambda s: s["flops_per_step"]["total"] / 1e12, lambda x: f"{x:.3f}"),
]
print(f"### FILA real-size training step, `fila bench --size {size}` against PyTorch (scripts/gpu/gpu_bench.sh, {device})\n")
for stage in (1, 2):
    ours, theirs = load(f"ours-stage{stage}"), load(f"torch-stage{stage}")
    if ours is None or theirs is None:
        print(f"Stage {stage}: {'ours' if ours is None else 'PyTorch'} gave no result (see its .log).\n")
        continue
    slice_note = f", AdamW on a 1/{ours['optimizer_world']} slice" if ours["optimizer_world"] > 1 else ", AdamW"
    print(
        f"**Stage {stage}**: micro-batch {ours['batch']} ({ours['batch_shape']}), {ours['precision']}, "
        f"checkpointing {'on' if ours['activation_checkpointing'] else 'off'}{slice_note}; "
        f"{ours['steps']} timed steps after {ours['warmup_steps']} warm-up\n"
    )
    print("| | ours | PyTorch | ours / PyTorch |")
    print("| --- | ---: | ---: | ---: |")
    for label, get, fmt in rows:
        try:
            a, b = get(ours), get(theirs)
        except (KeyError, TypeError):
            a = b = None
        ratio = f"{a / b:.2f}" if a is not None and b else "n/a"
        print(f"| {label} | {fmt(a) if a is not None else 'n/a'} | {fmt(b) if b is not None else 'n/a'} | {ratio} |")
    print(f"\nPeak memory: {ours['peak_memory_source']}.")
    if theirs.get("torch_max_allocated_bytes"):
        print(f"PyTorch's allocator: max_memory_allocated {gib(theirs['torch_max_allocated_bytes'])}, max_memory_reserved {gib(theirs['torch_max_reserved_bytes'])}.")
    if ours["step_tokens"] != theirs["step_tokens"] or ours["step_flops"] != theirs["step_flops"]:
        print(f"\nWARNING: the two sides ran different batches (tokens {ours['step_tokens']} vs {theirs['step_tokens']}).")
    print()
PY
echo "benchmark done after ${SECONDS} s"
