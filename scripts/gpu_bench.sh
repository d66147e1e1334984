#!/usr/bin/env bash
# The GPU step-cost benchmark: vLLM's defaults without speculation (plain, plus plain2 as the A/A control) against
# KnapSpec on the same runner and scheduling with drafting off, a full-depth draft and 25 % / 50 % of the sublayers
# skipped, side by side and interleaved, for any model shape (dummy weights); prints ms per token, the ratios and
# the per-step draft / verify / plain times (docs/gpu.md has the tables and what each column means).
#
#   bash scripts/gpu_bench.sh --shape qwen2.5-1.5b --cells 1024x1,1024x16,16384x16 --reps 8 --out qwen.json
#   bash scripts/gpu_bench.sh --shape llama-3.1-8b --mem 0.28 --cells 1024x1,1024x16
#
# Where vLLM is installed as a package (pip install "vllm>=0.26,<0.33" and this package), it runs as is; on a
# machine set up by shared/gpu-kit (vLLM under /tmp/site) it runs through tools/gpu_device.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -f /tmp/site/gpukit.env ]; then
  exec bash "$ROOT/tools/gpu_device.sh" python3 "$ROOT/tools/gpu_bench.py" "$@"
fi
exec python3 "$ROOT/tools/gpu_bench.py" "$@"
