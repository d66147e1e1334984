"""Host time per decode step, plain engine vs KnapSpec engine, on CPU: the engine step minus the model's
forward and logits, per step, medians over many steps (both engines in-process, eager, runs interleaved).
While the selector chooses plain decoding a KnapSpec step should cost what a plain step costs.
    BS=8 CTX=256 NOUT=96 REPS=6 python tools/host_cost.py [OUT.json]"""

import json
import os
import platform
import random
import statistics as st
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import yaml  # noqa: E402

import conftest  # noqa: E402  (in-process engine environment)


def timed_engine(llm, rec):
    """Wrap the in-process engine core's get_output (one step) and the model's forward / compute_logits."""
    client = llm.llm_engine.engine_core
    model = client.engine_core.model_executor.driver_worker.worker.model_runner.model
    inner = [0.0]

    def wrap(fn):
        def timed(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            inner[0] += time.perf_counter() - t
            return out

        return timed

    model.forward, model.compute_logits = wrap(model.forward), wrap(model.compute_logits)
    step = client.get_output

    def get_output():
        inner[0] = 0.0
        t = time.perf_counter()
        out = step()
        rec.append((time.perf_counter() - t, inner[0]))
        return out

    client.get_output = get_output


def main():
    import torch
    import vllm
    from vllm import SamplingParams

    bs, ctx, nout, reps = (int(os.environ.get(k, d)) for k, d in (("BS", 8), ("CTX", 256), ("NOUT", 96), ("REPS", 6)))
    model = os.popen(f"{sys.executable} {ROOT / 'scripts' / 'get_model.py'}").read().strip().splitlines()[-1]
    cfg = yaml.safe_load((ROOT / "vllm_knapspec" / "configs" / "knapspec.yaml").read_text())
    engines = {"plain": conftest.make_llm(model), "knapspec": conftest.make_llm(model, speculative_config=cfg)}
    recs = {k: [] for k in engines}
    for k, llm in engines.items():
        timed_engine(llm, recs[k])
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(ctx)]} for _ in range(bs)]
    for llm in engines.values():
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    host = {k: [] for k in engines}
    for rep in range(reps):
        for k in list(engines) if rep % 2 == 0 else list(engines)[::-1]:
            recs[k].clear()
            engines[k].generate(
                prompts, SamplingParams(temperature=0, max_tokens=nout, ignore_eos=True), use_tqdm=False
            )
            host[k] += [s - f for s, f in recs[k][2:]]  # decode steps (the first ones prefill)
    out = dict(
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        vllm=vllm.__version__,
        torch=torch.__version__,
        bs=bs,
        ctx=ctx,
        new_tokens=nout,
        reps=reps,
        **{
            k: dict(host_ms_median=round(1e3 * st.median(v), 4), host_ms_mean=round(1e3 * st.mean(v), 4), steps=len(v))
            for k, v in host.items()
        },
    )
    print(json.dumps(out, indent=1))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
