#!/usr/bin/env python3
"""Benchmark the KnapSpec Triton kernels against their torch references.

GPU sizes (Llama-8B-like search): L = 32 -> 64 items, budget K in {32, 64, 160}, r = 32 tokens, d = 4096,
fp16/bf16 states; TPT grid C = 200 candidates x R = 16 requests x gamma <= 16. Also one whole knapsack_dp
(64 items, K = 160) with a trivial run_item, i.e. the DP's own overhead. Each kernel's output is checked
against the reference before it is timed. On CPU it runs tiny sizes through the torch path only.

    python tools/bench_kernels.py [--quick]
Prints device / torch / triton versions and a markdown table of median times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vllm_knapspec.core.dp import knapsack_dp  # noqa: E402
from vllm_knapspec.core.kernels import HAS_TRITON, interpret_mode  # noqa: E402
from vllm_knapspec.core.kernels.dp_step import dp_step  # noqa: E402
from vllm_knapspec.core.kernels.tpt_argmax import tpt_argmax  # noqa: E402


def median_ms(fn, cuda: bool, reps: int = 50) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=max(reps, 20), return_mode="median"))
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def events_ms(fn, reps: int = 5) -> float:
    """Median of CUDA-event times for calls that sync internally (knapsack_dp)."""
    fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def dp_inputs(K, r, d, dtype, dev, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ref = torch.randn(r, d, generator=g)
    prev = ref + torch.randn(K + 1, r, d, generator=g) * torch.rand(K + 1, 1, 1, generator=g) * 3
    exe = ref + torch.randn(K + 1, r, d, generator=g) * torch.rand(K + 1, 1, 1, generator=g) * 3
    pv = torch.rand(K + 1, generator=g) < 0.8
    return [t.to(dev, dtype) for t in (prev, exe, ref)] + [pv.to(dev)]


def tune_dp_step(items, r, d):
    from vllm_knapspec.core.kernels.dp_step import _blocks, dp_step_triton

    prev, exe, ref, pv = dp_inputs(160, r, d, torch.bfloat16, "cuda")
    base = dp_step(prev, exe, ref, 3, pv, 0.5, impl="torch")
    buf = torch.empty_like(prev)
    print(f"dp_step tiling sweep, K=160 r={r} d={d} bf16 (default {_blocks(r, d)})")
    print("| BLOCK_T | BLOCK_D | warps | median (ms) |\n|---|---|---|---|")
    for bd in (256, 512, 1024, 2048):
        for bt in (1, 2, 4, 8, 16):
            for nw in (4, 8, 16):
                if not 2048 <= bt * bd <= 16384:
                    continue
                cfg = (bt, bd, nw)
                out = dp_step_triton(prev, exe, ref, 3, pv, 0.5, out=buf, config=cfg)
                assert out.parent_skip.tolist() == base.parent_skip.tolist() and torch.equal(out.new, base.new)
                ms = median_ms(lambda: dp_step_triton(prev, exe, ref, 3, pv, 0.5, out=buf, config=cfg), True)
                print(f"| {bt} | {bd} | {nw} | {ms:.4f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--tune", action="store_true", help="CUDA: sweep dp_step tilings (BLOCK_T, BLOCK_D, warps)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    impls = ["torch", "triton"] if (cuda and HAS_TRITON) else ["torch"]
    tv = __import__("triton").__version__ if HAS_TRITON else "not installed"
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(
        f"device: {name} | torch {torch.__version__} | triton {tv}"
        + ("" if cuda else " | no CUDA: tiny sizes, torch path only (Triton needs CUDA to be timed)")
    )
    if interpret_mode():
        print("note: TRITON_INTERPRET=1 is set; it is ignored for timing (torch path on CPU)")

    if cuda:
        items, r, d = 64, 32, 4096
        Ks = [32, 64, 160] if not args.quick else [160]
        dtypes = [torch.float16, torch.bfloat16] if not args.quick else [torch.bfloat16]
        tpt_sizes = [(200, 16, 16), (200, 1, 16), (1000, 16, 16)] if not args.quick else [(200, 16, 16)]
    else:
        items, r, d = 8, 4, 64
        Ks, dtypes, tpt_sizes = [8], [torch.float32], [(20, 4, 8)]

    if args.tune and cuda and HAS_TRITON:
        tune_dp_step(items, r, d)
    rows = []

    def add(op, shape, times):
        t = times.get("torch")
        k = times.get("triton")
        rows.append((op, shape, t, k, (t / k) if (t and k) else None))

    for dtype in dtypes:
        for K in Ks:
            prev, exe, ref, pv = dp_inputs(K, r, d, dtype, dev)
            base = dp_step(prev, exe, ref, 3, pv, 0.5, impl="torch")
            times = {}
            for impl in impls:
                out = dp_step(prev, exe, ref, 3, pv, 0.5, impl=impl)
                assert out.parent_skip.tolist() == base.parent_skip.tolist(), impl
                assert out.valid.tolist() == base.valid.tolist(), impl
                assert torch.equal(out.new, base.new), impl
                buf = torch.empty_like(prev)
                times[impl] = median_ms(lambda: dp_step(prev, exe, ref, 3, pv, 0.5, impl=impl, out=buf), cuda)
            gb = (3 * (K + 1) * r * d * prev.element_size()) / 1e9  # ~read 2 candidates + write 1, per j
            if "triton" in times:
                print(f"dp_step K={K} {str(dtype)[6:]}: triton {gb / times['triton'] * 1e3:.0f} GB/s effective")
            add("dp_step", f"K={K} r={r} d={d} {str(dtype)[6:]}", times)

    # whole DP: 2L items with a trivial run_item, so the time is the DP machinery itself (+ host syncs)
    K = Ks[-1]
    dtype = dtypes[-1]
    g = torch.Generator(device="cpu").manual_seed(1)
    refs = torch.randn(items + 1, r, d, generator=g).to(dev, dtype)
    refs = refs.cumsum(0) / torch.arange(1, items + 2, device=dev, dtype=dtype)[:, None, None].sqrt()
    run_item = lambda i, h: h + 0.05 * refs[i + 1] - 0.05 * refs[i]  # noqa: E731  cheap, cos stays high
    frozen = (0, 1, items - 2, items - 1)
    res, times = {}, {}
    for impl in impls:
        call = lambda: knapsack_dp(run_item, refs, [3, 1] * (items // 2), K, 0.5, frozen, impl=impl)  # noqa: E731
        res[impl] = [(c.skipset, c.weight) for c in call()]
        times[impl] = events_ms(call) if cuda else median_ms(call, False, reps=3)
    assert len(set(map(tuple, res.values()))) == 1, "knapsack_dp impls disagree"
    add("knapsack_dp (trivial run_item)", f"{items} items K={K} r={r} d={d} {str(dtype)[6:]}", times)

    for C, R, G in tpt_sizes:
        gg = torch.Generator(device="cpu").manual_seed(C + R)
        alpha = (torch.rand(C, R, generator=gg) ** 0.3).to(dev)
        t_draft = (0.2 + 0.8 * torch.rand(C, generator=gg)).to(dev)
        base = tpt_argmax(alpha, t_draft, 1.0, G, impl="torch")
        times = {}
        for impl in impls:
            out = tpt_argmax(alpha, t_draft, 1.0, G, impl=impl)
            assert (out.best_c, out.best_gamma) == (base.best_c, base.best_gamma), impl
            times[impl] = median_ms(lambda: tpt_argmax(alpha, t_draft, 1.0, G, impl=impl), cuda)
        add("tpt_argmax (incl. host read)", f"C={C} R={R} gamma<={G}", times)

    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    print()
    print("| op | size | torch median (ms) | triton median (ms) | speedup |")
    print("|---|---|---|---|---|")
    for op, shape, t, k, s in rows:
        print(f"| {op} | {shape} | {fmt(t)} | {fmt(k)} | {'-' if s is None else f'{s:.2f}x'} |")


if __name__ == "__main__":
    main()
