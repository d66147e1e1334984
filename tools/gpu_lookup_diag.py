"""Where a lookup-drafting step's time goes on the V2 runner: one in-process KnapSpec engine (a real model, or
dummy weights of a shape, whose greedy output loops so lookup drafts match), greedy runs with the device lookup
on and off in turn (ms per token, lookup tokens drafted / accepted), then cProfile (host) and torch.profiler
(host + device) over a run with it on.

    bash tools/gpu_device.sh python3 tools/gpu_lookup_diag.py --ctx 1024 --bs 1 --out $OUT/diag.txt
    bash tools/gpu_device.sh python3 tools/gpu_lookup_diag.py --model M --out $OUT/diag.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a real model folder; default: dummy weights of --shape")
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--bs", type=int, default=1)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--out", default="diag.txt")
    a = ap.parse_args()
    import yaml
    from gpu_real import code_ids
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "knapspec.yaml")))
    kw = dict(max_model_len=8192, max_num_seqs=16, gpu_memory_utilization=0.3, seed=0)
    if a.model:
        tok = AutoTokenizer.from_pretrained(a.model)
        llm = LLM(a.model, speculative_config=cfg, **kw)
        ps = [TokensPrompt(prompt_token_ids=code_ids(tok, 3 * i, a.ctx)) for i in range(a.bs)]
    else:  # dummy weights: greedy output loops, so lookup drafts match
        from gpu_bench import write_config

        llm = LLM(
            write_config(a.shape, 8192), speculative_config=cfg, load_format="dummy", skip_tokenizer_init=True, **kw
        )
        ps = [
            TokensPrompt(prompt_token_ids=[(1000 + 7 * i + 13 * j) % 30000 + 10 for j in range(a.ctx)])
            for i in range(a.bs)
        ]
    sp = SamplingParams(max_tokens=a.new, temperature=0.0, ignore_eos=True)
    out = open(a.out, "w")
    d = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.drafter
    dl = d.device_lookup
    # lookup on / off in turn in one engine: what the device lookup path costs a step. The first step after
    # switching it off reports a lookup step to no lookup: one draft fallback (counted), not a request error.
    for rep in range(3):
        for on in (True, False):
            d.device_lookup = dl if on else None
            c0 = dict(d.stats.counters)
            t = time.perf_counter()
            llm.generate(ps, sp, use_tqdm=False)
            ms = (time.perf_counter() - t) * 1e3 / a.new
            c1 = d.stats.counters
            keys = ("lookup_draft_tokens", "lookup_accepted_tokens", "no_spec_steps", "draft_fallbacks")
            dc = {k: c1.get(k, 0) - c0.get(k, 0) for k in keys}
            print("rep %d lookup %s: %.2f ms/token %s" % (rep, on, ms, dc), file=out, flush=True)
    d.device_lookup = dl
    c0 = dict(d.stats.counters)
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    llm.generate(ps, sp, use_tqdm=False)
    pr.disable()
    print("profiled run %.2f ms/token" % ((time.perf_counter() - t) * 1e3 / a.new), file=out)
    c1 = d.stats.counters
    print("counters delta", {k: c1[k] - c0.get(k, 0) for k in c1 if c1[k] != c0.get(k, 0)}, file=out)
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(45)
        print(s.getvalue(), file=out)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(ps, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True), use_tqdm=False)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30), file=out)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40), file=out)
    out.close()
    print(open(a.out).read()[:6000])


if __name__ == "__main__":
    main()
