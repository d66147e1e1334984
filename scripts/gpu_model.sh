#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B-Instruct onto the lent GPU machine, which takes at most 64 MiB of tree per call.
#   here:   bash scripts/gpu_model.sh pack          # the checked GGUF -> .gpumodel/c01..c18 (60 MiB) + gguf wheel
#   device: one call per chunk, back to back on one warm machine, each carrying only its chunk:
#           run("bash scripts/gpu_model.sh unpack", carry=[".gpumodel/c01"]) ... c17
#           run("bash scripts/gpu_model.sh unpack convert && ...", carry=[".gpumodel/c18", ".gpumodel/gguf-<v>.whl"])
# `convert` joins the chunks, checks the sha256 and writes /tmp/knapspec-model/Qwen2.5-Coder-1.5B-Instruct with
# the image's transformers (~110 s). .gpumodel/ is git-ignored (.git/info/exclude).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
PARTS=/tmp/knapspec-model/parts
MODEL=/tmp/knapspec-model/Qwen2.5-Coder-1.5B-Instruct
case "${1:-}" in
  pack)
    cd "$ROOT"
    grep -qx '/.gpumodel/' .git/info/exclude 2>/dev/null || echo '/.gpumodel/' >> .git/info/exclude
    G=$(python scripts/get_model.py qwen2.5-coder-1.5b --gguf-only | tail -1)
    rm -rf .gpumodel && mkdir -p .gpumodel
    split -b 62914560 -d -a 2 --numeric-suffixes=1 "$G" .gpumodel/c
    python -m pip download -q --no-deps gguf -d .gpumodel
    ls .gpumodel ;;
  unpack)
    mkdir -p "$PARTS"
    cp "$ROOT"/.gpumodel/c?? "$PARTS"/ 2>/dev/null || true
    echo "chunks on the device: $(ls "$PARTS" | wc -l)"
    [ "${2:-}" = convert ] || exit 0
    [ -f "$MODEL/config.json" ] && { echo "$MODEL"; exit 0; }
    cat "$PARTS"/c?? > /tmp/knapspec-model/q.gguf
    echo "$SHA  /tmp/knapspec-model/q.gguf" | sha256sum -c
    python3 -m pip install -q --no-deps --no-index --target /tmp/knapspec-model/gguf "$ROOT"/.gpumodel/gguf-*.whl
    PYTHONPATH=/tmp/knapspec-model/gguf:${PYTHONPATH:-} python3 "$ROOT/scripts/get_model.py" qwen2.5-coder-1.5b \
      --from-gguf /tmp/knapspec-model/q.gguf --out "$MODEL" ;;
  *) echo "usage: $0 pack | unpack [convert]"; exit 2 ;;
esac
