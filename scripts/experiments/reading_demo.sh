#!/usr/bin/env bash
# Trains the tiny FILA to read a character, with and without the ConvNeXt branch (about 20 minutes on 2 cores).
#   bash scripts/experiments/reading_demo.sh [OUT]      # default OUT: checkpoints/reading
# One character per image (a code with every character but the first painted out), asked "What is
# the first character of the code?". Two arms, FILA and the ViT-only ablation: stage 1 as in the
# quick start but with the reading ConvNeXt; then the stage-1 LLM learns to copy a character out of
# the image span (scripts/experiments/copy_llm.py, on text); then stage 2 trains CVFM and the projector with that
# LLM frozen; both are evaluated on held-out images and on the `fine` layout.
# Settings (environment variables, defaults in brackets):
#   SEEDS ["0"]      copying-LLM seeds: each arm trains one copying LLM and one stage 2 per seed
#   BATCH [32], STEPS [750], DEVICE [cpu]   stage 2's micro-batch, steps and device ("cuda:0")
#   ARMS ["fila vit-only"]   the arms to run
#   JOBS [2]         runs side by side
#   PHASE [all]      `prepare` (data, stage 1, copying LLMs), `train` (stage 2 and eval from the
#                    copying LLMs that `prepare` left in OUT, e.g. copied to a GPU machine), or `all`
#   FILA_BIN         a folder with prebuilt `fila` and `fila-train` (no cargo build)
# Outputs: OUT/{fila,vit-only}/stage1, OUT/ARM/s<SEED>/{copy-llm,stage2,eval-heldout.json,eval-fine.json},
# logs in OUT/ARM*.log, and OUT/summary-b<BATCH>.txt.
# Needs the Python packages of scripts/experiments/copy_llm.py (torch, transformers, tokenizers, safetensors)
# and numpy and pillow.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(realpath -m "${1:-checkpoints/reading}")
seeds=${SEEDS:-0} batch=${BATCH:-32} steps=${STEPS:-750} device=${DEVICE:-cpu} jobs=${JOBS:-2} phase=${PHASE:-all}
case $phase in all|prepare|train) ;; *) echo "PHASE=$phase: expected all, prepare or train" >&2; exit 2 ;; esac
arms=${ARMS:-fila vit-only}
for arm in $arms; do
  case $arm in fila|vit-only) ;; *) echo "ARMS: unknown arm \`$arm\` (expected fila and/or vit-only)" >&2; exit 2 ;; esac
done

source scripts/synth_setup.sh
arm_args() { # arm: its extra stage-1 --set arguments, one per line
  printf '%s\n' --set 'model.convnext="../../datasets/synth/towers/convnext-reading"'
  if [ "$1" = vit-only ]; then printf '%s\n' --set model.hybrid.use_convnext=false; fi
}
launch() { # log, command...: runs the command in the background (at most JOBS at a time), output to log
  local log=$1; shift
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  ( "$@" > "$log" 2>&1 || { echo "$log" >> "$out/failed"; exit 1; } ) &
}
finish() { # what: waits for every run; fails naming the logs of those that failed
  wait
  if [ -f "$out/failed" ]; then echo "$1 failed: see $(tr '\n' ' ' < "$out/failed")" >&2; exit 1; fi
}

make_data() { # the one-character training, held-out and fine sets
  for sub in data one one-heldout one-fine; do rm -rf "${out:?}/$sub"; done
  mkdir -p "$out"
  # Images of another seed, normal layout with 14-pixel glyphs (what the reading ConvNeXt reads), and
  # the fine layout; only the code question, asked for the first character.
  "$fila" data synth --out "$out/data" --seed 3 --tile-size 56 --stage2 8000 --heldout 2000 --fine 200 >/dev/null
  local cut=(python3 scripts/experiments/code_variants.py --mode one --only-code) normal=(--layout normal --glyph-px 14)
  launch "$out/one.log" "${cut[@]}" "${normal[@]}" --data "$out/data/stage2_train.jsonl" --out "$out/one"
  launch "$out/one-heldout.log" "${cut[@]}" "${normal[@]}" --data "$out/data/heldout.jsonl" --out "$out/one-heldout"
  launch "$out/one-fine.log" "${cut[@]}" --data "$out/data/fine.jsonl" --out "$out/one-fine"
  finish "code_variants.py"
  rm -rf "${out:?}/data"
}

rm -f "$out/failed"
if [ "$phase" != train ]; then
  for arm in $arms; do rm -rf "${out:?}/$arm"; done
  make_data
  for arm in $arms; do
    mapfile -t extra < <(arm_args "$arm")
    launch "$out/$arm.stage1.log" "$train" --config configs/tiny/synth-stage1.toml \
      --set "checkpoint.output_dir=\"$out/$arm/stage1\"" "${extra[@]}"
  done
  finish "stage 1"
  for arm in $arms; do for seed in $seeds; do
    launch "$out/$arm-s$seed.copy.log" env OMP_NUM_THREADS=1 python3 scripts/experiments/copy_llm.py \
      --config configs/tiny/synth-stage2.toml --fila "$fila" --checkpoint "$out/$arm/stage1/final" \
      --data "$out/one/stage2_train.jsonl" --seed "$seed" --out "$out/$arm/s$seed/copy-llm"
  done; done
  finish "copy_llm.py"
fi

if [ "$phase" != prepare ]; then
  for arm in $arms; do for seed in $seeds; do
    [ -d "$out/$arm/s$seed/copy-llm" ] || { echo "no copying LLM in $out/$arm/s$seed/copy-llm: run PHASE=prepare with SEEDS=\"$seeds\" first" >&2; exit 1; }
  done; done
  # The data is deterministic: made again where only the copying LLMs were brought along.
  [ -f "$out/one-fine/fine.jsonl" ] || make_data
  stage2() { # arm, seed: stage 2 from the copying LLM with it frozen, then eval on both splits
    local run=$out/$1/s$2
    rm -rf "$run/stage2" "$run"/eval-*.json
    "$train" --config configs/tiny/synth-stage2.toml --set "checkpoint.output_dir=\"$run/stage2\"" \
      --set "model.checkpoint=\"$run/copy-llm\"" --set "device=\"$device\"" \
      --set "data.sources=[{path=\"$out/one/stage2_train.jsonl\", image_folder=\"$out/one\"}]" \
      --set 'trainable.modules=["cvfm", "projector"]' --set train.max_steps="$steps" \
      --set batch.micro_batch_size="$batch" || return 1
    for split in heldout fine; do
      "$fila" eval --checkpoint "$run/stage2/final" --data "$out/one-$split/$split.jsonl" --images "$out/one-$split" \
        --out "$run/eval-$split.json" --logdir "$run/stage2/tensorboard" || return 1
    done
  }
  for arm in $arms; do for seed in $seeds; do
    launch "$out/$arm-s$seed.stage2.log" stage2 "$arm" "$seed"
  done; done
  finish "stage 2"
  python3 - "$out" "$arms" "$seeds" <<'PY' | tee "$out/summary-b$batch.txt"
import json, sys
out, arms, seeds = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
for arm in arms:
    for seed in seeds:
        losses = [json.loads(l)["loss"] for l in open(f"{out}/{arm}/s{seed}/stage2/metrics.jsonl")]
        tail = losses[-max(1, len(losses) // 10):]
        found = [json.load(open(f"{out}/{arm}/s{seed}/eval-{split}.json"))["overall"] for split in ("heldout", "fine")]
        print(f"{arm:9} seed {seed}: stage-2 loss over the last tenth {sum(tail) / len(tail):.2f}; first character: "
              + "; ".join(f"{split} {r['correct']}/{r['total']} ({r['accuracy']:.1%})" for split, r in zip(("held-out", "fine"), found)))
PY
fi
echo "reading demo ($phase) finished in $(( $(date +%s) - start )) s (after the build); outputs in $out"
