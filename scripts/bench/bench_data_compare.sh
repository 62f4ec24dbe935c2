#!/usr/bin/env bash
# Runs the Rust and PIL preprocessing benchmarks alternately (ROUNDS times) on the same JPEGs and
# prints each line's best result: on a shared machine the best of several runs is the least noisy.
#   CARGO_TARGET_DIR=/work/target-data scripts/bench/bench_data_compare.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
cargo build --release -q -p fila-data --example bench_preprocess
bin=${CARGO_TARGET_DIR:-target}/release/examples/bench_preprocess
out=$(mktemp -d)
for i in $(seq "$rounds"); do
  "$bin" --iters 3 | grep "images/s" | sed 's/^/rust /' >> "$out/all"
  OMP_NUM_THREADS=1 python3 scripts/bench/bench_data_pil.py --iters 3 | sed 's/^/pil  /' >> "$out/all"
done
# Best (highest) 1-core images/s per line label.
python3 - "$out/all" <<'PY'
import re, sys, collections
best = collections.OrderedDict()
for line in open(sys.argv[1]):
    m = re.match(r"(\w+)\s+(.+?):\s+([\d.]+) images/s on 1 core", line)
    if m:
        key = (m.group(2), m.group(1))
        best[key] = max(best.get(key, 0.0), float(m.group(3)))
for what in dict.fromkeys(k[0] for k in best):
    r, p = best.get((what, "rust"), 0), best.get((what, "pil"), 0)
    print(f"{what:22s} rust {r:7.1f}/s   pil {p:7.1f}/s   ratio {r / p if p else float('nan'):.2f}x")
PY
uptime
