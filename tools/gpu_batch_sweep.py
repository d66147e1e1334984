"""What one decode step costs in vLLM without speculation at a long context, batch by batch.

    bash tools/gpu_device.sh python3 tools/gpu_batch_sweep.py --ctx 30720 --batches 8,7,6,5,4 --out $OUT/sweep.json

A speculating engine's requests finish at different steps (each keeps a different number of drafts), so after the
first finishes it decodes a smaller batch than plain decoding of the same requests ever runs. This prices those
batches on plain engines (dummy Qwen2.5-1.5B-shaped weights; decode cost does not depend on the values): vLLM's
defaults (V2 runner, async scheduling, FULL decode graphs for the capture sizes 1, 2, 4, 8, 16, ...) and the same
with a graph for every batch size up to 16. Per batch size b: the median over `--reps` of
(time of 1 + new tokens - time of 1 token) / new, prompts already in the prefix cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_bench import write_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--ctx", type=int, default=30720)
    ap.add_argument("--batches", default="8,7,6,5,4")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mem", type=float, default=0.22)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    batches = [int(b) for b in a.batches.split(",")]
    max_len = a.ctx + a.new + 64
    path = write_config(a.shape, max_len)
    kw = dict(
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=max_len,
        max_num_seqs=16,
        gpu_memory_utilization=a.mem,
        seed=0,
    )
    engines = {
        "plain": LLM(path, **kw),
        "plain_all_sizes": LLM(path, compilation_config={"cudagraph_capture_sizes": list(range(1, 17))}, **kw),
    }
    prompts = [
        TokensPrompt(prompt_token_ids=[(500 + 17 * i + 29 * j) % 30000 + 10 for j in range(a.ctx)])
        for i in range(max(batches))
    ]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    many = SamplingParams(max_tokens=1 + a.new, temperature=0.0, ignore_eos=True)
    out = dict(
        gpu=torch.cuda.get_device_name(0),
        vllm=vllm.__version__,
        torch=torch.__version__,
        ctx=a.ctx,
        new=a.new,
        ms_per_step={n: {} for n in engines},
    )
    for b in batches:
        for name, e in engines.items():
            e.generate(prompts[:b], one, use_tqdm=False)  # prefill once: later runs hit the prefix cache
            per = []
            for _ in range(a.reps):
                t = time.perf_counter()
                e.generate(prompts[:b], one, use_tqdm=False)
                t1 = time.perf_counter() - t
                t = time.perf_counter()
                e.generate(prompts[:b], many, use_tqdm=False)
                per.append((time.perf_counter() - t - t1) / a.new * 1e3)
            out["ms_per_step"][name][b] = statistics.median(per)
        print(b, {n: round(out["ms_per_step"][n][b], 2) for n in engines}, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
