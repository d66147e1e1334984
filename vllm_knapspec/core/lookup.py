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
    lengths: np.ndarray | None = None  # [n] lookup tokens per row (None: each lookup row its match, at most gamma)


def lookup_tokens(alpha, m: int) -> float:
    """Expected tokens of a step verifying an m-token lookup draft (the bonus token included). alpha: a per-token
    rate (geometric, `expected_tokens`), or (first, next): the chance that the first drafted token is right, and
    that a token after a right one is right too. A copied span is either right from its first token on or not
    at all, so one rate undersells long drafts: (0.5, 0.95) gives 1 + 0.5 (1 + .95 + .95^2 + .95^3 + .95^4) =
    3.26 tokens for m = 5, where the per-token rate with the same tokens-accepted ratio gives less.

    >>> round(lookup_tokens((0.5, 0.95), 5), 2), round(lookup_tokens(0.5, 5), 2), lookup_tokens((0.5, 0.95), 0)
    (3.26, 1.97, 1.0)
    """
    if np.ndim(alpha) == 0:
        return expected_tokens(float(alpha), m)
    first, nxt = float(alpha[0]), float(alpha[1])
    return 1.0 + (first * expected_tokens(nxt, m - 1) if m > 0 else 0.0)


def _lookup_tokens_rows(alpha: np.ndarray, m: np.ndarray) -> np.ndarray:
    """lookup_tokens for every row and draft length at once: alpha [n] per-token rates or [n, 2] (first, next);
    m [G, n] draft lengths -> [G, n].

    >>> _lookup_tokens_rows(np.array([[0.5, 0.95], [0.0, 0.0]]), np.array([[5, 0]])).round(2).tolist()
    [[3.26, 1.0]]
    """
    if alpha.ndim == 1:
        return expected_tokens(alpha, m)
    rest = expected_tokens(alpha[:, 1], np.maximum(m - 1, 0))
    return np.where(m > 0, 1.0 + alpha[:, 0] * rest, 1.0)


def _best_lengths(has_lookup, glens, e_looks, t_verify) -> tuple[float, np.ndarray]:
    """Lookup drafts alone, each row its own length: every row's next draft token adds what it adds to the row's
    expected tokens (first, then first x next, ...: less for each further token), so the best steps verifying x
    tokens in all take the x tokens that add most, and the best x is the one with the best tokens per time.
    Returns (rate, lengths [n]); no token: (0.0, zeros).

    Rows 0 (0.9, 0.9) and 1 (0.3, 0.3), both with 5-token matches, t_verify(x) = 1 + 0.05 x: row 0 takes all five
    tokens (5.69 tokens in 1.25 s), row 1 only its first (0.3 more tokens for 0.05 s beats 4.55 per second; its
    second would add 0.09).
    >>> glens = np.minimum([[5, 5]], np.arange(1, 6)[:, None])  # [G, n] tokens per row at each gamma
    >>> e = _lookup_tokens_rows(np.array([[0.9, 0.9], [0.3, 0.3]]), glens)
    >>> rate, lengths = _best_lengths(np.array([True, True]), glens, e, lambda x: 1 + 0.05 * x)
    >>> round(rate, 2), lengths.tolist()
    (4.6, [5, 1])
    """
    n, G = len(has_lookup), len(glens)
    gain = e_looks - np.vstack([np.ones((1, n)), e_looks[:-1]])  # [G, n] what each row's g-th token adds
    exists = has_lookup[None, :] & (glens == np.arange(1, G + 1)[:, None])  # [G, n] the row's match has a g-th
    g_idx, rows = np.nonzero(exists)
    if not len(rows):
        return 0.0, np.zeros(n, dtype=np.int64)
    adds = gain[g_idx, rows]
    order = np.lexsort((g_idx, -adds))  # most added first; a row's tokens in order where they add the same
    tokens = n + np.cumsum(adds[order])
    rates = tokens / np.asarray(t_verify(np.arange(1, len(order) + 1)), dtype=np.float64)
    take = int(np.argmax(rates)) + 1
    return float(rates[take - 1]), np.bincount(rows[order[:take]], minlength=n)


def choose_step(
    has_lookup,
    alpha_lookup,
    alpha_skip,
    t_plain,
    t_verify,
    t_draft_step,
    gamma_max,
    bar=1.0,
    lookup_len=None,
    uniform=False,
):
    """Best (gamma, layer-skip on/off, lookup rows, their lengths) for one step; plain unless it beats plain TPT x
    `bar`.

    has_lookup [n] bool: rows with a lookup match now; alpha_lookup: each row's lookup acceptance, [n] per-token
    rates or [n, 2] (first token, next token after an accepted one: `lookup_tokens`); lookup_len [n] (optional,
    default unlimited): tokens of each row's lookup draft, so a row drafts min(lookup_len, gamma) of them.
    alpha_skip: the layer-skip plan's acceptance (None: no plan);
    t_verify(x): time of a step verifying x draft tokens in all (rows without a lookup draft verify none in a
    lookup-only step), for an int x or elementwise for an array of them; t_draft_step: one draft step of the
    plan (every row drafts gamma tokens then).
    A lookup-only step gives each row its own length (`_best_lengths`: the draft tokens that add most tokens per
    time, over all rows; what a step verifies is what it pays for); with the layer-skip plan, gamma caps every
    lookup draft of the step. `uniform`: every row verifies gamma tokens whatever it drafted (async scheduling
    schedules drafts before any match is known): a row without a draft verifies gamma fillers, so every row with
    a match takes its lookup draft (it is free) and a step pays for n x gamma tokens.

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
    cap = np.full(n, gamma_max) if lookup_len is None else np.asarray(lookup_len, dtype=np.int64)
    glens = np.minimum(cap[None, :], np.arange(1, gamma_max + 1)[:, None])  # [G, n] lookup tokens per row, gamma
    e_looks = _lookup_tokens_rows(np.asarray(alpha_lookup, dtype=np.float64), glens)
    cands = _uniform_candidates if uniform else _candidates
    for g, use_skip, rows, r, lengths in cands(has_lookup, glens, e_looks, alpha_skip, t_verify, t_draft_step):
        if r > best.tpt and r > bar * plain:
            best = StepChoice(g, use_skip, rows, r, plain, lengths)
    return best


def _candidates(has_lookup, glens, e_looks, alpha_skip, t_verify, t_draft_step):
    """(gamma, layer-skip on, lookup rows, tokens per time, lengths) of every candidate step: lookup drafts alone
    with each row's own length (`_best_lengths`), then the layer-skip plan per gamma with lookup drafts in the
    rows where they are expected to do better. Rows verify what they drafted."""
    rate, lengths = _best_lengths(has_lookup, glens, e_looks, t_verify)
    if lengths.any():
        yield int(lengths.max()), False, lengths > 0, rate, lengths
    if alpha_skip is None or t_draft_step is None:
        return
    for g in range(1, len(glens) + 1):
        glen, e_look = glens[g - 1], e_looks[g - 1]
        e_skip = expected_tokens(alpha_skip, g)
        rows = has_lookup & (e_look > e_skip)
        tokens = float(np.where(rows, e_look, e_skip).sum())
        drafted = float(np.where(rows, glen, g).sum())
        yield g, True, rows, float(tokens / (t_verify(drafted) + g * t_draft_step)), None


def _uniform_candidates(has_lookup, glens, e_looks, alpha_skip, t_verify, t_draft_step):
    """_candidates where every row verifies gamma tokens whatever it drafted (`uniform`), every gamma at once: all
    matched rows take their (free) lookup drafts, and a step pays for n x gamma tokens."""
    n, G = len(has_lookup), len(glens)
    gs = np.arange(1, G + 1)
    t = np.asarray(t_verify(n * gs), dtype=np.float64)  # [G]
    drafts = has_lookup[None, :] & (glens > 0)  # [G, n]
    rates = (n + np.where(drafts, e_looks - 1.0, 0.0).sum(1)) / t  # [G]
    if alpha_skip is not None and t_draft_step is not None:
        e_skip = expected_tokens(np.float64(alpha_skip), gs.astype(np.float64))[:, None]  # [G, 1]
        skip_rows = has_lookup[None, :] & (e_looks > e_skip)  # [G, n]
        skip_rates = np.where(skip_rows, e_looks, e_skip).sum(1) / (t + gs * t_draft_step)  # [G]
    for j, g in enumerate(gs.tolist()):
        if drafts[j].any():
            yield g, False, drafts[j], float(rates[j]), None
        if alpha_skip is not None and t_draft_step is not None:
            yield g, True, skip_rows[j], float(skip_rates[j]), None


class VerifyJump:
    """What a step that verifies x draft tokens costs beyond the latency model's line t_plain + slope * x, as a
    share of t_plain: measured, not modelled. On a CPU the first verified token switches attention from its
    decode path to its multi-token path (SmolLM2 at 8K x 1: 44 ms plain, 55 ms with one draft token, where the
    model's line said 49 ms), and where a batch is compute-bound each verified token costs more than the line's
    slope. The residual share (measured - predicted) / t_plain of drafting steps is fitted as a + b x by decayed
    least squares (ridge on b, so steps that all verify the same x give a level, not a slope); that of plain
    steps is averaged as a base the model already misses by; `extra(x)` is the difference, 0 for x = 0. It is
    negative where drafting steps cost less than the line: the line's slope per token is the latency model's,
    which lookup steps do not refit (TimingFeed.observe_verify), and on a 2-core Xeon it priced SmolLM2's
    drafting steps at batch 4 at 66 ms where they took 49 ms (plain steps 33 ms, priced right); drafts that paid
    were left out. Callers keep a drafting step at or above a plain step (`choose_with_models`). A gap over
    `cap` x the prediction is not a step's cost (a prefill ran, the engine idled): left out.

    The first step of each shape (batch size, tokens verified) is left out too where it measured far above the
    line (`first_of_shape`, `lookup_drafts.observe_cost`): it held one-off costs, a kernel's first launch at
    those sizes or a graph's first replay, that no later step pays.
    Only drafting steps move the fit, so a single step measured far above the rest can price drafts out for
    good: on an H100 (real Qwen2.5-Coder-1.5B, a fresh engine, 1K x 4 code) one drafting step measured 12.2 ms
    against 2.85 ms plain steps, and KnapSpec drafted in no other step of that cell or the next (1K x 1 code:
    0.96x of plain where `ngram` made 1.59x). Whether that step was its shape's first or held the engine's idle
    time between two batches (KnapSpecDrafter._request_set) the run does not say; neither counts now.

    >>> j = VerifyJump(decay=1.0)
    >>> j.observe(0, 0.044, 0.044); j.observe(1, 0.055, 0.044, 0.049)
    >>> round(j.extra(1), 3)  # (0.055 - 0.049) / 0.044, one drafting step: a level
    0.136
    >>> j.observe(9, 0.094, 0.044, 0.066)  # 9 tokens: 0.028 s over the line
    >>> round(j.extra(1), 2), round(j.extra(9), 2)  # the residual grows with x
    (0.15, 0.62)
    >>> k = VerifyJump(decay=1.0)
    >>> k.observe(0, 0.033, 0.033); k.observe(10, 0.049, 0.033, 0.066)  # 17 ms under the line
    >>> round(k.extra(10), 2)
    -0.52
    >>> k.first_of_shape(4, 10), k.first_of_shape(4, 10), k.first_of_shape(4, 12)
    (True, False, True)
    """

    def __init__(self, decay: float = 0.9, cap: float = 3.0):
        self.decay, self.cap = decay, cap
        self.plain = [0.0, 0.0]  # decayed [sum of residual shares, count] of plain steps
        self.fit = np.zeros(5)  # decayed sums over drafting steps: [1, x, x^2, r, x r]
        self.shapes: set = set()  # (batch, tokens verified) of the steps seen

    def first_of_shape(self, n: int, drafted: int) -> bool:
        """Whether this is the first step of n rows verifying `drafted` tokens (and remember it)."""
        key = (n, drafted)
        if key in self.shapes:
            return False
        self.shapes.add(key)
        return True

    def observe(self, drafted: int, measured: float, predicted_plain: float, predicted: float | None = None) -> None:
        """One step: `drafted` tokens verified, `measured` seconds; the model's plain step and its prediction
        for this step (default: the plain step)."""
        pred = predicted_plain if predicted is None else predicted
        if not 0.0 < measured < self.cap * pred:  # the gap held something else (a prefill, an idle engine)
            return
        r = (measured - pred) / max(predicted_plain, 1e-9)
        if drafted <= 0:
            self.plain = [self.plain[0] * self.decay + r, self.plain[1] * self.decay + 1.0]
            return
        x = float(drafted)
        self.fit = self.fit * self.decay + np.array([1.0, x, x * x, r, x * r])

    def extra(self, x):
        """The share of t_plain a step verifying x tokens costs beyond the line: a float for a number x, elementwise
        for an array (a choice prices every length it weighs at once)."""
        s1, sx, sxx, sr, sxr = self.fit
        if s1 <= 0:
            return 0.0 if np.ndim(x) == 0 else np.zeros(np.shape(x))
        ridge = s1  # pulls b to 0 unless x varies by more than ~1 token
        det = s1 * (sxx + ridge) - sx * sx
        b = (s1 * sxr - sx * sr) / det
        a = (sr - b * sx) / s1
        base = self.plain[0] / self.plain[1] if self.plain[1] else 0.0
        if np.ndim(x) == 0:
            return float(a + b * x - base) if x > 0 else 0.0
        x = np.asarray(x, dtype=np.float64)
        return np.where(x > 0, a + b * x - base, 0.0)


class LookupAcceptance:
    """Acceptance of lookup drafts per request as two rates (`lookup_tokens`): `first`, the chance that a draft's
    first token is right, and `next`, that a token after a right one is right too. A verified draft of g tokens
    with a accepted is one trial of `first` (a success if a >= 1) and, when a >= 1, min(a, g - 1) trials of
    `next` with a - 1 successes. Each rate is (successes + prior w) / (trials + w). A request whose output copies
    its prompt earns a high `first` within a few steps and keeps a high `next`; one that writes new text falls
    towards 0 and stops getting lookup drafts.

    Priors are pooled (empirical Bayes), forgetting old observations by `decay` per draft: the rates over all
    requests of a `group` (`prior` before any draft was verified) are the prior of the rates per matched n-gram
    length (a draft that follows a 5-token match is more often right than one after a 2-token match), and those
    are the prior of a request's draft after a match of that length. On a server whose requests rarely copy, a
    new request starts low instead of paying for a few rejected drafts first; where they copy, it starts high.
    Groups keep greedy and sampled requests apart: a sampled request keeps a copied token only as often as the
    target samples it, so a server's greedy requests say little about its sampled ones.

    How much a request's own trials weigh against its prior is learned too (`request_weight`): a request's rates
    are pulled towards the group's with the weight of a Beta prior whose spread is that of the rates of the
    group's finished requests (method of moments, binomial noise taken out; `weight` at most, and until
    `MIN_SPREAD_REQUESTS` have finished). Requests either copy or write new text, so their rates are spread
    apart and the weight is small: a request that does not copy stops after one or two rejected drafts instead
    of paying for a run of them (SmolLM2 at 8K x 1 on CPU: a rejected draft costs ~50 % of a step), and one
    that copies is believed after one or two right ones. The cost: under sampling, one chance hit of a request
    that does not copy lifts its first-token rate to ~0.7 (a Beta fitted to rates near 0 and 1 is U-shaped), and
    the drafts after it are rejected (docs/benchmarks.md, 2K x 1 sampled).

    >>> acc = LookupAcceptance(prior=0.5, weight=4.0, decay=1.0)
    >>> acc.observe("r", 5, 5, ngram=3); acc.observe("r", 5, 0, ngram=2)
    >>> acc.pooled()  # first: (1 + 2) / (2 + 4); next: (4 + 2) / (4 + 4)
    (0.5, 0.75)
    >>> [round(x, 3) for x in acc.pooled(3)]  # first: (1 + 0.5 * 4) / (1 + 4); next: (4 + 0.75 * 4) / (4 + 4)
    [0.6, 0.875]
    >>> [round(x, 3) for x in acc.alpha("r", 3)]  # first: (1 + 0.6 * 4) / (2 + 4); next: (4 + .875 * 4) / (4 + 4)
    [0.567, 0.938]
    """

    MIN_SPREAD_REQUESTS = 4  # finished requests (per group) before their spread sets the request weight

    def __init__(self, prior: float = 0.5, weight: float = 4.0, decay: float = 0.99):
        self.prior, self.weight, self.decay = prior, weight, decay
        # [first right, first trials, next right, next trials]
        self.counts: dict[str, list[float]] = {}  # per request
        self.group_of: dict[str, object] = {}  # request -> its group
        self.pool: dict = {}  # group -> counts over all its requests, decayed
        self.by_ngram: dict = {}  # (group, matched n-gram length) -> counts, decayed
        # group -> [2, 4] decayed sums over finished requests, per rate (first, next): [requests, sum of rates,
        # sum of squared rates, sum of binomial noise variances]
        self.spread: dict = {}
        self._weights: dict = {}  # group -> request_weight(group), until the next request finishes

    def _rates(self, c, prior, w=None) -> tuple[float, float]:
        w1, w2 = (self.weight, self.weight) if w is None else w
        return (c[0] + prior[0] * w1) / (c[1] + w1), (c[2] + prior[1] * w2) / (c[3] + w2)

    def request_weight(self, group=None) -> tuple[float, float]:
        """Prior weight (pseudo-trials) of a request's (first, next) rates: the concentration m (1 - m) / v - 1 of
        the Beta whose mean m and variance v are those of the group's finished requests' rates, less their
        binomial noise; in [0.5, weight], and `weight` until MIN_SPREAD_REQUESTS have finished.

        >>> acc = LookupAcceptance(decay=1.0)
        >>> for i in range(4):  # half the requests copy, half do not
        ...     acc.observe_first(f"c{i}", True); acc.observe_first(f"c{i}", True)
        ...     acc.observe_first(f"p{i}", False); acc.observe_first(f"p{i}", False)
        >>> acc.forget(set())
        >>> acc.request_weight()  # rates 1 and 0: as spread as rates can be
        (0.5, 4.0)
        """
        if group in self._weights:  # read per row and step; changes only when a request finishes
            return self._weights[group]
        out = []
        for stats in self.spread.get(group, np.zeros((2, 4))):
            n, s1, s2, noise = stats
            if n < self.MIN_SPREAD_REQUESTS:
                out.append(self.weight)
                continue
            m = s1 / n
            var = max(s2 / n - m * m - noise / n, 1e-6)
            out.append(float(min(self.weight, max(0.5, m * (1.0 - m) / var - 1.0))))
        self._weights[group] = out[0], out[1]
        return self._weights[group]

    def pooled(self, ngram: int | None = None, group=None) -> tuple[float, float]:
        rates = self._rates(self.pool.get(group, (0.0,) * 4), (self.prior, self.prior))
        c = self.by_ngram.get((group, ngram)) if ngram is not None else None
        return rates if c is None else self._rates(c, rates)

    def alpha(self, req_id: str, ngram: int | None = None, group=None) -> tuple[float, float]:
        c = self.counts.get(req_id, (0.0,) * 4)
        return self._rates(c, self.pooled(ngram, group), self.request_weight(group))

    def observe(self, req_id: str, proposed: int, accepted: int, ngram: int | None = None, group=None) -> None:
        if proposed <= 0:
            return
        obs = (float(accepted >= 1), 1.0, float(max(accepted - 1, 0)), float(min(accepted, proposed - 1)))
        self._add(req_id, obs, ngram, group)

    def observe_first(self, req_id: str, hit: bool, ngram: int | None = None, group=None) -> None:
        """A trial of `first` that no verification paid for: a request had a match, drafted nothing, and the
        token the target then produced was (`hit`) or was not the match's first token. Under sampling that
        happens with probability p(token), the chance that the rejection sampler accepts it as a draft, so it
        is the same trial as a verified one. Requests that write new text learn to draft nothing without
        paying for rejected drafts first, and requests that copy learn it before their first draft.

        >>> acc = LookupAcceptance(prior=0.5, weight=4.0, decay=1.0)
        >>> acc.observe_first("r", False); acc.observe_first("r", False)
        >>> [round(x, 3) for x in acc.alpha("r")]  # first: (0 + .333 * 4) / (2 + 4), the pool's (0 + .5 * 4) / (2 + 4)
        [0.222, 0.5]
        """
        self._add(req_id, (float(hit), 1.0, 0.0, 0.0), ngram, group)

    def _add(self, req_id: str, obs: tuple, ngram: int | None, group) -> None:
        c = self.counts.setdefault(req_id, [0.0] * 4)
        self.group_of[req_id] = group
        for i, x in enumerate(obs):
            c[i] += x
        pools = [self.pool.setdefault(group, [0.0] * 4)]
        if ngram is not None:
            pools.append(self.by_ngram.setdefault((group, ngram), [0.0] * 4))
        for p in pools:
            for i, x in enumerate(obs):
                p[i] = p[i] * self.decay + x

    def forget(self, live: set) -> None:
        for r in [r for r in self.counts if r not in live]:
            self._finished(self.counts.pop(r), self.group_of.pop(r, None))

    def _finished(self, c, group) -> None:
        """A finished request's rates into its group's spread (a rate with fewer than 2 trials says too little)."""
        stats = self.spread.setdefault(group, np.zeros((2, 4)))
        self._weights.pop(group, None)
        for k, (right, trials) in enumerate(((c[0], c[1]), (c[2], c[3]))):
            stats[k] *= self.decay
            if trials >= 2:
                p = right / trials
                stats[k] += (1.0, p, p * p, p * (1.0 - p) / (trials - 1.0))


class LookupGuard:
    """Lookup drafting measured, as the layer-skip plan's guard measures a plan: the tokens per second of the steps
    that verified lookup drafts against plain decoding's over the same steps. The choice prices a lookup draft
    with models (acceptance per request, VerifyJump for its cost) that learn from the steps it drafts in; the
    guard is what holds when they are wrong. A window of `steps` such steps at or below `bar` x plain, by more
    than the window's own noise (one standard error of its steps' ratios to plain), turns lookup drafts off for
    `backoff` engine steps, doubling up to `max_backoff` each time the retry after it loses too; a window that
    pays sets the backoff back. While off, the acceptance models go on learning from shadow trials, and
    VerifyJump keeps its price: the retry is the choice's again, not forced. The noise term is there because one
    step keeps 0 to k_max tokens per row: on a 2-core Xeon, SmolLM2's windows of 16 lookup steps at batch 4
    (mixed workload, greedy) had standard errors of 0.09-0.40 around ratios of 1.2-3.6, so a single window
    a little under the bar says little; 64 steps without lookup drafts cost every copying row its copies.

    >>> g = LookupGuard(steps=2, backoff=4)
    >>> [g.observe(tokens=16, seconds=0.006, plain_tokens=16, plain_s=0.003, bar=1.0) for _ in range(2)]
    [False, True]
    >>> g.allowed, g.stops, g.realised  # 0.5x plain over 2 steps
    (False, 1, 0.5)
    >>> h = LookupGuard(steps=2)  # 0.93x over 2 steps, but one step at 1.6x and one at 0.6x: noise
    >>> [h.observe(8, 0.005, 4, 0.004, 1.0), h.observe(6, 0.010, 4, 0.004, 1.0)], round(h.realised, 2)
    ([False, False], 0.93)
    >>> g.tick(4); g.allowed
    True
    >>> _ = [g.observe(20, 0.003, 16, 0.003, 1.0) for _ in range(2)]  # 1.25x: pays, the backoff is 4 again
    >>> g.allowed, g.backoff
    (True, 4)
    """

    OUTLIER_X = 4.0  # a step counts as at most this many plain steps (one-off costs: JIT, a graph capture)

    def __init__(self, steps: int = 16, backoff: int = 64, max_backoff: int = 4096):
        self.steps, self.base, self.max_backoff = steps, backoff, max_backoff
        self.backoff = backoff
        self.off = 0  # engine steps left with lookup drafts off
        self.stops = 0
        self.realised = float("nan")  # the last window's tokens per time over plain decoding's
        # tokens, seconds, plain tokens, plain seconds, steps, sum and sum of squares of the steps' ratios to plain
        self._window = [0.0] * 7

    @property
    def allowed(self) -> bool:
        return self.off <= 0

    def tick(self, steps: int = 1) -> None:
        """`steps` engine steps went by."""
        self.off = max(0, self.off - steps)

    def observe(self, tokens: float, seconds: float, plain_tokens: float, plain_s: float, bar: float) -> bool:
        """A steady step that verified lookup drafts: `tokens` emitted (bonus tokens included) in `seconds`, where
        plain decoding emits `plain_tokens` in `plain_s`. `bar` <= 0 turns the guard off (min_speedup 0: always
        draft). Returns True when this step turned lookup drafts off."""
        if bar <= 0 or seconds <= 0 or plain_s <= 0:
            return False
        w, seconds = self._window, min(seconds, self.OUTLIER_X * plain_s)
        ratio = (tokens / seconds) / (plain_tokens / plain_s)
        for i, x in enumerate((tokens, seconds, plain_tokens, plain_s, 1, ratio, ratio * ratio)):
            w[i] += x
        if w[4] < self.steps:
            return False
        k, self.realised = w[4], (w[0] / w[1]) / (w[2] / w[3])
        se = np.sqrt(max(w[6] - w[5] * w[5] / k, 0.0) / (k - 1) / k) if k > 1 else 0.0
        self._window = [0.0] * 7
        if self.realised + se > min(1.0, bar):
            self.backoff = self.base
            return False
        self.off, self.stops = self.backoff, self.stops + 1
        self.backoff = min(2 * self.backoff, self.max_backoff)
        return True
