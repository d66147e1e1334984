"""Selectors to compare KnapSpec with: a fixed skip set (config `skip_set`: debugging and the static
Draft&Verify-style baseline) and the CLaSp baseline (whole layers, cosine DP, fixed budget and gamma)."""

from __future__ import annotations

import torch

from vllm_knapspec.core import dp
from vllm_knapspec.core.selector.knapspec import KnapSpecSelector
from vllm_knapspec.core.skipset import SkipSet


class FixedSelector:
    """A fixed skip set (config `skip_set`) drafting gamma tokens: debugging and the static baseline."""

    def __init__(self, skip: SkipSet, gamma: int):
        self.skip, self.gamma = skip, gamma

    def plan(self, rows, ctx):
        return self.skip, self.gamma

    def observe_verify(self, ctx, proposed, accepted, seconds, steady=True, verified=None):
        pass

    def observe_draft(self, skip, ctx, drafts, seconds, steps=1):
        pass

    def charge_capture(self, seconds):
        pass


class ClaspSelector(KnapSpecSelector):
    """CLaSp-style baseline: whole layers, cosine DP, a fixed number of skipped layers, fixed gamma,
    re-selected on the same schedule (no latency model, no TPT, always speculates)."""

    passes = False  # the baseline as published: every due selection runs, and it always speculates

    def _guard(self) -> bool:  # ... and no guard
        return False

    def select(self, rows, ctx):
        L, M = self.L, min(self.cfg.clasp_skip_layers, self.L - 2)
        ref = self.adapter.build(rows, ctx, self.cfg.reference_tokens)

        def run_layer(l, h):  # item l of this DP = whole layer l (l == L: identity padding)
            return h if l >= L else ref.run_item(2 * l + 1, ref.run_item(2 * l, h))

        refs, n = ref.refs[::2], L + L % 2  # the DP wants an even item count
        if n > L:
            refs = torch.cat([refs, refs[-1:]])
        cands = dp.knapsack_dp(run_layer, refs, [1] * n, M, 0.0, (0, L - 1, *range(L, n)), impl=self.cfg.kernels)
        best = max((c for c in cands if c.weight == M), key=lambda c: c.cos, default=cands[-1])
        layers = frozenset(best.skipset.items())
        skip = SkipSet(L, layers, layers)
        self.current = (skip, self.cfg.num_speculative_tokens)
        self.predicted_alpha = float(best.cos)
        self._reset_window(ctx)
        self.history.append(
            dict(
                ctx=float(ctx.mean()),
                batch=len(ctx),
                skip=str(skip),
                attn=len(layers),
                mlp=len(layers),
                gamma=self.cfg.num_speculative_tokens,
                speculate=True,
            )
        )
