#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B-Instruct onto a lent GPU machine, which has no internet and takes at most 64 MiB of working
# tree per call: the checked GGUF (1.1 GB, already compressed) travels in 50 MiB chunks, one per device call, back
# to back on one warm machine, and is converted there with the image's torch + transformers (docs/models.md).
#
#   here    bash scripts/gpu_model.sh pack       # .gpumodel/all/c01..cNN + SHA256SUMS (the checked GGUF),
#                                                # .gpumodel/wheels/gguf-*.whl, .gpumodel/tokenizer/ (this
#                                                # machine's converted tokenizer); prints the number of chunks
#   for N in 1..NN:
#     here    bash scripts/gpu_model.sh stage N  # .gpumodel/now/ holds chunk N alone (+ SHA256SUMS)
#     device  bash scripts/gpu_model.sh unpack   # carry [".gpumodel/now"]: checks chunk N and adds it to
#                                                # /tmp/knapspec-model/parts/, says which chunks are still missing
# or, with no `stage` call here between device calls:
#     device  bash scripts/gpu_model.sh take N   # carry [".gpumodel/all/cNN", ".gpumodel/all/SHA256SUMS"]
#   device  bash scripts/gpu_model.sh convert    # carry [".gpumodel/wheels", ".gpumodel/tokenizer"]: joins the
#                                                # parts, checks the sha256, writes the bf16 folder
#                                                # /tmp/knapspec-model/Qwen2.5-Coder-1.5B-Instruct and
#                                                # /tmp/knapspec-model/READY (what a queued run waits for)
# `convert` puts the carried `gguf` wheel (pure Python; it also imports numpy and pyyaml, which transformers
# requires) on PYTHONPATH from a temp --target dir unless the image has gguf. It then overwrites the tokenizer files
# with the carried ones: transformers versions build different tokenizers from a GGUF (5.17: eos <|endoftext|>,
# 5.19: eos <|im_end|>), the weights come out bit-identical; so the GPU folder equals this machine's.
# A device call that does not carry an ignored path removes it there: the call that runs `convert` carries
# .gpumodel/wheels and .gpumodel/tokenizer (and the last chunk), and `convert` finishes in that call. Run it again
# with .gpumodel/tokenizer carried to restore the tokenizer files of a converted folder.
# A call's 64 MiB include the working tree (~8.5 MiB): if stage says a call would carry more, pack again with a
# smaller CHUNK_MIB. .gpumodel/ is git-ignored (.git/info/exclude); never commit it. PY: the python to use (pack:
# <repo>/.venv/bin/python if present; device: python3). GPU_MODEL_DIR overrides /tmp/knapspec-model.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
CHUNK=$(( ${CHUNK_MIB:-50} * 1048576 ))        # a chunk + the working tree that travels must stay <= 64 MiB
PACK=$ROOT/.gpumodel
DEV=${GPU_MODEL_DIR:-/tmp/knapspec-model}
MODEL=$DEV/Qwen2.5-Coder-1.5B-Instruct
missing() { awk '{print $2}' "$DEV/parts/SHA256SUMS" | while read -r c; do [ -f "$DEV/parts/$c" ] || echo "$c"; done | xargs; }

case "${1:-}" in
  pack)
    PY=${PY:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
    grep -qxF '/.gpumodel/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpumodel/' >> "$ROOT/.git/info/exclude"
    G=$("$PY" "$ROOT/scripts/get_model.py" qwen2.5-coder-1.5b --gguf-only | tail -1)
    F=$("$PY" "$ROOT/scripts/get_model.py" qwen2.5-coder-1.5b | tail -1)        # converts here once (~90 s)
    rm -rf "$PACK" && mkdir -p "$PACK/all" "$PACK/wheels" "$PACK/tokenizer"
    cp "$F"/tokenizer.json "$F"/tokenizer_config.json "$F"/chat_template.jinja "$PACK/tokenizer/"
    split -b $CHUNK -d -a 2 --numeric-suffixes=1 "$G" "$PACK/all/c"
    (cd "$PACK/all" && sha256sum c?? > SHA256SUMS)
    V=$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")   # the version tested here
    "$PY" -m pip download -q --no-deps "gguf==$V" -d "$PACK/wheels"
    echo "$(ls "$PACK"/all/c?? | wc -l) chunks in $PACK/all; wheels: $(ls "$PACK/wheels")" ;;
  stage)
    N=$(printf '%02d' "$((10#${2:?usage: stage N}))")
    [ -f "$PACK/all/c$N" ] || { echo "no chunk c$N in $PACK/all (run pack)"; exit 2; }
    rm -rf "$PACK/now" && mkdir -p "$PACK/now"
    cp "$PACK/all/c$N" "$PACK/all/SHA256SUMS" "$PACK/now/"
    T=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    echo "staged c$N of $(wc -l < "$PACK/all/SHA256SUMS"); this call carries $(( (T + $(du -cb "$PACK/now" | tail -1 | cut -f1)) / 1048576 )) MiB of 64" ;;
  unpack)
    [ -f "$PACK/now/SHA256SUMS" ] || { echo "nothing carried: run 'stage N' here and carry .gpumodel/now"; exit 2; }
    mkdir -p "$DEV/parts"
    cp "$PACK"/now/SHA256SUMS "$DEV/parts/"
    for c in "$PACK"/now/c??; do
      [ -e "$c" ] || { echo "no chunk carried in .gpumodel/now"; exit 2; }
      (cd "$PACK/now" && grep " $(basename "$c")\$" SHA256SUMS | sha256sum -c --quiet) \
        || { echo "$(basename "$c") arrived damaged: stage it and carry it again"; exit 1; }
      cp "$c" "$DEV/parts/"
    done
    M=$(missing)
    echo "chunks on this machine: $(ls "$DEV"/parts/c?? | wc -l) of $(wc -l < "$DEV/parts/SHA256SUMS"); missing: ${M:-none}" ;;
  take)
    N=$(printf '%02d' "$((10#${2:?usage: take N}))")
    [ -f "$PACK/all/c$N" ] || { echo "carry .gpumodel/all/c$N and .gpumodel/all/SHA256SUMS"; exit 2; }
    rm -rf "$PACK/now" && mkdir -p "$PACK/now" && mv "$PACK/all/c$N" "$PACK/now/" && cp "$PACK/all/SHA256SUMS" "$PACK/now/"
    exec bash "$0" unpack ;;
  convert)
    PY=${PY:-python3}
    [ -f "$PACK/tokenizer/tokenizer.json" ] || { echo "carry .gpumodel/tokenizer (and .gpumodel/wheels)"; exit 2; }
    [ -f "$MODEL/config.json" ] && { cp "$PACK"/tokenizer/* "$MODEL/"; touch "$DEV/READY"; echo "$MODEL"; exit 0; }
    [ -f "$DEV/parts/SHA256SUMS" ] || { echo "no chunks on this machine: unpack them first"; exit 2; }
    M=$(missing); [ -z "$M" ] || { echo "chunks missing on this machine: $M"; exit 2; }
    cat "$DEV"/parts/c?? > "$DEV/q.gguf"
    echo "$SHA  $DEV/q.gguf" | sha256sum -c --quiet || { echo "joined GGUF has the wrong sha256"; exit 1; }
    if ! "$PY" -c "import gguf" 2>/dev/null; then
      W=$(ls "$PACK"/wheels/gguf-*.whl | head -1)
      "$PY" -m pip install -q --no-deps --no-index --target "$DEV/pylib" "$W" 2>/dev/null \
        || "$PY" -m zipfile -e "$W" "$DEV/pylib"                             # a pure-Python wheel is a zip
      export PYTHONPATH=$DEV/pylib${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PY" "$ROOT/scripts/get_model.py" qwen2.5-coder-1.5b --from-gguf "$DEV/q.gguf" --out "$MODEL" >/dev/null
    rm -f "$DEV/q.gguf"
    cp "$PACK"/tokenizer/* "$MODEL/"
    touch "$DEV/READY"
    echo "$MODEL" ;;
  *) echo "usage: $0 pack | stage N | unpack | take N | convert"; exit 2 ;;
esac
