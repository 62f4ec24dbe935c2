#!/usr/bin/env bash
# The quick start: build, generate the synthetic dataset, train the tiny FILA through stage 1 and
# stage 2 on CPU, and evaluate it on the held-out and `fine` splits.
#   bash scripts/quickstart.sh              # FILA (ViT + ConvNeXt fused by CVFM)
#   bash scripts/quickstart.sh --ablation   # also the same run with the ConvNeXt branch off
# Outputs: checkpoints/synth-*/ (checkpoints, TensorBoard logs, eval-*.json reports).
set -euo pipefail
cd "$(dirname "$0")/.."

ablation=0
[ "${1:-}" = "--ablation" ] && ablation=1

source scripts/synth_setup.sh

run() { # name, extra --set arguments...
  local name=$1; shift
  rm -rf "checkpoints/$name-stage1" "checkpoints/$name-stage2"
  "$train" --config configs/tiny/synth-stage1.toml --set "checkpoint.output_dir=\"../../checkpoints/$name-stage1\"" "$@"
  "$train" --config configs/tiny/synth-stage2.toml --set "checkpoint.output_dir=\"../../checkpoints/$name-stage2\"" \
    --set "model.checkpoint=\"../../checkpoints/$name-stage1/final\""
  for split in heldout fine; do
    "$fila" eval --checkpoint "checkpoints/$name-stage2/final" --data "$data/$split.jsonl" \
      --logdir "checkpoints/$name-stage2/tensorboard"
  done
}

run synth
[ "$ablation" = 1 ] && run synth-vit-only --set model.hybrid.use_convnext=false
echo "quick start finished in $(( $(date +%s) - start )) s (after the build)"
echo "curves: tensorboard --logdir checkpoints"
