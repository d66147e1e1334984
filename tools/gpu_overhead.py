"""What an engine with KnapSpec pays per step when it does not draft, against vLLM's defaults without speculation.

    bash tools/gpu_device.sh python3 tools/gpu_overhead.py --shape qwen2.5-1.5b --ctx 1024 --out $OUT/over.json

Two engines, both on the runner vLLM picks (V2 on a GPU, async scheduling): plain, and KnapSpec with drafting
off (`--noop`: its propose() returns at once, so only the engine's own cost of having a speculator remains).
Each decodes `--new` tokens at batch 1 under torch.profiler (CPU + CUDA) in its engine process. Printed per
decode step: wall time, device-kernel time and count, the device's busy share, and the CPU-side ops
(aten / CUDA runtime) whose time per step differs most between the two engines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_bench import _set_noop, _set_plan, _time_propose, write_config  # noqa: E402


def _start(worker):
    from torch.profiler import ProfilerActivity, profile

    worker._ks_prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    worker._ks_prof.__enter__()
    return True


def _stop(worker, steps):
    import torch

    torch.cuda.synchronize()
    p = worker._ks_prof
    p.__exit__(None, None, None)
    kern, cpu = [], {}
    for e in p.events():
        if str(getattr(e, "device_type", "")) == "DeviceType.CUDA":
            kern.append((e.time_range.start, e.time_range.end))
        else:
            r = cpu.setdefault(e.name[:80], [0, 0.0])
            r[0] += 1
            r[1] += e.self_cpu_time_total
    busy = sum(b - a for a, b in kern)
    span = (max(b for _, b in kern) - min(a for a, _ in kern)) if kern else 0
    return dict(
        kernels_per_step=len(kern) / steps,
        kernel_us_per_step=busy / steps,
        device_busy_share=busy / span if span else None,
        cpu={k: (c / steps, t / steps) for k, (c, t) in cpu.items()},
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--noop", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path = write_config(a.shape, a.ctx + a.new + 64)
    kw = dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=a.ctx + a.new + 64, max_num_seqs=16)
    kw.update(gpu_memory_utilization=0.2, seed=0)
    engines = {
        "knapspec": LLM(path, speculative_config={"method": "knapspec", "num_speculative_tokens": 4}, **kw),
        "plain": LLM(path, **kw),
    }
    ks = engines["knapspec"]
    ks.collective_rpc(_set_plan, args=("", 0))  # drafting off
    if a.noop:
        ks.collective_rpc(_time_propose)
        ks.collective_rpc(_set_noop, args=(True,))
    prompts = [TokensPrompt(prompt_token_ids=list(range(100, 100 + a.ctx)))]
    sp = SamplingParams(max_tokens=a.new, temperature=0.0, ignore_eos=True)
    out = dict(shape=a.shape, ctx=a.ctx, new=a.new, noop=a.noop)
    for name, e in engines.items():
        e.generate(prompts, sp, use_tqdm=False)  # warm
        t = time.perf_counter()
        e.generate(prompts, sp, use_tqdm=False)
        out[f"{name}_ms_per_token"] = (time.perf_counter() - t) / a.new * 1e3
        e.collective_rpc(_start)
        t = time.perf_counter()
        e.generate(prompts, sp, use_tqdm=False)
        wall = (time.perf_counter() - t) / a.new * 1e3
        r = e.collective_rpc(_stop, args=(a.new,))[0]
        r["profiled_ms_per_token"] = wall
        out[name] = r
    p, k = out["plain"], out["knapspec"]
    for name in ("plain", "knapspec"):
        r = out[name]
        print(
            "%-9s %.3f ms/token (%.3f profiled); kernels/step %.1f, kernel us/step %.1f, device busy %.2f"
            % (
                name,
                out[f"{name}_ms_per_token"],
                r["profiled_ms_per_token"],
                r["kernels_per_step"],
                r["kernel_us_per_step"],
                r["device_busy_share"] or 0,
            )
        )
    names = set(p["cpu"]) | set(k["cpu"])
    diff = sorted(
        ((k["cpu"].get(n, (0, 0))[1] - p["cpu"].get(n, (0, 0))[1], n) for n in names), key=lambda x: -abs(x[0])
    )
    print("CPU ops, knapspec - plain, us per step (count per step plain -> knapspec):")
    for d, n in diff[:30]:
        print("  %+8.1f  %5.2f -> %5.2f  %s" % (d, p["cpu"].get(n, (0, 0))[0], k["cpu"].get(n, (0, 0))[0], n))
    out["cpu_diff"] = [(round(d, 1), n) for d, n in diff[:60]]
    for name in ("plain", "knapspec"):
        out[name].pop("cpu")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
