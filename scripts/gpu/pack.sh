#!/usr/bin/env bash
# Builds and packs what scripts/gpu/check.sh runs on a GPU machine, which needs no Rust toolchain:
# the `--features cuda` binaries `fila` and `fila-train` and the test binaries it runs there
# (fila-train's `cuda` start test; fila-model's `parity`, `gelu`, `fila_model` and `hybrid` on CUDA), all
# stripped, in one xz tarball. A device call carries at most 64 MiB, so the script fails when the
# tarball is larger.
#
# Usage (from the repository root; CARGO_TARGET_DIR is honoured):
#   bash scripts/gpu/pack.sh [OUT]        # default OUT: target/gpu-bundle.tar.xz
# PROFILE=dev packs debug builds instead (a quick check of the packing itself; debug binaries
# are several times larger and may not fit).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/gpu-bundle.tar.xz}
profile=${PROFILE:-release}
limit=$((64 << 20))
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# Cargo names each built executable in its JSON messages: take those rather than guess paths.
executables() {
  grep -o '"executable":"[^"]*"' | sed 's/^"executable":"//; s/"$//'
}
bins=$(cargo build --profile "$profile" --features cuda -p fila-cli -p fila-train --message-format=json | executables)
# (`cargo test` also names the binaries it builds for the tests: only `deps/` holds test binaries.)
tests=$(
  cargo test --profile "$profile" --features cuda -p fila-train --test cuda --no-run --message-format=json | executables | grep /deps/
  cargo test --profile "$profile" --features cuda -p fila-model --test parity --test gelu --test fila_model --test hybrid --no-run --message-format=json | executables | grep /deps/
)
for f in $bins $tests; do
  name=$(basename "$f")
  # Test binaries are named `<test>-<hash>`: keep `<test>`.
  case $f in */deps/*) name=${name%-*} ;; esac
  strip -o "$stage/$name" "$f"
done
ls -l "$stage"
tar -C "$stage" -cf - . | xz -9 -T0 > "$out"
size=$(stat -c %s "$out")
echo "$out: $((size >> 20)) MiB ($size bytes) for $(ls "$stage" | wc -l) files"
if [ "$size" -gt "$limit" ]; then
  echo "too large: a device call carries at most 64 MiB (leave a test binary out, or build with PROFILE=release)" >&2
  exit 1
fi
