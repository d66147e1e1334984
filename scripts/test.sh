#!/usr/bin/env bash
# The test command (README, .ci/run): install (idempotent, cached under .cache/), then the default suite.
# Slow tests (-m slow) and benchmarks (knapspec-bench) run separately.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# the slow tests also need ray (tests/test_ray.py: vLLM's Ray executor on CPU)
case " $* " in *slow*) export KNAPSPEC_EXTRAS=ray ;; esac
bash "$ROOT/scripts/install.sh"
cd "$ROOT"
# TRITON_INTERPRET=1: the Triton kernels' tests run in Triton's interpreter (it must be set before triton is
# imported); the real-model engine tests pick kernels "torch", as "auto" resolves on a CPU deployment.
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/python" -m pytest tests -m "not slow" -q -p no:cacheprovider --timeout 1800 "$@"
