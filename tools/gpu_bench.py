"""GPU step-cost benchmark: vLLM's defaults without speculation vs KnapSpec, side by side, interleaved.

    python3 tools/gpu_bench.py --shape qwen2.5-1.5b --cells 1024x1,1024x16,16384x16 --out result.json

Engines (dummy weights of the shape, no tokenizer), all up at once:
  plain    vLLM's defaults (what `vllm serve MODEL` runs: the runner and scheduling vLLM picks)
  plain2   a second identical engine: the A/A control (how far two identical engines differ here)
  knapspec KnapSpec as shipped (method knapspec), its plan set per variant in the worker:
           off (the selector chose plain decoding), skip '' (full-depth draft), 25 % and 50 % of sublayers
           (+ ks_noop: propose() returns at once; ks_quiet: every step quiet, no full steps)
Each cell (context x batch): per repetition every variant in rotating order; the prompt is cached first
(prefix caching), so a timed call is decode only. Reported: ms per output token (median), ratios to plain,
and KnapSpec's per-step device times (draft loop per draft step from CUDA events; verify step = step gap
minus draft loop; plain step = plain ms/token at batch 1 token per step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with this file's functions

SHAPES = {
    "qwen2.5-1.5b": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=5e5,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
        rope_theta=1e4,
        tie_word_embeddings=False,
    ),  # checks this script on a CPU
}


def probe_set(L: int, share: float) -> str:
    """The probe's skip sets: attention of layers 2..L-1 first, then MLPs from the middle, until `share` of
    the 2L sublayers are skipped (0.5: attention 2..L-1 plus two MLPs)."""
    want = int(round(share * 2 * L))
    items = [f"a{i}" for i in range(2, L)]
    mid = L // 2
    mlps = [f"m{mid + (k + 1) // 2 * (1 if k % 2 else -1)}" for k in range(L)]
    return ",".join((items + mlps)[:want])


def write_config(shape: str, max_len: int) -> str:
    d = f"/tmp/ks_shape_{shape}"
    os.makedirs(d, exist_ok=True)
    cfg = dict(
        SHAPES[shape],
        max_position_embeddings=max_len,
        rms_norm_eps=1e-6,
        torch_dtype="bfloat16",
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    )
    with open(f"{d}/config.json", "w") as f:
        json.dump(cfg, f)
    return d


# -- worker-side hooks (run in the engine's worker through collective_rpc) ---------------------------------
def _set_plan(worker, skip, gamma):
    from vllm_knapspec.core.selector import FixedSelector
    from vllm_knapspec.core.skipset import SkipSet

    d = worker.model_runner.drafter
    d.selector = FixedSelector(SkipSet.parse(d.draft.num_layers, skip), gamma) if gamma else _Off()
    d.next_gamma = gamma
    d.trace = []
    return True


def _set_noop(worker, on):
    """ks_noop: the speculator's propose() returns its zero drafts at once (what drafting-off costs without
    KnapSpec's host work: the engine's own cost of having a speculator)."""
    r = worker.model_runner
    if on:
        r.drafter.next_gamma = 0
    r.speculator._ks_noop = on
    return True


def _set_quiet(worker, on):
    """ks_quiet: every step is a quiet one (no full steps, so no selector, lookup search or choice): what remains
    against plain is vLLM's own cost of an engine with a speculator, plus the per-step quiet check."""
    d = worker.model_runner.drafter
    if on:
        d.quiet_step = lambda n, k: d._drafts[:n, :k]  # the instance attribute shadows the method
    else:
        d.__dict__.pop("quiet_step", None)
    return True


def _time_propose(worker):
    """Host time of each propose() call (V2 speculator), collected by _take_propose_times; ks_noop's
    shortcut lives here too."""
    import time as _t

    spec = getattr(worker.model_runner, "speculator", None)
    if spec is None or getattr(spec, "_ks_times", None) is not None:
        return False
    orig = type(spec).propose
    spec._ks_times, spec._ks_noop = [], False

    def timed(input_batch, *a, **k):
        t = _t.perf_counter()
        if spec._ks_noop:
            out = spec.draft_tokens[: input_batch.num_reqs]
        else:
            out = orig(spec, input_batch, *a, **k)
        spec._ks_times.append(_t.perf_counter() - t)
        return out

    spec.propose = timed
    return True


def _graphs_compiled(worker):
    """torch.compile graphs compiled in this engine's worker so far (torch._dynamo's count): a change across timed
    repetitions is a compile while serving (a lookup step that compiled again stalled a run for 10 s on an
    H100; docs/gpu.md)."""
    import torch._dynamo.utils as dynamo_utils

    return int(dynamo_utils.counters["stats"]["unique_graphs"])


def _take_propose_times(worker):
    spec = worker.model_runner.speculator
    t, spec._ks_times = list(getattr(spec, "_ks_times", None) or []), []
    return t


class _Off:
    def plan(self, rows, ctx):
        return None

    def observe_verify(self, *a, **k):
        pass

    def observe_draft(self, *a, **k):
        pass


def _take_trace(worker):
    d = worker.model_runner.drafter
    t, d.trace = d.trace or [], []
    return t


def _lookup_path(drafter) -> str | None:
    """Where the drafter matches lookup drafts: on the host (sync scheduling), the device (V2, async), or off."""
    if getattr(drafter, "device_lookup", None) is not None:
        return "device"
    return "host" if getattr(drafter, "lookup", None) is not None else None


def _runner_info(worker):
    r = worker.model_runner
    return dict(
        runner=type(r).__module__ + "." + type(r).__name__,
        speculator=type(getattr(r, "speculator", None)).__name__,
        graphs=getattr(getattr(r, "drafter", None), "graphs", None) is not None,
        warmups=getattr(getattr(r, "drafter", None), "warmups", None),
        lookup=_lookup_path(getattr(r, "drafter", None)),
        full_graph_query_lens=sorted(
            {
                d.uniform_token_count
                for d in getattr(getattr(r, "cudagraph_manager", None), "graphs", {})
                if getattr(d, "uniform_token_count", None)
            }
        ),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=list(SHAPES))
    ap.add_argument("--cells", default="1024x1,1024x16,16384x16")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--mem", type=float, default=0.2)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--variants", default="plain,plain2,ks_off,ks_full,ks_25,ks_50", help="subset to run (+ks_noop, ks_quiet)"
    )
    a = ap.parse_args()
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    cells = [tuple(int(x) for x in c.split("x")) for c in a.cells.split(",")]
    max_len = max(c for c, _ in cells) + a.new + 64
    max_bs = max(b for _, b in cells)
    path = write_config(a.shape, max_len)
    L = SHAPES[a.shape]["num_hidden_layers"]
    kw = dict(
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=max_len,
        max_num_seqs=max(16, max_bs),
        gpu_memory_utilization=a.mem,
        seed=0,
    )
    t0 = time.time()
    engines = {  # KnapSpec first: a start-up failure costs no other engine's start-up
        "knapspec": LLM(
            path, speculative_config={"method": "knapspec", "num_speculative_tokens": a.gamma, "skip_set": ""}, **kw
        ),
    }
    print("knapspec engine up in %.0f s" % (time.time() - t0), flush=True)
    engines["plain"] = LLM(path, **kw)
    if "plain2" in a.variants.split(","):  # left out where three engines' KV caches do not fit (8B at 16K x 16)
        engines["plain2"] = LLM(path, **kw)
    info = {
        n: dict(
            v2=bool(e.llm_engine.vllm_config.use_v2_model_runner)
            if hasattr(e.llm_engine.vllm_config, "use_v2_model_runner")
            else None,
            async_scheduling=e.llm_engine.vllm_config.scheduler_config.async_scheduling,
        )
        for n, e in engines.items()
    }
    info["knapspec"].update(engines["knapspec"].collective_rpc(_runner_info)[0])
    info["plain"]["runner_v2_flag"] = info["plain"]["v2"]
    print("engines up in %.0f s" % (time.time() - t0), json.dumps(info), flush=True)
    variants = [
        ("plain", None),
        ("plain2", None),
        ("ks_off", ("", 0)),
        ("ks_full", ("", a.gamma)),
        ("ks_25", (probe_set(L, 0.25), a.gamma)),
        ("ks_50", (probe_set(L, 0.5), a.gamma)),
        ("ks_noop", ("", 0)),
        ("ks_quiet", ("", 0)),
    ]
    variants = [v for v in variants if v[0] in a.variants.split(",")]
    info["knapspec"]["propose_timed"] = engines["knapspec"].collective_rpc(_time_propose)[0]
    ks = engines["knapspec"]
    results = []
    for ctx, bs in cells:
        prompts = [
            TokensPrompt(prompt_token_ids=[(1000 + 7 * i + 13 * j) % 30000 + 10 for j in range(ctx)]) for i in range(bs)
        ]
        warm = SamplingParams(max_tokens=1, temperature=0.0)
        sp = SamplingParams(max_tokens=a.new, temperature=0.0, ignore_eos=True)
        times = {v: [] for v, _ in variants}
        outs, traces = {}, {v: [] for v, _ in variants}
        propose_us: dict[str, list] = {}
        for e in engines.values():
            e.generate(prompts, warm, use_tqdm=False)
        compiled = {}
        for rep in range(a.reps + 1):  # rep 0: warm-up (first calls, graphs of the size)
            if rep == 1:
                compiled = {n: e.collective_rpc(_graphs_compiled)[0] for n, e in engines.items()}
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for v, plan in order:
                e = ks if plan is not None else engines[v]
                if plan is not None:
                    ks.collective_rpc(_set_plan, args=plan)
                    ks.collective_rpc(_set_noop, args=(v == "ks_noop",))
                    ks.collective_rpc(_set_quiet, args=(v == "ks_quiet",))
                    ks.collective_rpc(_take_propose_times)
                sync()
                t = time.perf_counter()
                o = e.generate(prompts, sp, use_tqdm=False)
                dt = time.perf_counter() - t
                if plan is not None:
                    pt = ks.collective_rpc(_take_propose_times)[0]
                    if rep and pt:
                        propose_us.setdefault(v, []).append(statistics.median(pt) * 1e6)
                    tr = ks.collective_rpc(_take_trace)[0]
                    if rep:
                        traces[v].extend(tr[2:])  # the first reports may be the previous variant's (lag)
                if rep:
                    times[v].append(dt / a.new * 1e3)
                outs[v] = [list(x.outputs[0].token_ids) for x in o]
        row = dict(
            ctx=ctx,
            bs=bs,
            ms_per_token={v: statistics.median(t) for v, t in times.items()},
            all_ms=times,
            equal_to_plain={v: sum(x == y for x, y in zip(outs[v], outs["plain"])) for v in outs},
        )
        plain = row["ms_per_token"]["plain"]
        row["ratio_plain_over"] = {v: plain / m for v, m in row["ms_per_token"].items()}
        steps = {}
        for v, tr in traces.items():
            if not tr:
                continue
            tr = [t[:3] for t in tr]  # (gap, draft loop s, draft steps)
            gaps = [g for g, _, _ in tr if g]
            drafts = [ds / s for _, ds, s in tr if s]
            loop = [ds for _, ds, s in tr if s]
            steps[v] = dict(
                step_ms=statistics.median(gaps) * 1e3 if gaps else None,
                draft_step_ms=statistics.median(drafts) * 1e3 if drafts else None,
                verify_ms=(statistics.median(gaps) - (statistics.median(loop) if loop else 0)) * 1e3 if gaps else None,
            )
            for k in ("draft_step_ms", "verify_ms", "step_ms"):
                if steps[v][k] is not None:
                    steps[v][k.replace("_ms", "_over_plain")] = steps[v][k] / plain
        row["steps"] = steps
        row["propose_host_us"] = {v: statistics.median(x) for v, x in propose_us.items()}
        # graphs compiled during the timed repetitions, per engine: 0 unless something compiled while serving
        row["compiled_while_timed"] = {n: e.collective_rpc(_graphs_compiled)[0] - c for n, c in compiled.items()}
        results.append(row)
        print(
            json.dumps(
                {
                    k: row[k]
                    for k in (
                        "ctx",
                        "bs",
                        "ms_per_token",
                        "ratio_plain_over",
                        "equal_to_plain",
                        "propose_host_us",
                        "compiled_while_timed",
                    )
                }
            ),
            flush=True,
        )
        print("  steps:", json.dumps(steps), flush=True)
    out = dict(
        shape=a.shape,
        gamma=a.gamma,
        new_tokens=a.new,
        reps=a.reps,
        engines=info,
        skip_25=probe_set(L, 0.25),
        skip_50=probe_set(L, 0.5),
        machine=dict(
            gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
            python=platform.python_version(),
            torch=torch.__version__,
            vllm=vllm.__version__,
        ),
        cells=results,
    )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
