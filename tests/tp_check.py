"""Helper for tests/test_tensor_parallel.py and tests/test_ray.py: greedy generation with tensor parallel on CPU
(own process: the executor spawns workers). argv: TP {knapspec|plain} OUT_JSON MODEL [mp|ray]."""

import json
import os
import sys
import time

os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
from vllm import LLM, SamplingParams

M = sys.argv[4]
EXECUTOR = sys.argv[5] if len(sys.argv) > 5 else "mp"
if __name__ == "__main__":
    prompts = [
        "The history of the printing press begins in",
        "def fibonacci(n):\n",
        "Photosynthesis is the process by which plants",
    ]
    sp = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    t = time.time()
    llm = LLM(
        M,
        dtype="float32",
        enforce_eager=True,
        tensor_parallel_size=int(sys.argv[1]),
        max_model_len=1024,
        distributed_executor_backend=EXECUTOR,
        disable_log_stats=False,
        speculative_config=None
        if sys.argv[2] == "plain"
        else {
            "method": "knapspec",
            "num_speculative_tokens": 4,
            "min_speedup": 0.0,
            "max_selection_overhead": 1.0,
            "reference_tokens": 8,
            "reselect_interval": 8,
        },
    )
    print("init", time.time() - t, flush=True)
    out = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
    time.sleep(1.5)  # workers publish their KnapSpec counters every 0.5 s
    m = {
        x.name: getattr(x, "value", None)
        for x in llm.get_metrics()
        if "spec_decode_num_draft_tokens" in x.name
        or "spec_decode_num_accepted_tokens" == x.name.split(":")[1]
        or "knapspec_selections" in x.name
        or "fallback" in x.name
        or "knapspec_draft_steps" in x.name
    }
    from vllm_knapspec.adapter import metrics

    ranks = [s["counters"] for s in metrics.read_snapshots()]  # one snapshot per worker (rank)
    json.dump({"out": out, "m": m, "ranks": ranks, "executor": EXECUTOR}, open(sys.argv[3], "w"))
    print("RESULT", m, ranks, flush=True)
