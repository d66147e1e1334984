"""KnapSpec on a real model on the GPU: lossless check, acceptance curves, and the speed table.

    bash tools/gpu_device.sh python3 tools/gpu_real.py --model /tmp/knapspec-model/Qwen2.5-Coder-1.5B-Instruct \
        --phases lossless,accept,bench --out $OUT/real.json

Engines, all up at once, vLLM's own process layout (what `vllm serve` runs):
  plain, plain2  vLLM's defaults without speculation (the second is the A/A control)
  knapspec       configs/knapspec.yaml as shipped; its plan can be pinned to a static skip set per call
  ks_nolg        the same, its device lookup's search not replayed from CUDA graphs (an engine of its own)
  ngram          vLLM's prompt-lookup speculator (num_speculative_tokens 5, lookup 1..4)
Prompts are real text every Python carries (vllm_knapspec/tools/workloads.py): `code` continues stdlib sources
(modules concatenated up to the length), `prose` asks for a summary of the language reference, `mixed` is
`knapspec-bench --workload mixed` (half the requests copy code from their prompt, half write free prose): a cell
of batch B serves 4 x B requests at concurrency B, the next request added as soon as one finishes.

lossless  greedy KnapSpec (shipped selector, full depth with and without lookup drafts and draft graphs, static
          25 %) == plain: batch 1 (4 prompts) and batch 16, with
          plain's top-2 logprob margin at any first divergence
accept    realised acceptance (vLLM's spec-decode counters; the first draft position is the teacher-forced top-1
          agreement) vs skipped share: attention-only, MLP-only, mixed (layer-skip drafts alone: lookup off),
          and the shipped selector's own plans
bench     ms per output token, methods rotated per repetition, per (kind, context, batch); speedup = plain / x
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_bench import _graphs_compiled, _runner_info, probe_set  # noqa: E402

from vllm_knapspec.tools import workloads as wl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- worker-side (collective_rpc) ----------------------------------------------------------------------------
def _pin(worker, skip, gamma, lookup=True, graphs=True):
    """skip None: the shipped selector; else a fixed plan (gamma 0 = no drafts). lookup False: no lookup drafts
    (a pinned plan's acceptance is then its layer-skip draft's alone); graphs False: draft steps run eagerly
    (the draft graphs' numerics against the modules')."""
    from vllm_knapspec.core.selector import FixedSelector
    from vllm_knapspec.core.skipset import SkipSet

    d = worker.model_runner.drafter
    if not hasattr(d, "shipped"):
        d.shipped = d.selector
        d.shipped_parts = (d.device_lookup, d.graphs)
    d.selector = d.shipped if skip is None else FixedSelector(SkipSet.parse(d.draft.num_layers, skip), gamma)
    d.next_gamma = d.k_max if skip is None else gamma
    d.device_lookup = d.shipped_parts[0] if lookup else None
    d.graphs = d.shipped_parts[1] if graphs else None
    return True


def _lookup_graphs_off(worker):
    """The engine's device lookup runs the compiled search without its CUDA graphs (method ks_nolg)."""
    dl = worker.model_runner.drafter.device_lookup
    if dl is not None:
        dl.graphs = None
    return dl is not None


def _trace_on(worker):
    """Trace each full step, and the host time of each full propose() (`host_trace`: (full steps traced before
    it, seconds)); propose() is wrapped once per engine, here, not in the product."""
    d = worker.model_runner.drafter
    d.trace, d.quiet_trace, d.host_trace = [], [], []
    if not hasattr(d, "untimed_propose_step"):
        d.untimed_propose_step = d.propose_step

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return d.untimed_propose_step(*args, **kw)
            finally:
                if d.host_trace is not None:
                    d.host_trace.append((len(d.trace or ()), time.perf_counter() - t0))

        d.propose_step = timed
    return True


def _trace_take(worker):
    d = worker.model_runner.drafter
    t, q, h = d.trace or [], d.quiet_trace or [], d.host_trace or []
    d.trace = d.quiet_trace = d.host_trace = None
    return t, q, h


def _gc_on(worker):
    """Time the engine process's garbage collections (gc.callbacks) until _gc_take: a collection of the oldest
    generation stops the engine loop for as long as it runs, in any engine."""
    import gc

    log, start = [], [0.0]

    def cb(phase, info):
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            log.append((info["generation"], time.perf_counter() - start[0]))

    worker.gc_trace = (cb, log)
    gc.callbacks.append(cb)
    return True


def _gc_take(worker):
    """(collections per generation, their seconds per generation) since _gc_on."""
    import gc

    cb, log = worker.gc_trace
    gc.callbacks.remove(cb)
    count, seconds = [0, 0, 0], [0.0, 0.0, 0.0]
    for gen, dt in log:
        count[gen] += 1
        seconds[gen] += dt
    return count, seconds


def _graphs_on(worker):
    """Count the graph the V2 runner dispatches each step to, by requests x tokens per request ('mixed' for a
    batch that is not uniform), until _graphs_take. False on the V1 runner (vLLM's ngram)."""
    mgr = getattr(worker.model_runner, "cudagraph_manager", None)
    if mgr is None or not hasattr(mgr, "dispatch"):
        return False
    if not hasattr(mgr, "_ks_counts"):
        orig = mgr.dispatch

        def dispatch(num_reqs, num_tokens, uniform_token_count, *a, **kw):
            desc = orig(num_reqs, num_tokens, uniform_token_count, *a, **kw)
            key = f"{desc.cg_mode.name} {num_reqs}x{uniform_token_count or 'mixed'}"
            mgr._ks_counts[key] = mgr._ks_counts.get(key, 0) + 1
            return desc

        mgr.dispatch = dispatch
    mgr._ks_counts = {}
    return True


def _graphs_take(worker):
    mgr = getattr(worker.model_runner, "cudagraph_manager", None)
    counts = dict(getattr(mgr, "_ks_counts", None) or {})
    if counts:
        mgr._ks_counts = {}
    return counts


def _kv_tokens(worker) -> int:
    """Tokens the engine's KV cache holds (blocks x block size), as the engine core sized it."""
    cc = worker.vllm_config.cache_config
    return int(cc.num_gpu_blocks or 0) * int(cc.block_size)


def kv_short(kv_tokens: dict, ctx: int, bs: int, new: int) -> list[str]:
    """The engines whose KV cache cannot hold the whole batch at its longest: they decode part of it, then the
    rest (or preempt), and their time is not one batch's. At a fifth of an H100 each, plain vLLM held 15 of 16
    requests of 30K tokens and decoded at 26 ms per token (5.4 ms at 16K x 16, which its cache held).

    >>> kv_short({"plain": 400_000, "ngram": 600_000}, 30720, 16, 256)
    ['plain']
    """
    need = bs * (ctx + new)
    return [m for m, t in kv_tokens.items() if t and t < need]


def step_times(trace, quiet=()) -> dict:
    """Median, mean and 90th-percentile step gap, draft step (per drafted token) and verify (a drafting step's gap
    less its draft loop) in ms; the plain steps' gap apart (a run whose selector drafted a few times has mostly
    plain steps), and the lookup-only steps' (drafts verified, no layer-skip loop) with their tokens per row.
    Traced steps are full steps; while plain decoding is planned, quiet steps are traced per stride window
    (`quiet`: steps, seconds, batch) and reported as their mean, which is what prices plain decoding."""
    tr = trace[2:]  # the first reports may belong to the previous run (one step late)
    gaps = [t[0] for t in tr if t[0]]
    drafting = [(g, ds, s) for g, ds, s, *_ in tr if g and s]
    plain = [g for g, _, s, *rest in tr if g and not s and not (rest and rest[0])]
    lookup = [(g, v, a, n) for g, _, s, v, a, n in (t for t in tr if len(t) == 6) if g and not s and v]
    if not gaps:
        return {}
    med = statistics.median
    ordered = sorted(gaps)
    return dict(
        step_ms=med(gaps) * 1e3,
        mean_step_ms=sum(gaps) / len(gaps) * 1e3,  # long steps show here, not in the median
        p90_step_ms=ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
        steps=len(gaps),
        plain_step_ms=med(plain) * 1e3 if plain else None,
        draft_step_ms=med([ds / s for _, ds, s in drafting]) * 1e3 if drafting else None,
        verify_ms=med([g - ds for g, ds, _ in drafting]) * 1e3 if drafting else None,
        drafting_steps=len(drafting),
        lookup_steps=len(lookup),
        lookup_step_ms=med([g for g, *_ in lookup]) * 1e3 if lookup else None,
        lookup_mean_step_ms=sum(g for g, *_ in lookup) / len(lookup) * 1e3 if lookup else None,
        lookup_verified_per_row=sum(v / n for _, v, _, n in lookup) / len(lookup) if lookup else None,
        lookup_tokens_per_row=sum(1 + a / n for _, _, a, n in lookup) / len(lookup) if lookup else None,
        quiet_steps=sum(q for q, _, b, *_ in quiet if b),
        quiet_step_ms=sum(s for _, s, b, *_ in quiet if b) / max(1, sum(q for q, _, b, *_ in quiet if b)) * 1e3,
    )


def _selections(worker):
    d = worker.model_runner.drafter
    sel = getattr(d, "shipped", d.selector)
    hist = getattr(sel, "history", None) or []
    cur = getattr(sel, "current", None)
    keys = (
        "ctx",
        "batch",
        "skip",
        "gamma",
        "speculate",
        "alpha",
        "speedup",
        "cost_s",
        "t_plain_s",
        "plain_scale",
        "ref_self",
        "phases_s",  # the selection's wall time by phase: reference, dp, alpha, choose
        "full_step_extra_s",  # what the choice added to a plan's verification: a full step's measured extra
    )
    counters = d.stats.counters
    return dict(
        current=None if cur is None else [str(cur[0]), int(cur[1])],
        n_history=len(hist),
        lookup_tokens_total={k: counters.get(f"lookup_{k}_tokens", 0.0) for k in ("draft", "accepted")},  # engine life
        draft_fallbacks=counters.get("draft_fallbacks", 0.0),  # engine life: steps whose drafting failed
        lookup_guard_stops=counters.get("lookup_guard_stops", 0.0),  # engine life
        selections_passed=counters.get("selections_passed", 0.0),  # engine life: hopeless selections not run
        full_step_extra_s=sel.full_step_extra_s() if hasattr(sel, "full_step_extra_s") else None,  # now
        guard_events=list(getattr(sel, "guard_events", []))[-4:],  # plans the guard stopped: measured speedup
        last=[{k: (float(h[k]) if isinstance(h.get(k), float) else h.get(k)) for k in keys} for h in hist[-4:]],
    )


# -- prompts -------------------------------------------------------------------------------------------------
def code_ids(tok, j: int, length: int) -> list[int]:
    ids, m = [], j
    while len(ids) < length:
        ids += wl._ids(tok, wl.code_text(wl.CODE_MODULES[m % len(wl.CODE_MODULES)]))
        m += 1
    return ids[:length]


def prompts(tok, kind: str, length: int, count: int) -> list[list[int]]:
    if kind == "mixed":  # knapspec-bench --workload mixed: copy, free prose, copy, ...
        return [list(p.token_ids) for p in wl.build_mixed_prompts(tok, length, count)]
    if kind == "code":
        return [code_ids(tok, 3 * i, length) for i in range(count)]
    return [list(wl.prose_prompt(tok, wl.prose_start(i), length).token_ids) for i in range(count)]


def spec_counts(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name in (
            "vllm:spec_decode_num_drafts",
            "vllm:spec_decode_num_draft_tokens",
            "vllm:spec_decode_num_accepted_tokens",
        ):
            out[m.name.split("_num_")[1]] = m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out["per_pos"] = list(m.values)
    return out


def acceptance(before: dict, after: dict) -> dict:
    dt = after.get("draft_tokens", 0) - before.get("draft_tokens", 0)
    acc = after.get("accepted_tokens", 0) - before.get("accepted_tokens", 0)
    nd = after.get("drafts", 0) - before.get("drafts", 0)
    pp = [a - b for a, b in zip(after.get("per_pos", []), before.get("per_pos", []) or [0] * 99)]
    return dict(
        drafts=nd,
        draft_tokens=dt,
        accepted=acc,
        rate=acc / dt if dt else None,
        per_pos=[p / nd for p in pp] if nd else None,
    )


# -- phases --------------------------------------------------------------------------------------------------
def lossless(E, tok, L, a, SP, TP):
    res = []
    fixed = static_sets(L)
    sets = [
        ("shipped", None, 0),
        ("full", "", 4),
        ("full-nolookup", "", 4, False),  # the target's own modules: acceptance 1 up to bf16 ties
        ("full-nolookup-eager", "", 4, False, False),
        ("static25", fixed["static25"], 4),
    ]
    for bs, ps in (
        (1, prompts(tok, "code", 1024, 2) + prompts(tok, "prose", 1024, 2)),
        (16, prompts(tok, "code", 1024, 8) + prompts(tok, "prose", 1024, 8)),
    ):
        groups = [[p] for p in ps] if bs == 1 else [ps]
        sp = SP(max_tokens=128, temperature=0.0, ignore_eos=True, logprobs=2)
        ref = [o for g in groups for o in E["plain"].generate([TP(prompt_token_ids=p) for p in g], sp, use_tqdm=False)]
        for name, *pin in sets:
            E["knapspec"].collective_rpc(_pin, args=tuple(pin))
            b = spec_counts(E["knapspec"])
            got = [
                o
                for g in groups
                for o in E["knapspec"].generate([TP(prompt_token_ids=p) for p in g], sp, use_tqdm=False)
            ]
            row = dict(
                batch=bs,
                set=name,
                equal=0,
                n=len(ps),
                acceptance=acceptance(b, spec_counts(E["knapspec"])),
                divergences=[],
            )
            for r, g in zip(ref, got):
                x, y = list(r.outputs[0].token_ids), list(g.outputs[0].token_ids)
                if x == y:
                    row["equal"] += 1
                    continue
                k = next(i for i in range(min(len(x), len(y))) if x[i] != y[i])
                lp = sorted(r.outputs[0].logprobs[k].values(), key=lambda v: -v.logprob)
                row["divergences"].append(
                    dict(
                        token=k,
                        plain=x[k],
                        got=y[k],
                        plain_top2_margin=lp[0].logprob - lp[1].logprob if len(lp) > 1 else None,
                    )
                )
            res.append(row)
            print("lossless", json.dumps(row), flush=True)
    E["knapspec"].collective_rpc(_pin, args=(None, 0))
    return res


def accept(E, tok, L, a, SP, TP):
    mlp_order = middle_out(L)
    sets = [(f"attn{k}", ",".join(f"a{i}" for i in range(L - k, L)), 4) for k in (4, 7, 14, 21, 26)]
    sets += [(f"mlp{k}", ",".join(f"m{i}" for i in mlp_order[:k]), 4) for k in (2, 4, 7)]
    sets += [("probe25", probe_set(L, 0.25), 4), ("probe50", probe_set(L, 0.5), 4), ("shipped", None, 0)]
    res = []
    ks = E["knapspec"]
    for ctx in [int(c) for c in a.accept_ctx.split(",")]:
        ps = [TP(prompt_token_ids=p) for p in prompts(tok, "code", ctx, 2) + prompts(tok, "prose", ctx, 2)]
        ks.generate(ps, SP(max_tokens=1), use_tqdm=False)
        for name, skip, gamma in sets:
            ks.collective_rpc(_pin, args=(skip, gamma, skip is None))  # fixed sets: layer-skip drafts alone
            b = spec_counts(ks)
            ks.generate(ps, SP(max_tokens=a.accept_new, temperature=0.0, ignore_eos=True), use_tqdm=False)
            row = dict(
                ctx=ctx,
                set=name,
                skip=skip,
                share=None if skip is None else len(skip.split(",")) / (2 * L),
                **acceptance(b, spec_counts(ks)),
            )
            if skip is None:
                row["selector"] = ks.collective_rpc(_selections)[0]
            res.append(row)
            print("accept", json.dumps(row), flush=True)
    ks.collective_rpc(_pin, args=(None, 0))
    return res


def middle_out(L: int) -> list[int]:
    """Layers from the middle outwards (L // 2, L // 2 + 1, L // 2 - 1, ...): the order MLPs are skipped in."""
    mid = L // 2
    return [mid + (k + 1) // 2 * (1 if k % 2 else -1) for k in range(L)]


def static_sets(L: int) -> dict:
    """Fixed plans the benchmark pins KnapSpec's engine to (gamma 4): `full` drafts with every sublayer (the
    target's own modules replayed from the draft's CUDA graphs: acceptance 1 up to bf16 ties), `mlp4` skips four
    MLPs from the middle, `static25` / `static50` the probe's sets (gpu_bench.probe_set)."""
    mlp_order = middle_out(L)
    return dict(
        full="",
        mlp2=",".join(f"m{i}" for i in mlp_order[:2]),
        mlp4=",".join(f"m{i}" for i in mlp_order[:4]),
        static25=probe_set(L, 0.25),
        static50=probe_set(L, 0.5),
    )


# KnapSpec's engine pinned to plain decoding: `off`, no layer-skip plan and no lookup drafts (every step a plain
# single-token step of this engine); (skip, gamma, lookup) for _pin. A fixed plan without drafts also stops lookup
# drafts (lookup_drafts.choose_with_models), so a pin cannot ask for lookup drafts alone.
PLAIN_PINS = {"off": ("", 0, False)}


_STREAM_IDS = itertools.count()


def stream(llm, ps, sp, conc: int) -> None:
    """Serve `ps` with at most `conc` requests in flight, the next one added as soon as one finishes: a client at
    concurrency `conc` (knapspec-bench's rounds with `--round-waves` over 1), not a wave that waits for its
    slowest request."""
    eng, todo, live = llm.llm_engine, list(ps), 0
    while todo or live:
        while todo and live < conc:
            eng.add_request(f"stream-{next(_STREAM_IDS)}", todo.pop(0), sp)
            live += 1
        live -= sum(out.finished for out in eng.step())


def bench(E, tok, L, a, SP, TP, sync, partial=lambda res: None, kv_tokens=None):
    fixed = {**{m: (s, 4) for m, s in static_sets(L).items()}, **PLAIN_PINS}  # method -> _pin's arguments
    methods = [(m, fixed.get(m)) for m in a.methods.split(",")]
    res = []
    for cell in a.cells.split(","):
        kind, ctx, bs, temp = cell.split(":")
        ctx, bs, temp = int(ctx), int(bs), float(temp)
        # mixed: 4 x bs requests (half copy, half free prose) served at concurrency bs, a client's stream
        ps = [TP(prompt_token_ids=p) for p in prompts(tok, kind, ctx, bs if kind != "mixed" else 4 * bs)]
        rounds = len(ps) // bs  # output tokens per request slot: rounds x a.new
        for e in E.values():
            e.generate(ps, SP(max_tokens=1), use_tqdm=False)
        sp = SP(max_tokens=a.new, temperature=temp, ignore_eos=True, seed=0 if temp else None)
        times = {m: [] for m, _ in methods}
        sel = None
        acc, steps, by_rep, graphs, gcs, compiled = {}, {}, {}, {}, {}, {}
        for rep in range(a.reps + 1):
            if rep == 1:  # torch.compile graphs of each engine before the timed repetitions
                compiled = {n: e.collective_rpc(_graphs_compiled)[0] for n, e in E.items()}
            for m, pin in methods[rep % len(methods) :] + methods[: rep % len(methods)]:
                e = E["knapspec" if m in fixed else m]
                if e is E["knapspec"]:
                    e.collective_rpc(_pin, args=pin if pin is not None else (None, 0))
                    e.collective_rpc(_trace_on)
                b = spec_counts(e)
                if a.raw_trace:
                    e.collective_rpc(_graphs_on)
                    e.collective_rpc(_gc_on)
                sync()
                t = time.perf_counter()
                if kind == "mixed":
                    stream(e, ps, sp, bs)
                else:
                    e.generate(ps, sp, use_tqdm=False)
                if rep:
                    times[m].append((time.perf_counter() - t) / (a.new * rounds) * 1e3)
                    acc[m] = acceptance(b, spec_counts(e))["rate"] if m not in ("plain", "plain2") else None
                if a.raw_trace:  # the graph of each step of this run, summed over the timed repetitions
                    counts = e.collective_rpc(_graphs_take)[0]
                    got = graphs.setdefault(m, {})
                    for key, c in counts.items() if rep else ():
                        got[key] = got.get(key, 0) + c
                    n_gc, s_gc = e.collective_rpc(_gc_take)[0]
                    if rep:  # per timed repetition: collections and ms per generation
                        gcs.setdefault(m, []).append(dict(count=n_gc, ms=[round(x * 1e3, 3) for x in s_gc]))
                if e is E["knapspec"]:
                    tr, quiet, host = e.collective_rpc(_trace_take)[0]
                    if rep:
                        steps[m] = step_times(tr, quiet)
                        # each timed repetition apart: which one held a selection, a guard stop, slow steps
                        s_now = e.collective_rpc(_selections)[0]
                        keep = ("n_history", "lookup_guard_stops", "draft_fallbacks")
                        by_rep.setdefault(m, []).append(
                            dict(ms=times[m][-1], steps=steps[m], **{k: s_now[k] for k in keep})
                        )
                        if a.raw_trace:  # step by step: (gap ms, draft steps, verified, kept, rows); quiet windows
                            by_rep[m][-1]["trace"] = [
                                (round((t[0] or 0) * 1e3, 3), t[2], *(t[3:] if len(t) == 6 else (0, 0, 0))) for t in tr
                            ]
                            by_rep[m][-1]["quiet"] = [(q, round(s * 1e3, 3), b, *at) for q, s, b, *at in quiet]
                            # propose() host ms of each full step: (full steps traced before it, ms)
                            by_rep[m][-1]["host"] = [(i, round(x * 1e3, 3)) for i, x in host]
                    if m == "knapspec" and rep == a.reps:
                        sel = e.collective_rpc(_selections)[0]
        ms = {m: statistics.median(t) for m, t in times.items()}
        row = dict(
            kind=kind,
            ctx=ctx,
            bs=bs,
            temperature=temp,
            ms_per_token=ms,
            all_ms=times,
            acceptance=acc,
            speedup={m: ms["plain"] / v for m, v in ms.items()},
            steps=steps,
            by_rep=by_rep,
            graphs=graphs,  # --raw-trace: steps per "MODE requests x tokens each" per method
            gc=gcs,  # --raw-trace: the engine process's garbage collections per timed repetition, per method
            selector=sel,
            kv_short=kv_short(kv_tokens or {}, ctx, bs, a.new),  # engines that could not hold the whole batch
            # graphs compiled during the timed repetitions, per engine: 0 unless something compiled while serving
            compiled_while_timed={n: E[n].collective_rpc(_graphs_compiled)[0] - c for n, c in compiled.items()},
        )
        if row["kv_short"]:
            print(f"warning: {cell}: the KV cache of {row['kv_short']} holds less than the batch", flush=True)
        res.append(row)
        partial(res)  # a run cut short keeps its finished cells
        print(
            "bench",
            json.dumps(
                {
                    k: row[k]
                    for k in (
                        "kind",
                        "ctx",
                        "bs",
                        "temperature",
                        "speedup",
                        "acceptance",
                        "compiled_while_timed",
                        "steps",
                        "selector",
                    )
                }
            ),
            flush=True,
        )
    E["knapspec"].collective_rpc(_pin, args=(None, 0))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--phases", default="lossless,accept,bench")
    ap.add_argument("--accept-ctx", default="1024,8192,16384")
    ap.add_argument("--accept-new", type=int, default=64)
    ap.add_argument("--cells", default="prose:1024:1:0,prose:16384:16:0")
    ap.add_argument(
        "--methods", default="plain,plain2,knapspec,full,mlp4,ngram", help="bench: engines and pinned plans"
    )
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--mem", type=float, default=0.21)
    ap.add_argument("--max-len", type=int, default=32768)
    ap.add_argument("--raw-trace", action="store_true", help="bench: keep each timed repetition's steps one by one")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    import vllm
    import yaml
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(a.model)
    ks_cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "knapspec.yaml")))
    phases = a.phases.split(",")
    kw = dict(max_model_len=a.max_len, max_num_seqs=16, gpu_memory_utilization=a.mem, seed=0, disable_log_stats=False)
    t0 = time.time()
    E = {"plain": LLM(a.model, **kw)}
    if "bench" in phases and "plain2" in a.methods.split(","):  # the A/A control, where asked for
        E["plain2"] = LLM(a.model, **kw)
    if "bench" in phases and "ngram" in a.methods.split(","):
        E["ngram"] = LLM(
            a.model,
            speculative_config=dict(method="ngram", num_speculative_tokens=5, prompt_lookup_min=1, prompt_lookup_max=4),
            **kw,
        )
    E["knapspec"] = LLM(a.model, speculative_config=ks_cfg, **kw)
    if "bench" in phases and "ks_nolg" in a.methods.split(","):  # KnapSpec, its lookup search not graphed
        E["ks_nolg"] = LLM(a.model, speculative_config=ks_cfg, **kw)
        E["ks_nolg"].collective_rpc(_lookup_graphs_off)
    info = {
        n: dict(
            v2=getattr(e.llm_engine.vllm_config, "use_v2_model_runner", None),
            async_scheduling=e.llm_engine.vllm_config.scheduler_config.async_scheduling,
        )
        for n, e in E.items()
    }
    info["knapspec"].update(E["knapspec"].collective_rpc(_runner_info)[0])  # graphs on? warm-up checks
    for n, e in E.items():
        info[n]["kv_tokens"] = e.collective_rpc(_kv_tokens)[0]
    print("engines up in %.0f s" % (time.time() - t0), json.dumps(info), flush=True)
    L = E["plain"].llm_engine.vllm_config.model_config.hf_config.num_hidden_layers
    out = dict(
        model=a.model,
        engines=info,
        knapspec_config=ks_cfg,
        args=vars(a),
        machine=dict(
            gpu=torch.cuda.get_device_name(0) if cuda else platform.processor(),
            python=platform.python_version(),
            torch=torch.__version__,
            vllm=vllm.__version__,
        ),
    )

    def save():
        if a.out:
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)

    for ph in phases:
        t = time.time()
        out[ph] = (
            lossless(E, tok, L, a, SamplingParams, TokensPrompt)
            if ph == "lossless"
            else accept(E, tok, L, a, SamplingParams, TokensPrompt)
            if ph == "accept"
            else bench(
                E,
                tok,
                L,
                a,
                SamplingParams,
                TokensPrompt,
                torch.cuda.synchronize if cuda else (lambda: None),
                partial=lambda res: (out.__setitem__("bench", res), save()),
                kv_tokens={n: i["kv_tokens"] for n, i in info.items()},
            )
        )
        print(f"{ph} done in {time.time() - t:.0f} s", flush=True)
        save()


if __name__ == "__main__":
    sys.exit(main())
