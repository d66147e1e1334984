#!/usr/bin/env bash
# The test command (README, .ci/run): install (idempotent, cached under .cache/), lint (ruff check, ruff format
# --check), then the default suite (unit and engine tests). Slow tests (-m slow) and benchmarks (knapspec-bench)
# run separately; `-m "not engine and not slow"` runs the unit tests alone. Pytest settings: pyproject.toml.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# the slow tests also need ray (tests/test_ray.py: vLLM's Ray executor on CPU)
case " $* " in *slow*) export KNAPSPEC_EXTRAS=ray ;; esac
bash "$ROOT/scripts/install.sh"
cd "$ROOT"
"$ROOT/.venv/bin/ruff" check .
"$ROOT/.venv/bin/ruff" format --check .
# TRITON_INTERPRET=1: the Triton kernels' tests run in Triton's interpreter (it must be set before triton is
# imported); the real-model engine tests pick kernels "torch", as "auto" resolves on a CPU deployment.
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/python" -m pytest -m "not slow" -q "$@"
