#!/usr/bin/env bash
# Trains the tiny FILA to read a character, with and without the ConvNeXt branch (about 10 minutes on 2 cores).
#   bash scripts/reading_demo.sh [OUT]      # default OUT: checkpoints/reading
# One character per image (a code with every character but the first painted out), asked "What is
# the first character of the code?". Two arms, FILA and the ViT-only ablation, side by side: stage 1
# as in the quick start but with the reading ConvNeXt; then the stage-1 LLM learns to copy a
# character out of the image span (scripts/copy_llm.py, on text); then stage 2 trains CVFM and the
# projector with that LLM frozen; both are evaluated on held-out images and on the `fine` layout.
# Needs the Python packages of scripts/copy_llm.py (torch, transformers, tokenizers, safetensors)
# and numpy and pillow.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-checkpoints/reading}")

source scripts/synth_setup.sh
for sub in data one one-heldout one-fine; do rm -rf "${out:?}/$sub"; done
mkdir -p "$out"

# Images of another seed, normal layout with 14-pixel glyphs (what the reading ConvNeXt reads), and
# the fine layout; only the code question, asked for the first character.
"$fila" data synth --out "$out/data" --seed 3 --tile-size 56 --stage2 8000 --heldout 2000 --fine 200 >/dev/null
variants() { python3 scripts/code_variants.py --mode one --only-code "$@"; }
variants --layout normal --glyph-px 14 --data "$out/data/stage2_train.jsonl" --out "$out/one"
variants --layout normal --glyph-px 14 --data "$out/data/heldout.jsonl" --out "$out/one-heldout"
variants --data "$out/data/fine.jsonl" --out "$out/one-fine"

arm() { # name, extra stage-1 --set arguments...: stage 1, the copying LLM, stage 2 with it frozen, eval
  local name=$1; shift
  rm -rf "${out:?}/$name"
  "$train" --config configs/tiny/synth-stage1.toml --set "checkpoint.output_dir=\"$out/$name/stage1\"" \
    --set 'model.convnext="../../datasets/synth/towers/convnext-reading"' "$@"
  OMP_NUM_THREADS=1 python3 scripts/copy_llm.py --config configs/tiny/synth-stage2.toml --checkpoint "$out/$name/stage1/final" \
    --data "$out/one/stage2_train.jsonl" --out "$out/$name/copy-llm"
  "$train" --config configs/tiny/synth-stage2.toml --set "checkpoint.output_dir=\"$out/$name/stage2\"" \
    --set "model.checkpoint=\"$out/$name/copy-llm\"" \
    --set "data.sources=[{path=\"$out/one/stage2_train.jsonl\", image_folder=\"$out/one\"}]" \
    --set 'trainable.modules=["cvfm", "projector"]' --set train.max_steps=1500
  for split in heldout fine; do
    "$fila" eval --checkpoint "$out/$name/stage2/final" --data "$out/one-$split/$split.jsonl" --images "$out/one-$split" \
      --out "$out/$name/eval-$split.json" --logdir "$out/$name/stage2/tensorboard"
  done
}
# The two arms side by side (one core each on a 2-core machine); logs in OUT/NAME.log.
arm fila > "$out/fila.log" 2>&1 & fila_pid=$!
arm vit-only --set model.hybrid.use_convnext=false > "$out/vit-only.log" 2>&1 & vit_pid=$!
wait "$fila_pid" || { echo "the FILA arm failed: see $out/fila.log" >&2; exit 1; }
wait "$vit_pid" || { echo "the ViT-only arm failed: see $out/vit-only.log" >&2; exit 1; }
python3 - "$out" <<'PY'
import json, sys
for name in ("fila", "vit-only"):
    for split in ("heldout", "fine"):
        r = json.load(open(f"{sys.argv[1]}/{name}/eval-{split}.json"))["overall"]
        print(f"{name:9} {split:8} first character: {r['correct']}/{r['total']} ({r['accuracy']:.1%})")
PY
echo "reading demo finished in $(( $(date +%s) - start )) s (after the build); reports: $out/{fila,vit-only}/eval-*.json"
