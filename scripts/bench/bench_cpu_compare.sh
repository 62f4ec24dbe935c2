#!/usr/bin/env bash
# Builds `fila` (release) and runs scripts/bench/bench_cpu_compare.py: our CPU training step against its
# PyTorch twin, alternately on this machine. Arguments go to the Python script.
#   scripts/bench/bench_cpu_compare.sh [--sizes tiny mid] [--stages 1 2] [--rounds 3] [--steps 3]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p fila-cli
python3 scripts/bench/bench_cpu_compare.py --fila "${CARGO_TARGET_DIR:-target}/release/fila" "$@"
uptime
