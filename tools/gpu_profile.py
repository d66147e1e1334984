"""Where a draft step's GPU time goes: kernels per plain step vs per draft step, and the runner's own cost.

    bash tools/gpu_device.sh python3 tools/gpu_profile.py --shape qwen2.5-1.5b --ctx 1024 --out $OUT/prof.json

In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the profiler sees the worker), dummy weights:
  plain    vLLM's defaults (V2 runner, async scheduling)
  plainv1  the V1 runner, async scheduling, no speculation (what KnapSpec's engine is on the V1 runner)
  knapspec KnapSpec (the V2 runner's speculator, async scheduling): drafting off, with and without lookup
           drafts; full depth; 50 %
Prints (1) ms per output token at ctx x {1, 16}, interleaved; (2) the kernels of one plain decode step and of one
draft step (replays of the captured draft loop), by name, with count and device time per step; (3) device time
of one captured sublayer graph (attention, MLP, head) by CUDA events.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with this file's functions
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_bench import SHAPES, _Off, probe_set, write_config  # noqa: E402
from gpu_real import spec_counts  # noqa: E402


# -- worker-side (collective_rpc) ----------------------------------------------------------------------------
def _runner(worker):
    r = worker.model_runner
    return type(r).__module__


def _plan(worker, skip, gamma, lookup=True):
    from vllm_knapspec.core.selector import FixedSelector
    from vllm_knapspec.core.skipset import SkipSet

    d = worker.model_runner.drafter
    if not hasattr(d, "shipped_lookup"):
        d.shipped_lookup = d.device_lookup
    d.device_lookup = d.shipped_lookup if lookup else None
    d.selector = FixedSelector(SkipSet.parse(d.draft.num_layers, skip), gamma) if gamma else _Off()
    d.next_gamma = gamma
    return True


def _prof_start(worker):
    from torch.profiler import ProfilerActivity, profile

    worker._ks_prof = profile(activities=[ProfilerActivity.CUDA])
    worker._ks_prof.__enter__()
    return True


def _prof_stop(worker, per):
    import torch

    torch.cuda.synchronize()
    worker._ks_prof.__exit__(None, None, None)
    return kernel_table(worker._ks_prof, per)


def _prof_draft(worker, skip_str, ctx):
    """Kernels and event time of one draft step (replays of the captured 4-step loop), and of single
    sublayer graphs. Under inference mode: the graphs' input buffers are inference tensors."""
    import torch

    with torch.inference_mode():
        return _prof_draft_steps(worker, skip_str, ctx)


def _prof_draft_steps(worker, skip_str, ctx):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vllm_knapspec.core.skipset import SkipSet

    dr = worker.model_runner.drafter
    g = dr.graphs
    if g is None:
        return None
    skip = SkipSet.parse(dr.draft.num_layers, skip_str)
    one = torch.ones(1, dtype=torch.int64, device=dr.draft.device)
    nb = g.load(1, one * 5, one * ctx, one * 0)
    g.loop(nb, skip, 4)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            g.loop(nb, skip, 4)
        torch.cuda.synchronize()
    out = dict(kernels=kernel_table(prof, 40), step_us=event_us(lambda: g.loop(nb, skip, 4)) / 4)
    for b in (1, g.buckets[-1]):
        gs = g.graphs[b]
        out[f"sublayer_us_b{b}"] = dict(
            embed=event_us(gs[0].replay),
            attn0=event_us(gs[1].replay),
            mlp0=event_us(gs[2].replay),
            head=event_us(gs[-1].replay),
        )
    return out


def kernel_table(prof, per: float, top: int = 25) -> list[dict]:
    """Device kernels of a profile, per step: name, launches and microseconds."""
    rows = {}
    for e in prof.events():
        if getattr(e, "device_type", None) is None or str(e.device_type) != "DeviceType.CUDA":
            continue
        r = rows.setdefault(e.name[:90], [0, 0.0])
        r[0] += 1
        r[1] += e.device_time_total
    out = [dict(kernel=k, per_step=round(c / per, 2), us_per_step=round(t / per, 2)) for k, (c, t) in rows.items()]
    out.sort(key=lambda r: -r["us_per_step"])
    total = dict(
        kernel="TOTAL",
        per_step=round(sum(r["per_step"] for r in out), 1),
        us_per_step=round(sum(r["us_per_step"] for r in out), 1),
    )
    return [total] + out[:top]


def event_us(fn, reps: int = 50) -> float:
    import torch

    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=list(SHAPES))
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mem", type=float, default=0.2)
    ap.add_argument("--kernel-bs", type=int, default=1, help="batch of the profiled plain decode steps")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    batches = [int(b) for b in a.batches.split(",")]
    max_len = a.ctx + a.new + 64
    path = write_config(a.shape, max_len)
    L = SHAPES[a.shape]["num_hidden_layers"]
    kw = dict(
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=max_len,
        max_num_seqs=max(16, *batches),
        gpu_memory_utilization=a.mem,
        seed=0,
        disable_log_stats=False,
    )
    engines = {"plain": LLM(path, **kw)}
    engines["knapspec"] = LLM(
        path, speculative_config={"method": "knapspec", "num_speculative_tokens": 4, "skip_set": ""}, **kw
    )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # read by the engine's own processes
    engines["plainv1"] = LLM(path, **kw)
    del os.environ["VLLM_USE_V2_MODEL_RUNNER"]
    info = {n: e.collective_rpc(_runner)[0] for n, e in engines.items()}
    print("runners", info, flush=True)
    ks = engines["knapspec"]
    s50 = probe_set(L, 0.5)
    out = dict(shape=a.shape, ctx=a.ctx, runners=info, e2e=[], gpu=torch.cuda.get_device_name(0))
    variants = [
        ("plain", None),
        ("plainv1", None),
        ("ks_off", ("", 0)),
        ("ks_off_nolookup", ("", 0, False)),
        ("ks_full", ("", 4)),
        ("ks_50", (s50, 4)),
    ]
    for bs in batches:
        prompts = [
            TokensPrompt(prompt_token_ids=[(1000 + 7 * i + 13 * j) % 30000 + 10 for j in range(a.ctx)])
            for i in range(bs)
        ]
        sp = SamplingParams(max_tokens=a.new, temperature=0.0, ignore_eos=True)
        for e in engines.values():
            e.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
        times = {v: [] for v, _ in variants}
        drafted = {v: 0 for v, _ in variants}
        for rep in range(a.reps + 1):
            for v, plan in variants[rep % len(variants) :] + variants[: rep % len(variants)]:
                if plan is not None:
                    ks.collective_rpc(_plan, args=plan)
                e = ks if plan is not None else engines[v]
                before = spec_counts(e).get("draft_tokens", 0)
                t = time.perf_counter()
                e.generate(prompts, sp, use_tqdm=False)
                if rep:
                    times[v].append((time.perf_counter() - t) / a.new * 1e3)
                    drafted[v] += spec_counts(e).get("draft_tokens", 0) - before
        ms = {v: statistics.median(t) for v, t in times.items()}
        row = dict(
            bs=bs, ms_per_token=ms, ratio_plain_over={v: ms["plain"] / m for v, m in ms.items()}, draft_tokens=drafted
        )
        out["e2e"].append(row)
        print(json.dumps(row), flush=True)

    # (2) kernels: plain decode steps (batch --kernel-bs: V2, V1, KnapSpec with drafting off) vs replays of the
    # captured draft loop
    prompts = [
        TokensPrompt(prompt_token_ids=[100 + (i * 131 + j) % 30000 for j in range(a.ctx)]) for i in range(a.kernel_bs)
    ]
    for name, lookup in (("plain", None), ("plainv1", None), ("knapspec", True), ("knapspec_nolookup", False)):
        e = engines[name.split("_")[0]]
        if lookup is not None:
            ks.collective_rpc(_plan, args=("", 0, lookup))
        e.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
        e.collective_rpc(_prof_start)
        e.generate(prompts, SamplingParams(max_tokens=33, temperature=0.0, ignore_eos=True), use_tqdm=False)
        out[f"kernels_{name}_step"] = e.collective_rpc(_prof_stop, args=(32,))[0]
    if a.out:  # the kernels of plain steps survive a failure in the draft-step profile
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    for name, skip in (("full", ""), ("50", s50)):
        r = ks.collective_rpc(_prof_draft, args=(skip, a.ctx))[0]
        if r is not None:
            out[f"kernels_draft_step_{name}"] = r.pop("kernels")
            out[f"draft_{name}"] = r
    for k in [k for k in out if k.startswith("kernels_")]:
        print(k)
        for r in out[k]:
            print("   %8.1f us %6.2fx  %s" % (r["us_per_step"], r["per_step"], r["kernel"]))
    for k in [k for k in out if k.startswith("draft_")]:
        print(k, out[k])
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
