"""Host time of KnapSpec's propose() by part, against vLLM's ngram proposer, on CPU: the mixed workload through
in-process engines of BATCH slots, greedy; each part's total and per-call mean, and the engines' wall time.

    python tools/cpu_propose_parts.py [BATCH] [REQUESTS]
    PROFILE=1 python tools/cpu_propose_parts.py ...   # and a cProfile of KnapSpec's propose(), by own time
"""

import cProfile
import os
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_queue_ab import mixed_workload  # noqa: E402  (first: the in-process engine environment)

from conftest import drafter_of, make_llm  # noqa: E402
from vllm_knapspec.tools.bench import NGRAM  # noqa: E402

TOTAL = defaultdict(float)
CALLS = defaultdict(int)


def timed(obj, name, label):
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            TOTAL[label] += time.perf_counter() - t
            CALLS[label] += 1

    setattr(obj, name, wrapper)


def runner_of(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    model, ps, sp, spec = mixed_workload(requests)
    ks = make_llm(model, speculative_config=spec, max_num_seqs=batch)
    ng = make_llm(model, speculative_config=dict(NGRAM), max_num_seqs=batch)
    for llm in (ks, ng):
        llm.generate(ps[: 2 * batch], [sp] * (2 * batch), use_tqdm=False)  # warm
    d = drafter_of(ks)
    prof = cProfile.Profile() if os.environ.get("PROFILE") else None
    if prof is not None:
        inner = d.propose

        def profiled(*a, **k):
            prof.enable()
            try:
                return inner(*a, **k)
            finally:
                prof.disable()

        d.propose = profiled
    timed(d, "propose", "ks propose")
    timed(d, "_begin", "ks _begin")
    timed(d.selector, "plan", "ks selector.plan")
    timed(d, "_bonus_positions", "ks bonus positions")
    timed(d.lookup, "observe_shadow", "ks lookup.observe_shadow")
    timed(d.lookup, "propose", "ks lookup.propose")
    timed(d.lookup, "choose", "ks lookup.choose")
    timed(d.lookup, "fill", "ks lookup.fill")
    timed(d.lookup, "observe", "ks lookup.observe")
    timed(d.lookup, "observe_cost", "ks lookup.observe_cost")
    timed(d.feedback, "push", "ks feedback.push")
    timed(d, "_report", "ks _report")
    rk, rn = runner_of(ks), runner_of(ng)
    timed(rk, "propose_draft_token_ids", "ks runner.propose_draft_token_ids")
    timed(rn, "propose_draft_token_ids", "ng runner.propose_draft_token_ids")
    timed(rn.drafter, "propose", "ng drafter.propose")
    timed(rk, "execute_model", "ks runner.execute_model")
    timed(rn, "execute_model", "ng runner.execute_model")
    timed(rk, "sample_tokens", "ks runner.sample_tokens")
    timed(rn, "sample_tokens", "ng runner.sample_tokens")
    timed(rk.model, "forward", "ks model.forward")
    timed(rn.model, "forward", "ng model.forward")
    wall = defaultdict(list)
    for rep in range(2):
        for name, llm in (("ks", ks), ("ng", ng)) if rep % 2 == 0 else (("ng", ng), ("ks", ks)):
            t = time.perf_counter()
            llm.generate(ps, [sp] * len(ps), use_tqdm=False)
            wall[name].append(round(time.perf_counter() - t, 2))
    print("wall", dict(wall))
    for label in sorted(TOTAL):
        print(f"{label:40s} {TOTAL[label]:8.3f} s {CALLS[label]:6d} calls {1e3 * TOTAL[label] / CALLS[label]:7.3f} ms")

    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(40)


if __name__ == "__main__":
    main()
