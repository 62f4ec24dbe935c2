#!/usr/bin/env bash
# patches/burn-flex is the crates.io source of burn-flex 0.21.0 with patches/burn-flex.patch
# applied (what changed and why: patches/burn-flex/FILA-PATCH.md). This script re-creates the
# folder from the published crate and the patch and fails if it differs from the one in the
# repository (CI runs it); after changing the fork, `--write` records the change in the patch.
#   bash scripts/flex_patch.sh            # check
#   bash scripts/flex_patch.sh --write    # regenerate patches/burn-flex.patch from the folder
# The crate comes from cargo's download cache when it is there, else from crates.io, and is
# checked against its SHA-256 (crates.io's checksum of burn-flex 0.21.0).
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.21.0
sha256=0098bf6555c151517b4c98ca0e8ed1ab6a976e40f5f4e967c117b00eee21e192
fork=patches/burn-flex
patch_file=patches/burn-flex.patch
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

crate=$work/burn-flex-$version.crate
cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/burn-flex-$version.crate 2>/dev/null | head -n 1 || true)
if [ -n "$cached" ]; then
  cp "$cached" "$crate"
else
  curl -sSfL --retry 3 -o "$crate" "https://static.crates.io/crates/burn-flex/burn-flex-$version.crate"
fi
echo "$sha256  $crate" | sha256sum -c --quiet
mkdir "$work/published"
tar -xzf "$crate" -C "$work/published" --strip-components=1

if [ "${1:-}" = --write ]; then
  cp -r "$fork" "$work/fork"
  # diff exits 1 when the trees differ, which is the point.
  (cd "$work" && diff -ruN published fork || [ $? -eq 1 ]) > "$patch_file"
  echo "wrote $patch_file: $(grep -c '^@@' "$patch_file") hunks in $(grep -c '^+++ ' "$patch_file") files"
  exit 0
fi

cp -r "$work/published" "$work/fork"
(cd "$work/fork" && git apply -p1 --whitespace=nowarn) < "$patch_file"
if ! diff -r "$work/fork" "$fork" > "$work/differences"; then
  echo "$fork is not the published burn-flex $version with $patch_file applied:" >&2
  head -n 40 "$work/differences" >&2
  echo "record a change to the fork with: bash scripts/flex_patch.sh --write" >&2
  exit 1
fi
echo "$fork = burn-flex $version from crates.io + $patch_file ($(grep -c '^@@' "$patch_file") hunks): identical"
