# Sourced by scripts/quickstart.sh and scripts/reading_demo.sh (from the repository root): builds the
# release binaries, starts the clock (`start`: timings are reported after the build) and makes the
# built-in synthetic dataset in `datasets/synth/generated` unless it is there already.
cargo build --release -p fila-cli -p fila-train
fila=target/release/fila
train=target/release/fila-train
data=datasets/synth/generated

start=$(date +%s)
# 600 held-out questions (150 per type) rather than the generator's default 100, so each type's
# accuracy is measured to a few points.
[ -f "$data/tokenizer.json" ] || "$fila" data synth --out "$data" --tile-size 56 --heldout 600
