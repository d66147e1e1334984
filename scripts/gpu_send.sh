#!/usr/bin/env bash
# KnapSpec on the lent GPU (device tool, 64 MiB per call): local preparation and the device-side steps.
#
# Here (CPU machine), once per device session:
#   bash scripts/gpu_send.sh prep      # model GGUF -> xz -> chunks a,b,c under .gpukit/model/; package snapshot in
#                                      # .gpukit/src (what the device imports); gguf wheel in .whl; payload sizes
#   KS_SEED_STATE=out/gpu bash scripts/gpu_send.sh prep   # also ship an earlier session's greedy reference
# Device calls, back to back (the machine is given back after 30 s idle; /tmp survives between calls):
#   1 carry [.gpukit/p1, .gpukit/model/a]              bash scripts/gpu_send.sh stash p1 a
#   2 carry [.gpukit/p2, .gpukit/model/b, .gpukit/src] bash scripts/gpu_send.sh stash p2 b && \
#                                                      bash scripts/gpu_send.sh work env,cost8b 330
#   3 carry [.gpukit/model/c, .whl, .gpukit/src]       bash scripts/gpu_send.sh stash - c && \
#                                                      bash scripts/gpu_send.sh work convert,plain_v1,knapspec 560
#   4 carry [.gpukit/src]                              bash scripts/gpu_send.sh work ksgraph,plain_v2,ngram 575
# Results: $OUT/<phase>.json and $OUT/log-<phases>.txt come back; `python3 scripts/gpu_run.py report DIR`
# tabulates them, `python3 scripts/gpu_run.py profiles DIR` writes configs/profiles/.
set -uo pipefail
cmd=${1:?prep|stash|work}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

case "$cmd" in
prep)
  set -e
  grep -qx '/.gpukit/' .git/info/exclude || echo '/.gpukit/' >> .git/info/exclude
  grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
  GGUF=.cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$GGUF" ] || python3 scripts/get_model.py >/dev/null
  mkdir -p .gpukit/model
  [ -f .gpukit/model/gguf.xz ] || xz -6 -T0 -c "$GGUF" > .gpukit/model/gguf.xz
  rm -rf .gpukit/model/a .gpukit/model/b .gpukit/model/c
  mkdir -p .gpukit/model/a .gpukit/model/b .gpukit/model/c
  CH=${CHUNK_BYTES:-14000000}
  dd if=.gpukit/model/gguf.xz of=.gpukit/model/a/gguf.xz.a bs=1M iflag=count_bytes count="$CH" status=none
  dd if=.gpukit/model/gguf.xz of=.gpukit/model/b/gguf.xz.b bs=1M iflag=skip_bytes,count_bytes skip="$CH" \
     count="$CH" status=none
  dd if=.gpukit/model/gguf.xz of=.gpukit/model/c/gguf.xz.c bs=1M iflag=skip_bytes skip=$((2 * CH)) status=none
  cat .gpukit/model/?/gguf.xz.? | cmp - .gpukit/model/gguf.xz
  # the package as the device imports it (the working tree may change while the calls run)
  rm -rf .gpukit/src && mkdir -p .gpukit/src/tests .gpukit/src/scripts .gpukit/src/configs
  cp -r vllm_knapspec kernels .gpukit/src/
  cp tests/prompts.py .gpukit/src/tests/ && cp scripts/get_model.py .gpukit/src/scripts/
  cp configs/knapspec.yaml .gpukit/src/configs/ && cp -r configs/profiles .gpukit/src/configs/   # ab: H100 profile
  find .gpukit/src -name __pycache__ -prune -exec rm -rf {} +
  (git rev-parse HEAD; git status --short; git diff | sha256sum) > .gpukit/src/SNAPSHOT.txt
  # a later device session can reuse the greedy reference of an earlier one: KS_SEED_STATE=out/gpu
  if [ -n "${KS_SEED_STATE:-}" ] && [ -f "$KS_SEED_STATE/plain_v1_outputs.json" ]; then
    mkdir -p .gpukit/src/state && cp "$KS_SEED_STATE/plain_v1_outputs.json" .gpukit/src/state/
  fi
  [ -n "$(ls .whl/gguf-*.whl 2>/dev/null)" ] || python3 -m pip download -q --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl gguf==0.19.0
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
  sz() { du -sb "$@" | awk '{s+=$1} END {print s}'; }
  lim=67108864
  for c in "1 .gpukit/p1 .gpukit/model/a" "2 .gpukit/p2 .gpukit/model/b .gpukit/src" \
           "3 .gpukit/model/c .whl .gpukit/src" "4 .gpukit/src"; do
    set -- $c; n=$1; shift
    tot=$(( tree + $(sz "$@") ))
    echo "call $n: carry $* -> $tot bytes ($(( (lim - tot) / 1024 )) KiB under 64 MiB)"
    [ "$tot" -lt "$lim" ] || { echo "call $n is over the limit" >&2; exit 1; }
  done
  ;;
stash)   # stash PART MODEL_CHUNK  (PART '-' for none)
  part=$1; chunk=$2
  mkdir -p /tmp/ks-parts
  [ "$chunk" = - ] || cp .gpukit/model/"$chunk"/* /tmp/ks-parts/
  echo "ks-parts: $(ls /tmp/ks-parts | tr '\n' ' ')"
  [ "$part" = - ] || bash .gpukit/"$part"/install.sh --stash
  ;;
work)    # work PHASES BUDGET_S
  phases=$1; budget=${2:-540}
  [ -f /tmp/site/gpukit.env ] || { echo "COLD: /tmp/site missing, resend the kit parts" >&2; exit 3; }
  . /tmp/site/gpukit.env
  d=/tmp/site/vllm_knapspec-0.1.0.dist-info
  if [ ! -d "$d" ]; then
    mkdir -p "$d"
    printf 'Metadata-Version: 2.1\nName: vllm-knapspec\nVersion: 0.1.0\n' > "$d/METADATA"
    printf '[vllm.general_plugins]\nknapspec = vllm_knapspec.plugin:register\n' > "$d/entry_points.txt"
    : > "$d/RECORD"
  fi
  SRC=$ROOT; [ -d .gpukit/src/vllm_knapspec ] && SRC=$ROOT/.gpukit/src
  if [ -d .gpukit/src/state ]; then mkdir -p /tmp/ks-state; for f in .gpukit/src/state/*.json; do [ -f "/tmp/ks-state/${f##*/}" ] || cp "$f" /tmp/ks-state/; done; fi
  export KS_SRC=$SRC PYTHONPATH=$SRC:$PYTHONPATH PYTHONUNBUFFERED=1 VLLM_CACHE_ROOT=/tmp/vllm-cache
  mkdir -p "${OUT:-/tmp/ks-out}"
  python3 scripts/gpu_run.py run "$phases" --budget "$budget" 2>&1 | tee "${OUT:-/tmp/ks-out}/log-${phases//,/-}.txt" \
    | grep --line-buffered -vE "(INFO|DEBUG) [0-9]{2}-[0-9]{2} |it/s\]|Processed prompts|Adding requests"
  ;;
*)
  echo "usage: gpu_send.sh prep | stash PART CHUNK | work PHASES BUDGET" >&2; exit 2 ;;
esac
