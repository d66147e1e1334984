#!/usr/bin/env bash
# On the lent GPU machine, after gpu-kit's install (/tmp/site): make this checkout's vllm_knapspec importable
# and register its vLLM plugin entry point (what `pip install` would do), then run the given command.
#   bash tools/gpu_device.sh python3 tools/gpu_bench.py --shape qwen2.5-1.5b --out $OUT/qwen.json
set -euo pipefail
[ -f /tmp/site/gpukit.env ] || { echo "COLD: gpu-kit not installed on this machine"; exit 3; }
. /tmp/site/gpukit.env
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DI=/tmp/site/vllm_knapspec_checkout-0.0.dist-info
mkdir -p "$DI"
printf 'Metadata-Version: 2.1\nName: vllm-knapspec-checkout\nVersion: 0.0\n' > "$DI/METADATA"
printf '[vllm.general_plugins]\nknapspec = vllm_knapspec.plugin:register\n' > "$DI/entry_points.txt"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
