"""Prompt-lookup drafts as one more KnapSpec candidate, chosen per step by tokens per time.

A lookup draft (vLLM's n-gram matcher over the request's own tokens) costs no draft time, only the longer
verification; a layer-skip draft costs gamma draft steps. Per engine step the candidates are plain decoding,
lookup drafts alone (rows without a match verify nothing useful), and the layer-skip plan with lookup drafts
in the rows where they are expected to do better. Expected tokens per row follow `tpt.expected_tokens`; the
step's time is the verification of gamma + 1 tokens per row plus gamma draft steps if the layer-skip model
runs. No vLLM imports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_knapspec.core.tpt import expected_tokens


@dataclass
class StepChoice:
    gamma: int  # drafts per row the step verifies (0: a plain step)
    use_skip: bool  # run the layer-skip draft loop
    lookup_rows: np.ndarray  # [n] bool: rows that take their lookup draft
    tpt: float  # predicted tokens per second
    plain: float  # plain decoding's


def choose_step(has_lookup, alpha_lookup, alpha_skip, t_plain, t_verify, t_draft_step, gamma_max, bar=1.0):
    """Best (gamma, layer-skip on/off, lookup rows) for one step; plain unless it beats plain TPT x `bar`.

    has_lookup [n] bool, alpha_lookup [n] per-token acceptance of each row's lookup draft; alpha_skip: the
    layer-skip plan's acceptance (None: no plan); t_verify(g): time of a step verifying g drafts per row.

    2 rows, only row 0 has a lookup match (alpha 0.9), no layer-skip plan, t_plain 1.0, t_verify(g) = 1 + 0.1 g:
    gamma 4 gives (1 + .9 + .81 + .73 + .66) + 1 = 5.1 tokens in 1.4 -> 3.64/s > plain's 2/s.
    >>> c = choose_step(np.array([True, False]), np.array([0.9, 0.0]), None, 1.0, lambda g: 1 + 0.1 * g, None, 4)
    >>> c.gamma, c.use_skip, c.lookup_rows.tolist(), round(c.tpt, 2)
    (4, False, [True, False], 3.64)
    """
    n = len(has_lookup)
    plain = n / t_plain
    best = StepChoice(0, False, np.zeros(n, dtype=bool), plain, plain)
    for g in range(1, gamma_max + 1):
        e_look = np.array([expected_tokens(a, g) for a in alpha_lookup]) if n else np.zeros(0)
        e_look = np.where(has_lookup, e_look, 1.0)
        cands = [(False, has_lookup.copy(), float(e_look.sum()), t_verify(g))]
        if alpha_skip is not None and t_draft_step is not None:
            e_skip = expected_tokens(alpha_skip, g)
            rows = has_lookup & (e_look > e_skip)
            cands.append((True, rows, float(np.where(rows, e_look, e_skip).sum()), t_verify(g) + g * t_draft_step))
        for use_skip, rows, tokens, seconds in cands:
            if not use_skip and not rows.any():
                continue
            rate = tokens / seconds
            if rate > best.tpt and rate > bar * plain:
                best = StepChoice(g, use_skip, rows, rate, plain)
    return best


class LookupAcceptance:
    """Per-request acceptance of lookup drafts, learned from what verification kept: (accepted + prior) /
    (proposed + prior weight). A request whose output copies its prompt earns a high rate within a few steps;
    one that writes new text falls towards 0 and stops getting lookup drafts."""

    def __init__(self, prior: float = 0.5, weight: float = 4.0):
        self.prior, self.weight = prior, weight
        self.counts: dict[str, list[float]] = {}

    def alpha(self, req_id: str) -> float:
        acc, prop = self.counts.get(req_id, (0.0, 0.0))
        return (acc + self.prior * self.weight) / (prop + self.weight)

    def observe(self, req_id: str, proposed: int, accepted: int) -> None:
        c = self.counts.setdefault(req_id, [0.0, 0.0])
        c[0] += accepted
        c[1] += proposed

    def forget(self, live: set) -> None:
        for r in [r for r in self.counts if r not in live]:
            del self.counts[r]
