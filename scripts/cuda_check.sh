#!/usr/bin/env bash
# CUDA checks of a `--features cuda` build, on a machine with an NVIDIA GPU (no Rust toolchain is
# needed there: build here, copy the binaries).
#   1. fila-model's test binaries on CUDA (parity with transformers, bf16 autocast), when given;
#      build them with `cargo test --release --features cuda -p fila-model --no-run`
#   2. `fila bench` on cuda:0, f32 and bf16_mixed, tiny and mid
#   3. the tiny synthetic stage 1 on cuda:0 in f32 and bf16_mixed (losses in metrics.jsonl, to
#      compare with the same run on CPU)
#   4. that stage 1 again with FILA_NCCL=1 (the NCCL collectives at world size 1), losses compared
# Usage (from the repository root):
#   bash scripts/cuda_check.sh BIN_DIR OUT_DIR [TEST_BINARY...]
set -u
bin=$1
out=$(mkdir -p "$2" && cd "$2" && pwd)
shift 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
for t in "$@"; do
  echo "== $(basename "$t") on CUDA"
  "$t" --test-threads=1 --nocapture 2>&1 | grep -E "max abs error|rel\. |test result|panicked|FAILED|^test " | tail -n 60
done
for precision in f32 bf16_mixed; do
  for size in tiny mid; do
    "$bin/fila" bench --device cuda:0 --size "$size" --batch 4 --steps 10 --precision "$precision"
  done
done
data=datasets/synth/generated
[ -f "$data/tokenizer.json" ] || "$bin/fila" data synth --out "$data" --tile-size 56 > /dev/null
for precision in f32 bf16_mixed; do
  echo "== tiny synthetic stage 1 on cuda:0, $precision"
  SECONDS=0
  "$bin/fila-train" --config configs/tiny/synth-stage1.toml --set 'device="cuda:0"' \
    --set "precision=\"$precision\"" --set "checkpoint.output_dir=\"$out/stage1-$precision\"" 2>&1 | tail -n 3
  echo "wall ${SECONDS} s"
done
# 4. The NCCL engine on one GPU: the same stage 1 with its collectives forced through NCCL
#    (FILA_NCCL=1, world size 1) must give the f32 run's losses (the only NCCL check one GPU allows:
#    NCCL refuses two ranks on one device).
echo "== tiny synthetic stage 1 on cuda:0, f32, collectives over NCCL"
FILA_NCCL=1 "$bin/fila-train" --config configs/tiny/synth-stage1.toml --set 'device="cuda:0"' \
  --set 'precision="f32"' --set "checkpoint.output_dir=\"$out/stage1-nccl\"" 2>&1 | tail -n 3
python3 - "$out/stage1-f32/metrics.jsonl" "$out/stage1-nccl/metrics.jsonl" <<'PY'
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(p)] for p in sys.argv[1:3])
worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)) if a and len(a) == len(b) else float("nan")
print(f"NCCL vs plain: {len(a)} / {len(b)} steps, largest relative loss difference {worst:.3g}")
PY
