"""The device lookup's CUDA graphs (vllm_knapspec/adapter/lookup_graphs.py) against the compiled search they
replay, on a GPU without an engine: the same drafts and match info step by step over random batches and widths
(token ids from 8 values, so rows match), then the host time of one `DeviceLookup.propose` per step, graphed and
not, at batch 1 and 4 with a context growing a token per step.

    bash tools/gpu_device.sh python3 tools/gpu_lookup_graphs.py --out $OUT/lookup-graphs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vllm_knapspec.adapter.lookup_device import DeviceLookup, LookupSource


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    cfg = type("Cfg", (), {"lookup_min": 2, "lookup_max": 5})
    dl = DeviceLookup(cfg, 5, dev, 8192)
    t = time.perf_counter()
    dl.compile()
    res = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, compile_s=time.perf_counter() - t)
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(0, 8, (16, 8192), generator=gen, dtype=torch.int32).to(dev)
    total = torch.randint(64, 8192, (16,), generator=gen, dtype=torch.int32).to(dev)
    a_buf = torch.zeros(16, 5, dtype=torch.int64, device=dev)
    b_buf = torch.zeros(16, 5, dtype=torch.int64, device=dev)
    graphs, same, matched = dl.graphs, 0, 0
    trials = 200
    for i in range(trials):  # graphed vs compiled, random batch and width
        n = int(torch.randint(1, 5, (1,), generator=gen))  # 4 batches x 7 width buckets: under MAX_GRAPHS
        idx = torch.randperm(16, generator=gen)[:n].to(torch.int32).to(dev)
        width = int(torch.randint(16, 2048, (1,), generator=gen))
        src = LookupSource(table, total, idx, [f"r{j}" for j in range(n)], width)
        dl.graphs = graphs
        ra = dl.propose(src, None, a_buf[:n])
        dl.graphs = None
        rb = dl.propose(src, None, b_buf[:n])
        torch.cuda.synchronize()
        # what a record is read for: the first n rows' match lengths, the last n rows' shadow trials
        used = lambda r: (r.m.tolist(), r.shadow.tolist())  # noqa: E731
        same += torch.equal(a_buf[:n], b_buf[:n]) and used(ra) == used(rb)
        matched += int((ra.info[0, :n] > 0).sum())
    dl.graphs = graphs
    res.update(trials=trials, equal=same, rows_matched=matched, graphs=len(graphs.graphs), off=graphs.off)
    res["capture_ms_mean"] = 1e3 * graphs.capture_s / max(1, len(graphs.graphs))
    for n in (1, 4):  # host time per propose, graphed and not, interleaved by step
        idx = torch.arange(n, dtype=torch.int32, device=dev)
        times = {"graphs": [], "compiled": []}
        for s in range(a.steps):
            width = 1000 + s
            src = LookupSource(table, total, idx, [f"r{j}" for j in range(n)], width)
            for mode in ("graphs", "compiled") if s % 2 else ("compiled", "graphs"):
                dl.graphs = graphs if mode == "graphs" else None
                torch.cuda.synchronize()
                t = time.perf_counter()
                dl.propose(src, None, a_buf[:n])
                times[mode].append(time.perf_counter() - t)
        dl.graphs = graphs
        res[f"bs{n}_host_us"] = {m: 1e6 * statistics.median(v[20:]) for m, v in times.items()}
    res["graphs_after_timing"] = len(graphs.graphs)
    print(json.dumps(res, indent=1))
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)
    assert same == trials and not graphs.off, "graphed lookup steps differ from the compiled search"


if __name__ == "__main__":
    main()
