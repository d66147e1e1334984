"""Which CUDA graph the V2 runner replays for each step of a traced KnapSpec run, by vLLM's own dispatcher.

    python tools/graph_dispatch.py docs/data/v2-qwen-coder-1.5b-real-h100-graph-dispatch.json --cell 0 \
        --vllm-source /tmp/gpukit-build/site/vllm/v1/worker/gpu/cudagraph_utils.py   # vLLM 0.26's lists

KnapSpec verifies 0..k drafts per request, so a step is a uniform batch of n requests x q tokens, q in 1..1+k.
For each (n, q) in the trace of a `tools/gpu_real.py --raw-trace` run this prints the steps, their median gap,
and the graph that vLLM's CudaGraphManager (the installed vLLM's, built without a device: `graph_manager`)
dispatches to with vLLM's candidate lists and with the v2_decode_graphs patch's (`full_graphs_first`). A step
that finds no FULL graph runs its attention outside a graph: PIECEWISE, or eagerly where no PIECEWISE graph is
listed either (vLLM 0.26; 0.32 lists one). Quiet plain steps (q = 1) are traced in windows and shown apart.
Capture sizes are vLLM's defaults for max_num_seqs 16: 1, 2, 4, then steps of 8 up to 2 x 16 x (1 + k).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from types import SimpleNamespace


def manager_class(source: str | None = None):
    """vLLM's CudaGraphManager: the installed vLLM's, or the one in `source`, a vllm/v1/worker/gpu/cudagraph_utils.py
    of another vLLM (its imports resolved by the installed one): vLLM 0.26's, whose lists run a batch eagerly where
    0.32's run it PIECEWISE, from the GPU kit's tree (.gpukit or /tmp/gpukit-build/site after build.sh)."""
    if source is None:
        from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

        return CudaGraphManager
    import importlib.util

    spec = importlib.util.spec_from_file_location("_graph_dispatch_source", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CudaGraphManager


def graph_manager(k: int, max_num_reqs: int = 16, capture_sizes: list[int] | None = None, cls=None, mode=None):
    """vLLM's CudaGraphManager for an engine verifying up to k drafts per request, built without a device from the
    fields its candidate lists read (cudagraph `mode`, FULL_AND_PIECEWISE unless given; no LoRA, no
    micro-batching). Returns the manager and its speculative config (`num_speculative_tokens_per_batch_size`
    unset)."""
    from vllm.config import CUDAGraphMode

    spec = SimpleNamespace(knapspec={}, num_speculative_tokens=k, num_speculative_tokens_per_batch_size=None)
    spec.uses_dynamic_speculative_decoding = lambda: spec.num_speculative_tokens_per_batch_size is not None
    sizes = capture_sizes or [1, 2, 4] + list(range(8, min(2 * max_num_reqs * (k + 1), 512) + 1, 8))
    m = object.__new__(cls or manager_class())
    fields = dict(
        vllm_config=SimpleNamespace(
            speculative_config=spec, num_speculative_tokens=k, cache_config=SimpleNamespace(use_kda_recoverssm=False)
        ),
        compilation_config=SimpleNamespace(cudagraph_capture_sizes=sizes, max_cudagraph_capture_size=sizes[-1]),
        cudagraph_mode=mode or CUDAGraphMode.FULL_AND_PIECEWISE,
        max_num_reqs=max_num_reqs,
        decode_query_len=1 + k,
        varlen_decode=False,
        ubatch_runner=None,
        lora_capture_cases=[0],
        _lora_dispatch_map={},
        _max_lora_case=0,
        use_breakable_cg=False,
        _candidates={},
        _capture_descs={},
    )
    for name, value in fields.items():
        setattr(m, name, value)
    return m, spec


def dispatchers(k: int, max_num_reqs: int = 16, source: str | None = None, mode=None):
    """(vLLM's lists, the patch's lists): two captured managers with the same FULL decode graphs for 1..1+k
    tokens per request (v2_decode_graphs' schedule)."""
    from vllm_knapspec.adapter.patches import runner_v2

    cls = manager_class(source)
    own, spec = graph_manager(k, max_num_reqs, cls=cls, mode=mode)
    spec.num_speculative_tokens_per_batch_size = runner_v2.decode_lengths_schedule(k)
    cls._init_candidates(own)
    spec.num_speculative_tokens_per_batch_size = None
    patched, _ = graph_manager(k, max_num_reqs, cls=cls, mode=mode)
    runner_v2._make_init_candidates(cls._init_candidates)(patched)
    for m in (own, patched):
        m._graphs_captured = True
    return own, patched


def _mode(m, n: int, q: int) -> str:
    d = m.dispatch(n, n * q, q, 0)
    if d.cg_mode.name == "NONE":
        return "NONE (eager)"
    return d.cg_mode.name + ("" if d.uniform_token_count is None else f" {d.num_reqs}x{d.uniform_token_count}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json", help="tools/gpu_real.py --raw-trace output")
    ap.add_argument("--cell", type=int, default=0)
    ap.add_argument("--method", default="knapspec")
    ap.add_argument("--new", type=int, default=256, help="tokens per request of the run")
    ap.add_argument("--vllm-source", default=None, help="another vLLM's v1/worker/gpu/cudagraph_utils.py")
    a = ap.parse_args()
    import vllm

    d = json.load(open(a.json))
    c = d["bench"][a.cell]
    k = d["knapspec_config"]["num_speculative_tokens"]
    by_rep = c["by_rep"] if isinstance(c["by_rep"], dict) else json.loads(c["by_rep"])
    own, patched = dispatchers(k, source=a.vllm_source)
    gaps, quiet = defaultdict(list), defaultdict(list)
    for rep in by_rep[a.method]:
        for gap, _, verified, _, n in rep["trace"][2:]:  # the first two may belong to the run before
            gaps[(n, verified // n + 1 if n else 1)].append(gap)
        for steps, ms, n, _ in rep["quiet"]:  # n = 0: the batch changed inside the window
            quiet[n].append(ms / steps)
    by = a.vllm_source or f"vLLM {vllm.__version__}"
    print(f"{c['kind']} {c['ctx']} x {c['bs']}, speedup {c['speedup']}; graphs by {by}")
    print("requests x tokens | steps | median ms | vLLM's lists | full_graphs_first")
    for (n, q), g in sorted(gaps.items()):
        print(f"{n:>3} x {q} | {len(g):>4} | {statistics.median(g):7.2f} | {_mode(own, n, q)} | {_mode(patched, n, q)}")
    for n, per in sorted(quiet.items()):
        if n:
            print(
                f"{n:>3} x 1 quiet | {len(per):>4} windows | {statistics.median(per):7.2f} per step | "
                f"{_mode(own, n, 1)} | {_mode(patched, n, 1)}"
            )
    for method, counts in (c.get("graphs") or {}).items():  # what the runner dispatched, where it was recorded
        modes = {}
        for key, n in counts.items():
            modes[key.split()[0]] = modes.get(key.split()[0], 0) + n
        print(f"recorded by the runner, {method}: {modes}")
    full = {key: statistics.median(g) for key, g in gaps.items() if _full(own, *key)}
    plain = statistics.median(c["all_ms"]["plain"])
    print("Estimate, not a measurement: ms per token of each repetition as run -> with each traced step and quiet")
    print("window that found no FULL graph at the median gap of the FULL steps of the same q, nearest batch")
    print(f"(quiet windows whose batch changed are left as run; plain: {plain:.2f}):")
    for rep in by_rep[a.method]:
        saved = 0.0
        for gap, _, verified, _, n in rep["trace"][2:]:
            q = verified // n + 1 if n else 1
            saved += gap - _nearest(full, n, q, gap) if n and not _full(own, n, q) else 0.0
        for steps, ms, n, _ in rep["quiet"]:
            saved += ms - steps * _nearest(full, n, 1, ms / steps) if n and not _full(own, n, 1) else 0.0
        print(f"  {rep['ms']:.2f} -> {rep['ms'] - saved / a.new:.2f}")


def _full(m, n: int, q: int) -> bool:
    return m.dispatch(n, n * q, q, 0).cg_mode.name == "FULL"


def _nearest(full: dict, n: int, q: int, default: float) -> float:
    near = [(abs(m - n), g) for (m, p), g in full.items() if p == q]
    return min(near)[1] if near else default


if __name__ == "__main__":
    main()
