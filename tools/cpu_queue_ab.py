"""KnapSpec, KnapSpec with every matched row drafting, and vLLM's ngram on the mixed workload through a queue, in
one process on CPU: REQUESTS mixed requests x 64 tokens through engines of BATCH slots (`max_num_seqs`), greedy,
repetitions interleaved (the order reversed on odd ones). `ks_allrows` is the shipped config with its step choice
replaced: every row with a lookup match drafts its match (up to gamma_max tokens), as ngram does. Whether the
drafts KnapSpec's choice declines would buy time.

    python tools/cpu_queue_ab.py [BATCH] [REQUESTS] [REPS]
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
import yaml  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from vllm_knapspec.core.lookup import StepChoice  # noqa: E402
from vllm_knapspec.tools.bench import NGRAM  # noqa: E402
from vllm_knapspec.tools.workloads import WORKLOADS  # noqa: E402


def every_matched_row(lookup, k_max: int) -> None:
    """Replace the drafter's lookup choice: every row with a match drafts, no layer-skip draft."""
    lookup.choose = lambda selector, plan, has, ctx, n: StepChoice(k_max if has.any() else 0, False, has.copy(), 0, 0)


def mixed_workload(requests: int):
    """(model path, `requests` mixed prompts of ~512 tokens, greedy 64-token sampling, the shipped config)."""
    model = subprocess.check_output([sys.executable, str(ROOT / "scripts" / "get_model.py")], text=True)
    model = model.strip().splitlines()[-1]
    tok = AutoTokenizer.from_pretrained(model)
    ps = [TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in WORKLOADS["mixed"](tok, 512, requests)]
    sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    return model, ps, sp, yaml.safe_load(open(ROOT / "configs" / "knapspec.yaml"))


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    model, ps, sp, spec = mixed_workload(requests)
    llms = {
        "knapspec": make_llm(model, speculative_config=spec, max_num_seqs=batch),
        "ks_allrows": make_llm(model, speculative_config=spec, max_num_seqs=batch),
        "ngram": make_llm(model, speculative_config=dict(NGRAM), max_num_seqs=batch),
    }
    every_matched_row(drafter_of(llms["ks_allrows"]).lookup, spec["num_speculative_tokens"])
    for llm in llms.values():
        llm.generate(ps[: 2 * batch], [sp] * (2 * batch), use_tqdm=False)  # warm
    wall: dict = {n: [] for n in llms}
    names = list(llms)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            llms[name].generate(ps, [sp] * len(ps), use_tqdm=False)
            wall[name].append(time.perf_counter() - t)
            print(f"rep {rep} {name}: {wall[name][-1]:.2f} s", flush=True)
    for name, w in wall.items():
        print(f"{name}: median {statistics.median(w):.2f} s ({[round(x, 2) for x in w]})")


if __name__ == "__main__":
    main()
