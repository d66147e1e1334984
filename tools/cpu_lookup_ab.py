"""Plain decoding against KnapSpec (shipped config) on the mixed workload with a queue, in one process on CPU:
two in-process engines of `max_num_seqs` BATCH, REQUESTS mixed requests x 64 tokens each, repetitions interleaved
(plain first on even ones). Prints each repetition's wall time and KnapSpec's full-batch step gaps split by whether
they verified lookup drafts.

    python tools/cpu_lookup_ab.py [greedy|sampled] [BATCH] [REQUESTS] [REPS]
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

import vllm_knapspec.adapter.drafter as drafter_mod  # noqa: E402
from vllm_knapspec.tools.workloads import WORKLOADS  # noqa: E402


def record_steps(log: list) -> None:
    """Each KnapSpec step's gap, the lookup draft tokens it verified and its batch size."""
    begin = drafter_mod.KnapSpecDrafter._begin

    def _begin(self, cad, n, rejected):
        verified = self.lookup.pending_tokens() if self.lookup is not None else 0
        step = begin(self, cad, n, rejected)
        log.append((step.gap, verified, n))
        return step

    drafter_mod.KnapSpecDrafter._begin = _begin


def time_runner(log: dict) -> None:
    """Each engine's runner time per step (execute_model + sample_tokens, which drafts), by runner, split into
    steps that scheduled only decodes and the rest (prefill chunks); and KnapSpec's propose() time alone under
    the key "propose": what a step costs each engine apart from the scheduler."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    execute, sample = GPUModelRunner.execute_model, GPUModelRunner.sample_tokens

    def execute_model(self, so, *a, **kw):
        self._ab_t = time.perf_counter()
        self._ab_decode = all(
            n <= 1 + len(so.scheduled_spec_decode_tokens.get(r, ())) for r, n in so.num_scheduled_tokens.items()
        )
        return execute(self, so, *a, **kw)

    def sample_tokens(self, *a, **kw):
        out = sample(self, *a, **kw)
        if hasattr(self, "_ab_t"):
            kind = "decode" if self._ab_decode else "other"
            log.setdefault(id(self), {}).setdefault(kind, []).append(time.perf_counter() - self._ab_t)
        return out

    GPUModelRunner.execute_model, GPUModelRunner.sample_tokens = execute_model, sample_tokens
    propose = drafter_mod.KnapSpecDrafter.propose

    def timed_propose(self, *a, **kw):
        t = time.perf_counter()
        out = propose(self, *a, **kw)
        kind = "decode" if getattr(self.runner, "_ab_decode", True) else "other"
        log.setdefault("propose", {}).setdefault(kind, []).append(time.perf_counter() - t)
        return out

    drafter_mod.KnapSpecDrafter.propose = timed_propose


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "sampled"
    batch, requests, reps = (int(sys.argv[i]) if len(sys.argv) > i else d for i, d in ((2, 4), (3, 16), (4, 3)))
    model = subprocess.check_output([sys.executable, str(ROOT / "scripts" / "get_model.py")], text=True)
    model = model.strip().splitlines()[-1]
    tok = AutoTokenizer.from_pretrained(model)
    ps = [TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in WORKLOADS["mixed"](tok, 512, requests)]
    temp = 0.8 if mode == "sampled" else 0.0
    sps = [
        SamplingParams(max_tokens=64, temperature=temp, seed=1234 + i if temp else None, ignore_eos=True)
        for i in range(len(ps))
    ]
    plain = make_llm(model, max_num_seqs=batch)
    spec = yaml.safe_load(open(ROOT / "configs" / "knapspec.yaml"))
    ks = make_llm(model, speculative_config=spec, max_num_seqs=batch)
    log: list = []
    record_steps(log)
    steps: dict = {}
    time_runner(steps)
    for llm in (plain, ks):
        llm.generate(ps[:batch], sps[:batch], use_tqdm=False)  # warm
    wall = {"plain": [], "knapspec": []}
    for rep in range(reps):
        order = (("plain", plain), ("knapspec", ks))
        for name, llm in order if rep % 2 == 0 else order[::-1]:
            log.clear()
            steps.clear()
            t = time.perf_counter()
            llm.generate(ps, sps, use_tqdm=False)
            wall[name].append(time.perf_counter() - t)
            for key, kinds in steps.items():
                gaps, other = kinds.get("decode", [0.0]), kinds.get("other", [])
                what = "propose()" if key == "propose" else "runner"
                print(
                    f"rep {rep} {name} {what}: {len(gaps)} decode steps, median {1e3 * statistics.median(gaps):.1f}"
                    f" ms, sum {sum(gaps):.2f} s; {len(other)} other steps, sum {sum(other):.2f} s;"
                    f" wall {wall[name][-1]:.2f} s"
                )
            if name == "knapspec":
                full = [(g, v) for g, v, n in log if g is not None and n == batch]
                drafting, other = [g for g, v in full if v], [g for g, v in full if not v]
                med = [1e3 * statistics.median(x) if x else 0.0 for x in (drafting, other)]
                print(
                    f"rep {rep}: {len(log)} steps; full-batch steps verifying lookup drafts {len(drafting)}"
                    f" (median {med[0]:.1f} ms), without {len(other)} (median {med[1]:.1f} ms)"
                )
    c = drafter_of(ks).stats.counters
    print({k: [round(x, 2) for x in v] for k, v in wall.items()})
    ratio = statistics.median(wall["plain"]) / statistics.median(wall["knapspec"])
    print(f"knapspec / plain (median wall): {ratio:.3f}")
    print(f"lookup draft tokens {c.get('lookup_draft_tokens', 0):.0f}, kept {c.get('lookup_accepted_tokens', 0):.0f}")


if __name__ == "__main__":
    main()
