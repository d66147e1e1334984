"""Does a selection's acceptance estimate measure what the drafts then get? On CPU, real weights.

A selection prices each skip set by its top-1 agreement with the full model on reference tokens: the last
committed tokens of a few requests, run again as queries over their cached prefix (`ReferenceBuilder`). A real
draft of the token after position p reads the cached KV of positions < p and its own KV at p, computed from its
own (skipped) hidden states. The reference reads the cached KV at p too, which the full model wrote. This tool
measures both on the same tokens while a request decodes with the skip set (FixedSelector):

  reference  the selection's estimate: the set's sublayers on the reference states, KV of p from the cache
  exact      one draft step per reference token, KV written at p by the draft (the cache is restored after)
  realised   what verification accepted at draft position 1 over the whole run (vLLM's per-position counter)

    python tools/cpu_alpha_check.py --model "$(python scripts/get_model.py qwen2.5-coder-1.5b | tail -1)" \
        --sets a2-15,probe-mix --tokens 48 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Named sets: the attention of layers 2..15 (a quarter of a 28-layer model's sublayers), and a 22-sublayer set
# the shipped selector chose on the H100 for Qwen2.5-Coder-1.5B (docs/real-model.md: predicted alpha 0.86,
# stopped by the guard at 0.58-0.65x of plain decoding).
SETS = {
    "a2-15": ",".join(f"a{i}" for i in range(2, 16)),
    "h100-22": "a2,a3,a4,a7,a8,a10,a11,a14,a15,a16,a19,m1,m3,m4,m7,m8,m9,m10,m13,m14,m15,m16",
    "m14-15": "m14,m15",
}
PROMPTS = [
    'def merge_intervals(intervals):\n    """Merge overlapping [start, end] intervals, sorted."""\n',
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg",
]


class Probe:
    """A FixedSelector that, every `every` steps, measures the set's reference and exact agreement."""

    def __init__(self, inner, drafter, every: int, r: int):
        from vllm_knapspec.adapter.draft import ReferenceBuilder

        self.inner, self.d, self.every, self.r = inner, drafter, every, r
        self.builder = ReferenceBuilder(drafter.draft)
        self.calls, self.ref_hits, self.exact_hits, self.same, self.n = 0, 0, 0, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def plan(self, rows, ctx):
        self.calls += 1
        if self.calls % self.every == 0 and (np.asarray(ctx) > self.r + 2).all():
            self._measure(np.asarray(rows), np.asarray(ctx))
        return self.inner.plan(rows, ctx)

    @torch.inference_mode()
    def _measure(self, rows, ctx):
        skip = self.inner.skip
        ref = self.builder.build(rows, ctx, self.r * len(rows))
        full_top = ref.logits_fn(ref.refs[-1]).argmax(-1)  # [R] the full model's next token at each position
        h = ref.refs[0][None]
        for item in range(2 * self.d.draft.num_layers):
            if not ((item // 2 in skip.attn) if item % 2 == 0 else (item // 2 in skip.mlp)):
                h = ref.run_item(item, h)
        ref_top = ref.logits_fn(h[0]).argmax(-1)
        exact_top = self._exact(ref, rows, ctx, skip)
        self.ref_hits += int((ref_top == full_top).sum())
        self.exact_hits += int((exact_top == full_top).sum())
        self.same += int((ref_top == exact_top).sum())  # the two predictions of the set, token by token
        self.n += len(full_top)

    def _exact(self, ref, rows, ctx, skip):
        """One draft step per reference token, latest position first (a step's KV write at p must not be read
        by an earlier position's step); the KV cache is restored afterwards."""
        from vllm_knapspec.adapter.draft import DraftBatch

        m = self.d.draft
        saved = [t.clone() for t in m.runner.kv_caches]
        out = torch.empty(len(ref.ids), dtype=torch.int64)
        committed = ctx.astype(np.int64) - 1
        order = np.argsort(-committed)[: len(ref.groups)]
        qmax = max(len(g) for g in ref.groups)
        try:
            for back in range(qmax):  # positions committed - 1 - back of every sampled request
                sel = [(i, g[len(g) - 1 - back]) for i, g in enumerate(ref.groups) if back < len(g)]
                rr = np.array([rows[order[i]] for i, _ in sel], dtype=np.int64)
                idx = torch.tensor([j for _, j in sel])
                pos = np.array([committed[order[i]] - 1 - back for i, _ in sel], dtype=np.int64)
                batch = DraftBatch(
                    torch.from_numpy(rr).to(m.device),
                    rr,
                    ref.ids[idx].to(m.device),
                    torch.from_numpy(pos).to(m.device),
                    pos,
                )
                out[idx] = m.logits(m.step(batch, skip, write_kv=True)).argmax(-1).cpu()
        finally:
            for t, s in zip(m.runner.kv_caches, saved):
                t.copy_(s)
        return out.to(ref.ids.device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sets", default="a2-15,h100-22,m14-15", help=f"names from {list(SETS)} or skip-set strings")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--every", type=int, default=4, help="measure every this many engine steps")
    ap.add_argument("--ref-tokens", type=int, default=8, help="reference tokens per request per measurement")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import vllm
    from vllm import SamplingParams

    from conftest import drafter_of, make_llm, spec_counters
    from vllm_knapspec.core.selector import FixedSelector
    from vllm_knapspec.core.skipset import SkipSet

    llm = make_llm(
        a.model,
        {"method": "knapspec", "num_speculative_tokens": 4, "skip_set": "", "lookup": "off", "min_speedup": 0.0},
        max_model_len=1024,
    )
    d = drafter_of(llm)
    sp = SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    res = dict(
        model=a.model,
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), system=platform.platform()),
        vllm=vllm.__version__,
        torch=torch.__version__,
        runner="V1, sync scheduling (vllm-cpu)" if not torch.cuda.is_available() else "as vLLM picks it",
        tokens=a.tokens,
        every=a.every,
        ref_tokens=a.ref_tokens,
        sets={},
    )
    print(json.dumps({k: v for k, v in res.items() if k != "sets"}), flush=True)
    for name in a.sets.split(","):
        skip = SkipSet.parse(d.draft.num_layers, SETS.get(name, name))
        probe = Probe(FixedSelector(skip, 4), d, a.every, a.ref_tokens)
        d.selector = probe
        before = spec_counters(llm)
        t0 = time.perf_counter()
        llm.generate(PROMPTS, sp, use_tqdm=False)
        after = spec_counters(llm)
        pos = [
            x - y
            for x, y in zip(
                after["vllm:spec_decode_num_accepted_tokens_per_pos"],
                before.get("vllm:spec_decode_num_accepted_tokens_per_pos") or [0] * 4,
            )
        ]
        drafts = after["vllm:spec_decode_num_drafts"] - before.get("vllm:spec_decode_num_drafts", 0)
        row = dict(
            skip=str(skip),
            skipped_share=(skip.n_attn_skipped + skip.n_mlp_skipped) / (2 * d.draft.num_layers),
            reference=probe.ref_hits / max(probe.n, 1),
            exact=probe.exact_hits / max(probe.n, 1),
            same_prediction=probe.same / max(probe.n, 1),
            tokens=probe.n,
            realised_pos1=pos[0] / max(drafts, 1),
            realised_per_pos=[p / max(drafts, 1) for p in pos],
            seconds=round(time.perf_counter() - t0, 1),
        )
        res["sets"][name] = row
        print(name, json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
