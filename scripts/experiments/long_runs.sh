#!/usr/bin/env bash
# Longer tiny-FILA runs than the quick start, four variants trained side by side (a GPU holds them
# all), to see what more steps, a larger LLM and a reading ConvNeXt do to code reading:
#   fila-reading-L  reading ConvNeXt (datasets/synth/towers/convnext-reading), LLM 256 wide, 4 layers
#   vit-only-L      the same with the ConvNeXt branch off (the ablation)
#   fila-L          committed ConvNeXt, LLM 256 wide, 4 layers
#   fila-reading-S  reading ConvNeXt, the quick start's LLM (128 wide, 2 layers)
# Each: stage 1 on STAGE1_CAPTIONS captions (one epoch), stage 2 for STAGE2_STEPS steps of 4 on
# STAGE2_RECORDS distinct records, stopped at LIMIT seconds if slower (the stopped run is then
# exported at the step it reached, by resuming it with that length), then eval on held-out and fine.
# Usage (from the repository root; binaries from `cargo build --release [--features cuda]`):
#   bash scripts/experiments/long_runs.sh BIN_DIR DEVICE OUT_DIR [STAGE1_CAPTIONS STAGE2_RECORDS STAGE2_STEPS LIMIT]
#   e.g. bash scripts/experiments/long_runs.sh target/release cuda:0 /tmp/long 2400 8000 2000 300
# Outputs: OUT_DIR/<variant>/{s1,s2}/ (runs), OUT_DIR/<variant>.*.log, OUT_DIR/<variant>.eval-*.json,
# and OUT_DIR/summary.txt. The dataset goes to OUT_DIR/data (seed 0, 600 held-out, 300 fine).
set -u
bin=$(cd "$1" && pwd); device=$2; out=$(mkdir -p "$3" && cd "$3" && pwd)
n1=${4:-2400}; n2=${5:-8000}; steps2=${6:-2000}; limit=${7:-300}
root=$(pwd); data=$out/data; start=$(date +%s)
say() { echo "[$(( $(date +%s) - start )) s] $*"; }

"$bin/fila" data synth --out "$data" --tile-size 56 --stage1 "$n1" --stage2 "$n2" --heldout 600 --fine 300 \
  > "$out/synth.log" 2>&1 || { cat "$out/synth.log"; exit 1; }
say "dataset: $(tail -n 1 "$out/synth.log")"

large=(--set model.llm.hidden_size=256 --set model.llm.intermediate_size=768 --set model.llm.num_hidden_layers=4
  --set model.llm.num_attention_heads=8 --set model.llm.num_key_value_heads=4)
reading=(--set "model.convnext=\"$root/datasets/synth/towers/convnext-reading\"")
variant_args() { # variant name: sets the array `extra` to its overrides
  case $1 in
    fila-reading-L) extra=("${reading[@]}" "${large[@]}") ;;
    vit-only-L) extra=("${large[@]}" --set model.hybrid.use_convnext=false) ;;
    fila-L) extra=("${large[@]}") ;;
    fila-reading-S) extra=("${reading[@]}") ;;
  esac
}
names="fila-reading-L vit-only-L fila-L fila-reading-S"
on_data() { # stage-file name: the device and data overrides
  printf '%s\n' --set "device=\"$device\"" --set "data.tokenizer=\"$data/tokenizer.json\"" \
    --set "data.sources=[{path=\"$data/$1\", image_folder=\"$data\"}]" --set data.loader.workers=3
}
mapfile -t data1 < <(on_data stage1.jsonl)
mapfile -t data2 < <(on_data stage2_train.jsonl)

for n in $names; do
  variant_args "$n"
  "$bin/fila-train" --config configs/tiny/synth-stage1.toml "${data1[@]}" "${extra[@]}" \
    --set "checkpoint.output_dir=\"$out/$n/s1\"" > "$out/$n.s1.log" 2>&1 &
done
wait
say "stage 1 done"

stage2() { # variant, time limit (s), extra arguments...
  local n=$1 t=$2; shift 2
  timeout --foreground -s INT -k 120 "$t" "$bin/fila-train" --config configs/tiny/synth-stage2.toml "${data2[@]}" \
    --set "model.checkpoint=\"$out/$n/s1/final\"" --set "checkpoint.output_dir=\"$out/$n/s2\"" \
    --set checkpoint.every_steps=250 "$@" >> "$out/$n.s2.log" 2>&1
}
for n in $names; do
  (
    stage2 "$n" "$limit" --set train.max_steps="$steps2"
    reached=$(sed -n 's/^stopped at step \([0-9]*\);.*/\1/p' "$out/$n.s2.log" | tail -n 1)
    if [ -n "$reached" ]; then stage2 "$n" 600 --resume --set train.max_steps="$reached"; fi
  ) &
done
wait
say "stage 2 done"

for n in $names; do for split in heldout fine; do
  "$bin/fila" eval --checkpoint "$out/$n/s2/final" --data "$data/$split.jsonl" --out "$out/$n.eval-$split.json" \
    > "$out/$n.eval-$split.log" 2>&1 &
done; done
wait
say "eval done"
{
  for n in $names; do
    echo "== $n: $(grep -c '' "$out/$n/s2/metrics.jsonl" 2>/dev/null) stage-2 steps; $(grep '^done' "$out/$n.s2.log" | tail -n 1)"
    for split in heldout fine; do grep -v '^wrote' "$out/$n.eval-$split.log"; done
  done
} | tee "$out/summary.txt"
