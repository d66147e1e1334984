"""`vllm.general_plugins` entry point: loaded by vLLM in every process (front-end, EngineCore, workers)."""

from __future__ import annotations


def register() -> None:
    from vllm_knapspec.adapter import metrics, patches

    patches.apply_all()
    metrics.ensure_metrics_dir()
    if metrics.is_root_process():
        metrics.register_collector()
