#!/usr/bin/env bash
# The attention seam (crates/fila-model/src/attention.rs) on a CUDA GPU, with prebuilt binaries
# (the machine needs the NVIDIA driver only):
#   1. its parity tests on CUDA: values and q/k/v gradients against attention written out, with
#      padding, grouped-query heads, odd lengths, cached-decoding shapes and bf16 (the forward
#      runs CUDA's fused kernel; a layout or mask mistake shows as O(1) errors, TF32 as ~1e-3)
#   2. forward + backward time, explicit attention against the seam, f32 and bf16, at sizes up to
#      Llama-3-8B's (32 heads of 128) and 4k tokens
#   3. which attention kernel CubeCL's autotune picked per shape (flash or its unfused fallback)
# Build and pack here (stripped `--features cuda` binaries, about 90 MB, gzipped to ~17 MB):
#   bash scripts/gpu/attention_cuda_check.sh pack target/attention-cuda
# On the GPU machine, from the repository root:
#   bash scripts/gpu/attention_cuda_check.sh run target/attention-cuda OUT_DIR
set -u
mode=$1
dir=$2
case "$mode" in
pack)
  mkdir -p "$dir"
  test_bin=$(cargo test --features cuda -p fila-model --test attention --no-run 2>&1 |
    grep -o 'target/debug/deps/attention-[0-9a-f]*' | tail -n 1)
  cargo build -q --features cuda -p fila-model --example attention_bench || exit 1
  [ -n "$test_bin" ] || { echo "no attention test binary built" >&2; exit 1; }
  strip -o "$dir/attention" "$test_bin"
  strip -o "$dir/attention_bench" target/debug/examples/attention_bench
  tar -C "$dir" -czf "$dir.tar.gz" attention attention_bench
  ls -l "$dir" "$dir.tar.gz"
  ;;
run)
  [ -d "$dir" ] || { mkdir -p "$dir" && tar -C "$dir" -xzf "$dir.tar.gz"; }
  out=$(mkdir -p "$3" && cd "$3" && pwd)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo "== attention parity on CUDA"
  timeout 240 "$dir/attention" --test-threads=1 2>&1 | grep -E "^test |panicked|differs|test result" | tail -n 30
  echo "== forward + backward, explicit vs seam"
  export CUBECL_DEBUG_LOG="$out/cubecl.log"
  for args in "2 8 512 64" "2 32 2048 128" "2 32 2048 128 bf16" "1 32 4096 128 bf16"; do
    timeout 150 "$dir/attention_bench" $args 2>&1 | tail -n 4
  done
  echo "== autotune winners for attention (fastest per shape)"
  grep -i -E "attention|flash|blackbox|fallback|unit" "$out/cubecl.log" | grep -i -E "fastest|select|best|winner" | sort | uniq -c | head -n 20
  ;;
*)
  echo "usage: $0 pack DIR | run DIR OUT_DIR" >&2
  exit 2
  ;;
esac
