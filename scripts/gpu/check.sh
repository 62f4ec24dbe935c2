#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU and nothing built there: unpacks the
# bundle of scripts/gpu/pack.sh and runs, most important first, each step under its own time
# limit so that the whole fits BUDGET seconds (default 470, about 8 minutes on a cold machine):
#   1. the machine: GPU and driver, the CUDA toolkit CubeCL compiles kernels with (headers and
#      NVRTC), NCCL (a pip wheel's libnccl.so.2 is used through FILA_NCCL_LIB when found)
#   2. fila-train's `cuda` test: the tiny stage 1 on cuda:0 for two steps, plain, with its
#      collectives on NCCL (FILA_NCCL=1: loading NCCL, joining, the first all-reduce), under
#      ZeRO-3 over NCCL (asynchronous gathers on NCCL's stream) and with the optimizer offloaded
#      to the CPU; losses compared with a tolerance (two CUDA runs are not bit-identical)
#   3. the real-size benchmark against PyTorch, stage 1 then stage 2 (scripts/gpu/gpu_bench.sh)
#   4. fila-model's parity tests on CUDA (parity, gelu, fila_model, hybrid)
# A step that fails or runs out of time does not stop the others; one without time left is
# skipped and says so. Results are written as the steps end, so they are there even when the
# call itself is cut short: OUT_DIR/summary.txt (one line per step, the skipped ones included),
# OUT_DIR/steps.log (every step's output), and from step 3 real-bench.md and the JSON of each
# run (8 files in all).
#
# Usage (from the repository root of a checkout of the same commit):
#   bash scripts/gpu/check.sh target/gpu-bundle.tar.xz OUT_DIR
set -u
bundle=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
out=$(mkdir -p "$2" && cd "$2" && pwd)
cd "$(dirname "$0")/../.."
budget=${BUDGET:-470}
SECONDS=0
summary=$out/summary.txt
log=$out/steps.log
: > "$summary"
: > "$log"

note() { echo "$*" | tee -a "$summary"; }

# step NAME LIMIT COMMAND...: runs COMMAND under `timeout` at LIMIT seconds or what is left of the
# budget, whichever is less; its output goes to steps.log, one line about it to summary.txt.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt 30 ]; then
    note "SKIPPED $name: ${left} s of the ${budget} s budget left"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*" >> "$log"
  local start=$SECONDS from rc verdict
  from=$(($(wc -l < "$log") + 1))
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) verdict=ok ;;
    124 | 137) verdict="TIMED OUT" ;;
    *) verdict="FAILED (exit $rc)" ;;
  esac
  note "$verdict $name after $((SECONDS - start)) s (limit $limit s)"
  # The step's verdict lines, for a summary that reads on its own.
  tail -n "+$from" "$log" | grep -E "test result|panicked|^Error|^benchmark done|: exit [0-9]+ after|SKIPPED" | tail -n 6 | sed 's/^/    /' >> "$summary"
}

# 1. The machine.
bin=$(mktemp -d)
if ! xz -dc "$bundle" | tar -x -C "$bin"; then
  note "FAILED unpacking $bundle: nothing else can run"
  exit 1
fi
note "unpacked $(ls "$bin" | tr '\n' ' ')in ${SECONDS} s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$summary"
toolkit=${CUDA_PATH:-}
for d in /usr/local/cuda /opt/cuda; do
  [ -z "$toolkit" ] && [ -d "$d" ] && toolkit=$d
done
if [ -n "$toolkit" ] && [ -f "$toolkit/include/cuda_fp16.h" ]; then
  note "CUDA toolkit: $toolkit ($(ls "$toolkit"/lib64/libnvrtc.so* 2>/dev/null | head -n 1))"
else
  note "CUDA toolkit: not found (CUDA_PATH, /usr/local/cuda, /opt/cuda): CubeCL cannot compile kernels; steps 2-4 will fail at the start check"
fi
py=${PYTHON:-python3}
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so\.2' && [ -z "${FILA_NCCL_LIB:-}" ]; then
  wheel=$("$py" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
  [ -n "$wheel" ] && [ -f "$wheel" ] && export FILA_NCCL_LIB=$wheel
fi
nccl=${FILA_NCCL_LIB:-$(ldconfig -p 2>/dev/null | grep -o '/[^ ]*libnccl\.so\.2' | head -n 1)}
note "NCCL: ${nccl:-not found (no libnccl.so.2 on the loader path, no nvidia-nccl wheel): the NCCL half of step 2 will fail}"
# Test binaries built elsewhere find this checkout's files and the unpacked binaries here.
export FILA_REPO_DIR=$PWD FILA_BIN_DIR=$bin

# 2. Starting on CUDA, plain and over NCCL.
step "cuda start, plain and over NCCL (fila-train tests/cuda.rs)" 150 "$bin/cuda" --test-threads=1 --nocapture

# 3. The real-size benchmark (its own per-run limits, cut to the budget left).
left=$((budget - SECONDS))
if [ "$left" -ge 60 ]; then
  step "real-size benchmark (scripts/gpu/gpu_bench.sh)" "$left" \
    env LIMIT_OURS="${LIMIT_OURS:-150}" LIMIT_TORCH="${LIMIT_TORCH:-60}" BUDGET=$((left - 40)) bash scripts/gpu/gpu_bench.sh "$bin" "$out"
  # Its log joins this one: fewer files to bring back.
  [ -f "$out/runs.log" ] && cat "$out/runs.log" >> "$log" && rm -f "$out/runs.log"
else
  note "SKIPPED real-size benchmark: ${left} s left"
fi

# 4. Parity on CUDA, with what is left.
for t in parity gelu fila_model hybrid; do
  step "fila-model $t on CUDA" 90 "$bin/$t" --test-threads=1
done
note "done after ${SECONDS} s of the ${budget} s budget"
