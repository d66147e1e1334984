"""What KnapSpec's lookup choice predicts against what it gets, on CPU (sync scheduling, host matcher): one
in-process engine with the shipped config, a mixed batch (copy, free prose, ...), greedy or sampled. Prints the
extra tokens the chosen lookup drafts were predicted to add against those accepted, and the median measured vs
predicted time of drafting and plain steps (the VerifyJump's inputs).

    [VERBOSE=1] python tools/cpu_lookup_choice.py sampled [BATCH] [NEW_TOKENS] [WORKLOAD] [CONTEXT]
WORKLOAD: mixed (default; copy prompts of at most CONTEXT tokens) or default (code continuation and summarisation,
CONTEXT tokens each), as `knapspec-bench --workload`.
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from conftest import drafter_of, make_llm  # noqa: E402  (first: the in-process engine environment)

# isort: split
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

import vllm_knapspec.adapter.lookup_drafts as ld  # noqa: E402

VERBOSE = bool(int(__import__("os").environ.get("VERBOSE", "0")))  # VERBOSE=1: every choice with a match
from vllm_knapspec.core.lookup import lookup_tokens  # noqa: E402
from vllm_knapspec.tools.workloads import WORKLOADS  # noqa: E402


def recorders(choices: list, costs: list):
    """Wrap the choice and the cost observation of lookup_drafts to record what they see."""
    choose, observe = ld.choose_with_models, ld.LookupDrafts.observe_cost

    def recorded_choose(selector, plan, has, alphas, lookup_len, ctx, n, k_max, jump, guard=None, uniform=False):
        alphas = alphas() if callable(alphas) else alphas
        c = choose(selector, plan, has, alphas, lookup_len, ctx, n, k_max, jump, guard, uniform)
        lens = np.minimum(np.asarray(lookup_len if lookup_len is not None else [k_max] * n), c.gamma)
        lens = lens if c.lengths is None else np.minimum(lens, c.lengths)
        rows = zip(alphas, lens, c.lookup_rows)
        choices.append((sum(lookup_tokens(a, int(g)) - 1.0 for a, g, r in rows if r) if c.gamma else 0.0, c.gamma))
        if VERBOSE and has.any():  # rows with a match: their rates (first, next), match length, the step's gamma
            rates = [tuple(round(float(x), 2) for x in np.atleast_1d(a)) for a in np.asarray(alphas)[has]]
            extra = round(jump.extra(1), 3)
            print(f"  choice: rates {rates} match {np.asarray(lookup_len)[has].tolist()} gamma {c.gamma} jump {extra}")
        return c

    def recorded_observe(self, selector, ctx, n, verified, accepted, seconds):
        t_plain, slope = ld._line(selector, ctx, n)
        costs.append((verified, seconds, t_plain + verified * slope))
        return observe(self, selector, ctx, n, verified, accepted, seconds)

    ld.choose_with_models, ld.LookupDrafts.observe_cost = recorded_choose, recorded_observe


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "sampled"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    new = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    workload = sys.argv[4] if len(sys.argv) > 4 else "mixed"
    context = int(sys.argv[5]) if len(sys.argv) > 5 else 1024
    get = [sys.executable, str(ROOT / "scripts" / "get_model.py")]
    model = subprocess.check_output(get, text=True).strip().splitlines()[-1]
    tok = AutoTokenizer.from_pretrained(model)
    cfg = yaml.safe_load(open(ROOT / "configs" / "knapspec.yaml"))
    llm = make_llm(model, speculative_config=cfg, max_model_len=max(4096, min(8192, context + new + 64)))
    d = drafter_of(llm)
    ps = [TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in WORKLOADS[workload](tok, context, batch)]
    temp = 0.0 if mode == "greedy" else 0.8
    sps = [
        SamplingParams(max_tokens=new, temperature=temp, seed=100 + i if temp else None, ignore_eos=True)
        for i in range(batch)
    ]
    llm.generate(ps, sps, use_tqdm=False)  # warm: the selector and the acceptance priors have seen a round
    choices, costs = [], []
    recorders(choices, costs)
    c0 = dict(d.stats.counters)
    t = time.perf_counter()
    llm.generate(ps, sps, use_tqdm=False)
    c1 = d.stats.counters
    got = {k: c1.get(f"lookup_{k}_tokens", 0) - c0.get(f"lookup_{k}_tokens", 0) for k in ("draft", "accepted")}
    print(f"{workload} {context}, {mode}, batch {batch}, {new} tokens: {time.perf_counter() - t:.2f} s")
    pred, gammas = sum(c[0] for c in choices), [c[1] for c in choices]
    print(f"lookup: predicted {pred:.1f} extra tokens, accepted {got['accepted']:.0f} of {got['draft']:.0f}")
    print(f"steps choosing gamma 0..5: {[gammas.count(g) for g in range(6)]}")
    for name, rows in (("drafting", [c for c in costs if c[0]]), ("plain", [c for c in costs if not c[0]])):
        if rows:
            med = [1e3 * statistics.median(r[i] for r in rows) for i in (1, 2)]
            print(f"{name} steps: {len(rows)}, measured {med[0]:.1f} ms, predicted {med[1]:.1f} ms (medians)")


if __name__ == "__main__":
    main()
