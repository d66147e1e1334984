"""Where a full step's host time goes: cProfile around KnapSpecDrafter.propose_step inside the engine's worker.

    bash tools/gpu_device.sh python3 tools/gpu_host_profile.py --shape qwen2.5-1.5b --ctx 1024 --bs 16 \
        --out $OUT/host-profile.json

One KnapSpec engine (the shipped config: selector, `lookup: auto`; V2 runner, async scheduling; dummy weights),
every engine step made a full step (quiet_step off), so each step runs the selector's feed, the lookup choice
and the device lookup search. Per variant (lookup drafts on / off): host ms per full propose(), and the functions
with the most own and cumulative time. A 1.5B model's decode step takes ~2.3 ms at 1K x 16 on an H100; a full
propose() that takes 1.5 ms of it is on the engine loop's critical path (docs/real-model.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with this file's functions
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_bench import SHAPES, write_config  # noqa: E402


def _profile_on(worker, lookup: bool):
    import cProfile

    d = worker.model_runner.drafter
    if not hasattr(d, "shipped_lookup"):
        d.shipped_lookup = d.device_lookup
        d.untimed_propose_step = d.propose_step
    d.device_lookup = d.shipped_lookup if lookup else None
    d.quiet_step = lambda *a, **k: None  # every step a full step
    prof, times = cProfile.Profile(), []

    def profiled(*args, **kw):
        t0 = time.perf_counter()
        prof.enable()
        try:
            return d.untimed_propose_step(*args, **kw)
        finally:
            prof.disable()
            times.append(time.perf_counter() - t0)

    d.propose_step = profiled
    worker.ks_host_prof = (prof, times)
    return True


def _profile_take(worker, top: int):
    import io
    import pstats
    import statistics

    prof, times = worker.ks_host_prof
    d = worker.model_runner.drafter
    d.propose_step = d.untimed_propose_step
    d.__dict__.pop("quiet_step", None)
    d.device_lookup = d.shipped_lookup
    out = {"calls": len(times), "median_ms": statistics.median(times) * 1e3 if times else None}
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(top)
        out[key] = s.getvalue()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=list(SHAPES))
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--mem", type=float, default=0.3)
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = a.ctx + a.new + 64
    path = write_config(a.shape, max_len)
    ks = LLM(
        path,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=max_len,
        max_num_seqs=max(16, a.bs),
        gpu_memory_utilization=a.mem,
        seed=0,
        speculative_config={"method": "knapspec", "num_speculative_tokens": 5},
    )
    prompts = [
        TokensPrompt(prompt_token_ids=[(1000 + 7 * i + 13 * j) % 30000 + 10 for j in range(a.ctx)]) for i in range(a.bs)
    ]
    sp = SamplingParams(max_tokens=a.new, temperature=0.0, ignore_eos=True)
    ks.generate(prompts, sp, use_tqdm=False)  # warm
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out = dict(shape=a.shape, ctx=a.ctx, bs=a.bs, gpu=gpu, variants={})
    for name, lookup in (("lookup", True), ("no_lookup", False), ("lookup_2", True)):
        ks.collective_rpc(_profile_on, args=(lookup,))
        t = time.perf_counter()
        ks.generate(prompts, sp, use_tqdm=False)
        ms = (time.perf_counter() - t) / a.new * 1e3
        res = ks.collective_rpc(_profile_take, args=(a.top,))[0]
        res["ms_per_token"] = ms
        out["variants"][name] = res
        print(f"== {name}: {res['calls']} full steps, host {res['median_ms']:.3f} ms per propose, {ms:.2f} ms/token")
        print(res["tottime"][-6000:])
        print(res["cumulative"][-7000:], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
