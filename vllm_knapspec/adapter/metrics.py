"""KnapSpec metrics: counted where the draft runs (the worker), exposed where vLLM serves /metrics.

vLLM's own spec-decode metrics (vllm:spec_decode_num_drafts, ..._num_accepted_tokens_per_pos) already count
KnapSpec's drafts, because KnapSpec drafts go through vLLM's scheduler and rejection sampler. The metrics
below are KnapSpec's own. Workers are separate processes, so each writes a small JSON snapshot (at most
every SNAPSHOT_S, from a background thread: the write + rename takes 1.5-3.5 ms on a CI machine's disk, a
stall of the engine step it landed in) into $VLLM_KNAPSPEC_METRICS_DIR; the front-end process registers a
prometheus_client Collector that reads them at scrape time. Names start with "vllm:" so `LLM.get_metrics()`
returns them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV_DIR = "VLLM_KNAPSPEC_METRICS_DIR"
SNAPSHOT_S = 0.5

COUNTERS = {
    "draft_fallbacks": "Draft steps that raised and fell back to plain decoding",
    "draft_steps": "Single-token draft forward passes",
    "no_spec_steps": "Engine steps where the selector chose plain decoding",
    "selections": "Skip-set selections (DP runs)",
    "selections_passed": "Due selections not run: no skip set within the budget could beat plain decoding "
    "by the bar, even with every draft token accepted",
    "guard_stops": "Times drafting was switched off because the plan decoded slower than plain decoding",
    "guard_capped_steps": "Plan steps counted as at most 4 typical steps by the guard (one-off costs: JIT, capture)",
    "selection_seconds": "Time spent selecting skip sets (DP runs and the new plan's draft-graph captures)",
    "draft_seconds": "Time spent drafting",
    "verify_seconds": "Time between drafts (verification step and engine overhead)",
    "lookup_draft_tokens": "Draft tokens from prompt lookup (vLLM's n-gram matcher)",
    "lookup_accepted_tokens": "Prompt-lookup draft tokens accepted by verification",
    "lookup_guard_stops": "Times lookup drafts were switched off because they decoded slower than plain decoding",
    "layer_skip_draft_tokens": "Draft tokens from the layer-skip draft, in steps that also weighed lookup drafts",
    "layer_skip_accepted_tokens": "Layer-skip draft tokens accepted, in steps that also weighed lookup drafts",
}
GAUGES = {
    "skipped_attention": "Attention sublayers skipped by the current draft",
    "skipped_mlp": "MLP sublayers skipped by the current draft",
    "draft_length": "Draft length gamma of the current plan",
    "drafting_enabled": "1 if the selector currently speculates, 0 if it chose plain decoding",
    "predicted_tpt_speedup": "Predicted tokens-per-time of the plan relative to plain decoding",
    "predicted_acceptance": "Acceptance rate predicted for the current skip set",
    "realised_acceptance": "Acceptance rate measured since the last selection",
    "realised_tpt_speedup": "Measured tokens-per-time of the current plan relative to plain decoding",
    "selection_overhead_ratio": "Selection time as a share of decode wall time",
    "prediction_scale": "Measured / predicted speedup of the last plan that ran (<= 1); discounts later predictions",
    "latency_model_error": "Median absolute relative error of the latency model (label kind)",
    "latency_coefficient": "Latency model coefficients in seconds (label name)",
}


class KnapSpecStats:
    _instance: "KnapSpecStats | None" = None

    def __init__(self):
        self.counters = {k: 0.0 for k in COUNTERS}
        self.gauges: dict[str, float | dict[str, float]] = {}
        self._dirty = False
        self._writer_pid = None  # pid whose background writer runs (a forked child starts its own)
        self._warned = False

    @classmethod
    def get(cls) -> "KnapSpecStats":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    # -- recording (hot path: no I/O except a throttled snapshot) ----------------------------------
    def inc(self, name: str, value: float = 1.0) -> None:
        self.counters[name] += value
        self._maybe_write()

    def set(self, name: str, value, label: str | None = None) -> None:
        if label is None:
            self.gauges[name] = float(value)
        else:
            self.gauges.setdefault(name, {})[label] = float(value)

    def fallback(self, logger: logging.Logger) -> None:
        self.counters["draft_fallbacks"] += 1
        if not self._warned:
            logger.exception(
                "KnapSpec draft failed; this step decodes without speculation "
                "(counted in vllm:knapspec_draft_fallbacks_total, logged once)"
            )
            self._warned = True
        self._maybe_write(force=True)

    def drafted(self, steps: int) -> None:
        self.inc("draft_steps", steps)

    def no_spec_step(self) -> None:
        self.inc("no_spec_steps")

    def tick(self, name: str) -> None:
        """inc(name) for the hot path of a plain step: the writer thread is running by then (inc started it)."""
        self.counters[name] += 1
        self._dirty = True

    # -- snapshots -----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "pid": os.getpid(),
            "time": time.time(),
            "counters": dict(self.counters),
            "gauges": json.loads(json.dumps(self.gauges)),
        }

    def _maybe_write(self, force: bool = False) -> None:
        """Hot path: mark dirty; the background writer (started once per process) writes within SNAPSHOT_S.
        force: write now, in this thread (a fallback, flush)."""
        self._dirty = True
        if force:
            self._write()
        elif self._writer_pid != os.getpid() and os.environ.get(ENV_DIR):
            self._writer_pid = os.getpid()
            threading.Thread(target=self._writer_loop, name="knapspec-metrics", daemon=True).start()

    def _writer_loop(self) -> None:
        while True:
            time.sleep(SNAPSHOT_S)
            if self._dirty:
                self._write()

    def _write(self) -> None:
        d = os.environ.get(ENV_DIR)
        if not d:
            return
        self._dirty = False
        p = Path(d) / f"worker-{os.getpid()}.json"
        tmp = p.with_suffix(f".{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, p)
        except RuntimeError:  # a gauge dict changed size under the snapshot: next time
            self._dirty = True
        except OSError:
            pass

    def flush(self) -> None:
        self._maybe_write(force=True)


_owned_dir: str | None = None


def is_root_process() -> bool:
    """The process that serves /metrics (the `vllm serve` front-end or the user's `LLM` process). vLLM
    starts EngineCore and workers with multiprocessing, so they have a parent_process(); the root does not,
    even when its own parent (a test runner, a supervisor) already had a metrics folder in its environment."""
    import multiprocessing

    return multiprocessing.parent_process() is None and not _in_ray_worker()


def _in_ray_worker() -> bool:
    """A Ray worker (vLLM's Ray executor) has no multiprocessing parent either; on the driver's node it gets
    the driver's metrics folder through vLLM's env forwarding. Ray is imported already in such a process."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - an unexpected Ray version: count as a root (old behaviour)
        return False


def ensure_metrics_dir() -> str:
    """Called in every process by the plugin: the root process makes a fresh folder (an inherited one
    belongs to some other server) and vLLM's children inherit it through the environment."""
    global _owned_dir
    if is_root_process():
        if _owned_dir is None:
            _owned_dir = tempfile.mkdtemp(prefix="knapspec-metrics-")
        os.environ[ENV_DIR] = _owned_dir
    elif not os.environ.get(ENV_DIR):  # e.g. a Ray worker on another node: count locally
        os.environ[ENV_DIR] = tempfile.mkdtemp(prefix="knapspec-metrics-")
    return os.environ[ENV_DIR]


def read_snapshots(d: str | None = None) -> list[dict]:
    d = d or os.environ.get(ENV_DIR)
    out = []
    if d and Path(d).is_dir():
        for p in Path(d).glob("worker-*.json"):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
    # In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) count in this very process: read them live,
    # not from their last snapshot file.
    if KnapSpecStats._instance is not None:
        out = [s for s in out if s["pid"] != os.getpid()] + [KnapSpecStats._instance.snapshot()]
    return out


class KnapSpecCollector:
    """prometheus_client custom collector over the workers' snapshots (counters summed over workers,
    gauges labelled by worker pid)."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snaps = read_snapshots()
        for name, doc in COUNTERS.items():
            c = CounterMetricFamily(f"vllm:knapspec_{name}", doc)
            c.add_metric([], sum(s["counters"].get(name, 0.0) for s in snaps))
            yield c
        for name, doc in GAUGES.items():
            labelled = name in ("latency_model_error", "latency_coefficient")
            labels = ["worker"] + (["kind" if name == "latency_model_error" else "name"] if labelled else [])
            g = GaugeMetricFamily(f"vllm:knapspec_{name}", doc, labels=labels)
            for s in snaps:
                v = s["gauges"].get(name)
                if v is None:
                    continue
                if labelled:
                    for k, x in v.items():
                        g.add_metric([str(s["pid"]), k], x)
                else:
                    g.add_metric([str(s["pid"])], v)
            yield g


_registered = False


def register_collector() -> None:
    global _registered
    if _registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(KnapSpecCollector())
    _registered = True
