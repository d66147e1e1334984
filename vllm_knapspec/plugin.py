"""`vllm.general_plugins` entry point: loaded by vLLM in every process (front-end, EngineCore, workers)."""
from __future__ import annotations

import os


def register() -> None:
    from vllm_knapspec import metrics, patches

    root = metrics.ENV_DIR not in os.environ      # the first vLLM process; children inherit the env
    patches.apply_all()
    metrics.ensure_metrics_dir()
    if root:
        metrics.register_collector()
