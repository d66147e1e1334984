"""Is the DP's choice good? The chosen skip set's measured tokens-per-time vs 200 random feasible sets of the
same budget (same total integer latency weight, same frozen items), on the real model.

Measured, per set S, at the moment of the selector's first selection on a real request:
  alpha(S)   top-1 agreement of the draft with the full model on a held-out window of the context (the tokens
             just before the DP's reference window), each token attending to the real cached prefix;
  t_draft(S) median wall time of a real draft step (vLLM attention over the paged KV cache, lm_head, top-1);
  t_verify   median wall time of the full-model step, scaled to 1+gamma tokens by the latency model's ratio;
  TPT(S)     max over gamma of E[tokens](alpha, gamma) / (gamma t_draft + t_verify(gamma)).

    .venv/bin/python tools/bench_selector.py [--random 200] [--context 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_feasible(L, weights, target, frozen, n, rng, patience=1000):
    """Up to n distinct random sets of exactly `target` weight; fewer when `patience` draws in a row find no new
    one (a small target has few such sets: weight 0 has only the empty set).

    >>> random_feasible(3, [1] * 6, 0, set(), 5, random.Random(0))  # the selector chose the empty set
    [()]
    >>> len(random_feasible(3, [1] * 6, 2, {0}, 100, random.Random(0)))  # 2 of the 5 free items: C(5, 2)
    10
    """
    free = [i for i in range(2 * L) if i not in frozen]
    out, seen, misses = [], set(), 0
    while len(out) < n and misses < patience:
        misses += 1
        rng.shuffle(free)
        picked, w = [], 0
        for i in free:
            if w + weights[i] <= target:
                picked.append(i)
                w += weights[i]
            if w == target:
                break
        key = tuple(sorted(picked))
        if w == target and key not in seen:
            seen.add(key)
            out.append(key)
            misses = 0
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--random", type=int, default=200)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from scripts.get_model import main as get_model
    from vllm_knapspec.adapter.draft import DraftBatch
    from vllm_knapspec.adapter.profiler import _median_time, drafter_of
    from vllm_knapspec.adapter.selection import make_selector
    from vllm_knapspec.core import dp, tpt
    from vllm_knapspec.core.selector import KnapSpecSelector
    from vllm_knapspec.core.skipset import SkipSet

    model = str(get_model())
    tok = AutoTokenizer.from_pretrained(model)
    import json as _j

    src = inspect.getsource(_j.decoder) + inspect.getsource(_j.encoder) + inspect.getsource(inspect)
    prompt = tok.decode(tok(src)["input_ids"][: a.context])
    llm = LLM(
        model,
        dtype="float32",
        enforce_eager=True,
        distributed_executor_backend="uni",
        max_model_len=4096,
        speculative_config={
            "method": "knapspec",
            "num_speculative_tokens": 5,
            "min_speedup": 0.0,
            "max_selection_overhead": 1.0,
        },
    )
    d = drafter_of(llm)
    result = {}

    class Probe(KnapSpecSelector):
        def select(self, rows, ctx):
            super().select(rows, ctx)
            if not result:
                result.update(probe(self, rows, ctx))

    def probe(sel, rows, ctx):
        draft, L, h = sel.adapter.m, sel.L, sel.history[-1]
        chosen = SkipSet.parse(L, h["skip"])
        w = dp.item_weights(L, h["w_attn"], h["w_mlp"])
        target = sum(w[i] for i in chosen.items())
        frozen = set(dp.default_frozen_items(L))
        # held-out window: the eval tokens just before the DP's reference tokens
        ev = sel.adapter.build(rows[:1], ctx[:1] - sel.cfg.reference_tokens, a.eval_tokens)
        want = ev.logits_fn(ev.refs[-1]).argmax(-1)

        def alpha(skip):
            x = ev.refs[0][None]
            for i in range(2 * L):
                if i not in skip:
                    x = ev.run_item(i, x)
            return float((ev.logits_fn(x[0]).argmax(-1) == want).float().mean())

        B = len(rows)
        pos = ctx.astype(np.int64) - 2  # a committed position: timing only, nothing is written
        batch = DraftBatch(
            torch.from_numpy(rows).to(draft.device),
            rows,
            torch.zeros(B, dtype=torch.int64, device=draft.device),
            torch.from_numpy(pos).to(draft.device),
            pos,
        )

        def t_step(skip):
            def run():
                torch.softmax(draft.logits(draft.step(batch, skip, write_kv=False)).float(), -1).max(-1)[0].cpu()

            return _median_time(run, draft.device, a.iters, 2)

        t_full = t_step(SkipSet.empty(L))
        lat = sel.target
        ratio = [lat.verify_step_time(ctx, 1 + g) / lat.verify_step_time(ctx, 1) for g in range(1, 11)]

        def measured_tpt(items):
            s = SkipSet.from_items(L, items)
            al, td = alpha(set(items)), t_step(s)
            best = max((float(tpt.tpt(al, g, td, t_full * ratio[g - 1])), g) for g in range(1, 11))
            return dict(skip=str(s), alpha=al, t_draft_ms=td * 1e3, tpt=best[0], gamma=best[1])

        t0 = time.time()
        mine = measured_tpt(chosen.items())
        rng = random.Random(0)
        rand = [measured_tpt(items) for items in random_feasible(L, w, target, frozen, a.random, rng)]
        best_rand = max(rand, key=lambda r: r["tpt"])
        return dict(
            chosen=mine,
            weight=target,
            w_attn=h["w_attn"],
            w_mlp=h["w_mlp"],
            plain_tpt=B / t_full,
            best_random=best_rand,
            random_median_tpt=statistics.median(r["tpt"] for r in rand),
            ratio_to_best_random=mine["tpt"] / best_rand["tpt"],
            share_of_random_beaten=sum(r["tpt"] <= mine["tpt"] for r in rand) / len(rand),
            n_random=len(rand),
            probe_seconds=time.time() - t0,
        )

    d.selector = make_selector(d.cfg, d.draft, d.vllm_config)
    d.selector.__class__ = Probe
    d.selector.selection_s = 1e-9  # select at the first decode step
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    import vllm

    result["machine"] = dict(
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        torch=torch.__version__,
        vllm=vllm.__version__,
        model=model,
        context=a.context,
    )
    print(json.dumps(result, indent=2))
    print(
        f"\nchosen set TPT / best of {result['n_random']} random sets of the same budget: "
        f"{result['ratio_to_best_random']:.3f} (beats {result['share_of_random_beaten']:.0%} of them)"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
