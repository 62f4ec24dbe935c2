# Sourced by scripts/quickstart.sh and scripts/experiments/reading_demo.sh (from the repository root): builds the
# release binaries (or, with FILA_BIN=DIR, uses the `fila` and `fila-train` in DIR, e.g. a
# `--features cuda` build copied to a GPU machine without Rust), starts the clock (`start`: timings
# are reported after the build) and makes the built-in synthetic dataset in `datasets/synth/generated`
# unless it is there already.
if [ -n "${FILA_BIN:-}" ]; then
  bin=$(realpath "$FILA_BIN")
else
  cargo build --release -p fila-cli -p fila-train
  bin=${CARGO_TARGET_DIR:-$PWD/target}/release
fi
fila=$bin/fila
train=$bin/fila-train
data=datasets/synth/generated

start=$(date +%s)
# 600 held-out questions (150 per type) rather than the generator's default 100, so each type's
# accuracy is measured to a few points.
[ -f "$data/tokenizer.json" ] || "$fila" data synth --out "$data" --tile-size 56 --heldout 600
