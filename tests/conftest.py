"""Shared fixtures. vLLM runs in-process and eager on CPU (~4 s per engine instead of ~50 s); engines are
module-scoped so each test module pays for them once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on the shared cores
os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))


def pytest_collection_modifyitems(items):
    """Tests that need the real model (an engine, a server or its tokenizer) are `engine` tests (markers: pyproject):
    `-m "not engine and not slow"` runs the unit tests alone."""
    for item in items:
        if "model_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)


@pytest.fixture(scope="session")
def model_path() -> str:
    out = subprocess.check_output([sys.executable, str(ROOT / "scripts" / "get_model.py")], text=True)
    return out.strip().splitlines()[-1]


ENGINE_KW = dict(
    enforce_eager=True,
    distributed_executor_backend="uni",
    max_model_len=4096,
    dtype="float32",
    gpu_memory_utilization=0.5,
    disable_log_stats=False,
    seed=0,
)


def make_llm(model, speculative_config=None, **kw):
    from vllm import LLM

    return LLM(model, speculative_config=speculative_config, **{**ENGINE_KW, **kw})


def drafter_of(llm):
    """The KnapSpecDrafter inside an in-process engine (tests only)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner.drafter


def spec_counters(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode") or m.name.startswith("vllm:knapspec"):
            out[m.name] = getattr(m, "values", None) or getattr(m, "value", None)
    return out
