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


def choose_step(
    has_lookup, alpha_lookup, alpha_skip, t_plain, t_verify, t_draft_step, gamma_max, bar=1.0, p_lookup=None
):
    """Best (gamma, layer-skip on/off, lookup rows) for one step; plain unless it beats plain TPT x `bar`.

    has_lookup [n] bool: rows with a lookup match now; alpha_lookup [n]: per-token acceptance of each row's
    lookup draft; p_lookup [n] (optional): the chance of a match where there is none now (the step this choice
    sizes comes one step later; default 0). alpha_skip: the layer-skip plan's acceptance (None: no plan);
    t_verify(x): time of a step verifying x draft tokens in all (rows without a lookup draft verify none in a
    lookup-only step); t_draft_step: one draft step of the plan (every row drafts gamma tokens then).
    A lookup-only step takes the rows whose lookup drafts raise tokens per time, best first.

    2 rows, only row 0 has a lookup match (alpha 0.9), no layer-skip plan, t_plain 1.0, t_verify(x) = 1 + 0.1 x:
    gamma 5 gives (1 + .9 + .81 + .73 + .66 + .59) + 1 = 5.69 tokens in 1.5 -> 3.79/s > plain's 2/s.
    >>> c = choose_step(np.array([True, False]), np.array([0.9, 0.0]), None, 1.0, lambda x: 1 + 0.1 * x, None, 5)
    >>> c.gamma, c.use_skip, c.lookup_rows.tolist(), round(c.tpt, 2)
    (5, False, [True, False], 3.79)
    """
    has_lookup = np.asarray(has_lookup, dtype=bool)
    n = len(has_lookup)
    plain = n / t_plain
    best = StepChoice(0, False, np.zeros(n, dtype=bool), plain, plain)
    p = has_lookup.astype(float) if p_lookup is None else np.where(has_lookup, 1.0, np.asarray(p_lookup, float))
    for g in range(1, gamma_max + 1):
        e_look = np.array([expected_tokens(a, g) for a in alpha_lookup]) if n else np.zeros(0)
        cands = []
        # lookup drafts alone: rows by expected tokens per draft, best first; the prefix with the best rate
        order = [i for i in np.argsort(-e_look, kind="stable") if p[i] > 0]
        tokens, drafted, rate, take = float(n), 0.0, 0.0, 0
        for j, i in enumerate(order):
            tokens += p[i] * (e_look[i] - 1.0)
            drafted += p[i] * g
            r = float(tokens / t_verify(drafted))
            if r > rate:
                rate, take = r, j + 1
        if take:
            rows = np.zeros(n, dtype=bool)
            rows[order[:take]] = True
            cands.append((False, rows, rate))
        if alpha_skip is not None and t_draft_step is not None:
            e_skip = expected_tokens(alpha_skip, g)
            rows = has_lookup & (e_look > e_skip)
            tokens = float(np.where(rows, e_look, e_skip).sum())
            cands.append((True, rows, float(tokens / (t_verify(g * n) + g * t_draft_step))))
        for use_skip, rows, r in cands:
            if r > best.tpt and r > bar * plain:
                best = StepChoice(g, use_skip, rows, r, plain)
    return best


class LookupAcceptance:
    """Per-request acceptance of lookup drafts as the per-token rate `expected_tokens` takes: each verified
    draft is a run of accepted tokens ended by one rejection (none when all were accepted), so the estimate is
    (accepted + prior w) / (accepted + rejections + w). Accepted over proposed would be biased low: a draft
    copied right for 5 tokens and one wrong at its first token give 5/10, where the per-token rate is 5/6.
    A request whose output copies its prompt earns a high rate within a few steps; one that writes new text
    falls towards 0 and stops getting lookup drafts.

    The prior of a request is the rate pooled over all requests (an empirical-Bayes prior, `prior` before any
    draft was verified), forgetting old observations by `decay` per draft: on a server whose requests rarely
    copy, a new request starts low instead of paying for a few rejected drafts first; where they copy, it
    starts high.

    >>> acc = LookupAcceptance(prior=0.5, weight=4.0, decay=1.0)
    >>> acc.observe("r", 5, 5); acc.observe("r", 5, 0)
    >>> round(acc.pooled(), 3)  # (5 + 0.5 * 4) / (5 + 1 + 4)
    0.7
    >>> round(acc.alpha("r"), 3)  # (5 + 0.7 * 4) / (5 + 1 + 4)
    0.78
    """

    def __init__(self, prior: float = 0.5, weight: float = 4.0, decay: float = 0.99):
        self.prior, self.weight, self.decay = prior, weight, decay
        self.counts: dict[str, list[float]] = {}  # req_id -> [accepted tokens, rejections]
        self.matches: dict[str, list[float]] = {}  # req_id -> [steps with a lookup match, steps]
        self.pool = [0.0, 0.0]  # all requests: [accepted tokens, rejections], decayed

    def pooled(self) -> float:
        acc, rej = self.pool
        return (acc + self.prior * self.weight) / (acc + rej + self.weight)

    def alpha(self, req_id: str) -> float:
        acc, rej = self.counts.get(req_id, (0.0, 0.0))
        return (acc + self.pooled() * self.weight) / (acc + rej + self.weight)

    def observe(self, req_id: str, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        c = self.counts.setdefault(req_id, [0.0, 0.0])
        c[0] += accepted
        c[1] += accepted < proposed
        self.pool = [self.pool[0] * self.decay + accepted, self.pool[1] * self.decay + (accepted < proposed)]

    def seen(self, req_id: str, matched: bool) -> None:
        c = self.matches.setdefault(req_id, [0.0, 0.0])
        c[0] += matched
        c[1] += 1

    def match_rate(self, req_id: str) -> float:
        """Share of the request's steps that had a lookup match ((m + 0.5) / (steps + 1))."""
        m, k = self.matches.get(req_id, (0.0, 0.0))
        return (m + 0.5) / (k + 1.0)

    def forget(self, live: set) -> None:
        for d in (self.counts, self.matches):
            for r in [r for r in d if r not in live]:
                del d[r]
