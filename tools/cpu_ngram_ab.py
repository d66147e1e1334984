"""KnapSpec against vLLM's ngram (and plain decoding) one request at a time, in one process on CPU: the mixed
workload's prompts (`copy`: the ones that copy from their prompt, `free`: free prose, `all`: both, alternating),
greedy, 64 tokens each, engines interleaved per repetition. Prints each engine's wall time, decode steps and
runner time per step, and KnapSpec's propose() time: whether a difference is in the number of steps (the drafts)
or in the time of each (the host work). `knapspec_bar1` is the shipped config with min_speedup 1.0.

    python tools/cpu_ngram_ab.py [copy|free|all] [REPS] [WORKLOAD] [CONTEXT] [NEW_TOKENS]
WORKLOAD: mixed (default: 16 prompts of at most CONTEXT 512 tokens, 64 new tokens each) or default (the default
suite's: code continuation (`copy`) and summarisation (`free`), CONTEXT tokens each, 6 prompts), as
`knapspec-bench --workload`.
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT), str(ROOT / "tools")]

from conftest import make_llm  # noqa: E402  (first: the in-process engine environment)

# isort: split
import yaml  # noqa: E402
from cpu_lookup_ab import time_runner  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from vllm_knapspec.tools.bench import NGRAM  # noqa: E402
from vllm_knapspec.tools.workloads import WORKLOADS  # noqa: E402


def engines(model: str) -> dict:
    spec = yaml.safe_load(open(ROOT / "configs" / "knapspec.yaml"))
    return {
        "plain": make_llm(model, max_num_seqs=1),
        "knapspec": make_llm(model, speculative_config=spec, max_num_seqs=1),
        "knapspec_bar1": make_llm(model, speculative_config={**spec, "min_speedup": 1.0}, max_num_seqs=1),
        "ngram": make_llm(model, speculative_config=dict(NGRAM), max_num_seqs=1),
    }


def runner_id(llm) -> int:
    return id(llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner)


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "copy"
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    model = subprocess.check_output([sys.executable, str(ROOT / "scripts" / "get_model.py")], text=True)
    model = model.strip().splitlines()[-1]
    workload = sys.argv[3] if len(sys.argv) > 3 else "mixed"
    context = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    new = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    count = 16 if workload == "mixed" else 6
    prompts = list(WORKLOADS[workload](AutoTokenizer.from_pretrained(model), context, count))
    prompts = {"copy": prompts[0::2], "free": prompts[1::2]}.get(which, prompts)
    ps = [TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in prompts]
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    llms = engines(model)
    steps: dict = {}
    time_runner(steps)
    for llm in llms.values():
        llm.generate(ps[:2], [sp] * 2, use_tqdm=False)  # warm
    wall: dict = {n: [] for n in llms}
    names = list(llms)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            steps.clear()
            t = time.perf_counter()
            for p in ps:  # one request at a time
                llms[name].generate([p], [sp], use_tqdm=False)
            wall[name].append(time.perf_counter() - t)
            gaps = steps.get(runner_id(llms[name]), {}).get("decode", [0.0])
            prop = steps.get("propose", {}).get("decode", [])
            host = f"; propose() median {1e3 * statistics.median(prop):.2f} ms" if prop else ""
            print(
                f"rep {rep} {name}: wall {wall[name][-1]:.2f} s, {len(gaps)} decode steps, median"
                f" {1e3 * statistics.median(gaps):.1f} ms, sum {sum(gaps):.2f} s{host}",
                flush=True,
            )
    for name, w in wall.items():
        print(f"{name}: median wall {statistics.median(w):.2f} s ({[round(x, 2) for x in w]})")


if __name__ == "__main__":
    main()
