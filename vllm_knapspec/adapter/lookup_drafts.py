"""Prompt-lookup drafts for the drafter: vLLM's n-gram matcher over each request's tokens, the choice between
them, the layer-skip plan and plain decoding (lookup.choose_step), and what verification kept of them.

Host side, so only under sync scheduling, where the runner's token ids are current when the drafter runs (vLLM's
own `ngram` method has the same limit); `lookup: auto` is off under async scheduling.

Draft lengths per row: in a step without the layer-skip draft, each row's drafts are cut to its lookup draft
(none where it has no match or no lookup draft was chosen) when the runner hands them to the scheduler
(`take_draft_token_ids`: the lookup_draft_lengths patch), as vLLM's `ngram` method does: a row without a draft
verifies nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_knapspec.core.lookup import LookupAcceptance, LookupGuard, StepChoice, VerifyJump, choose_step


def _llvmlite_dunders_are_attribute_errors() -> None:
    """Once numba has compiled, llvmlite's `ffi.lib` (a `_lib_wrapper` with __slots__ and a catch-all
    __getattr__) answers `vars(lib)` with a function wrapper. vLLM's Triton-kernel dispatcher scans every
    module's globals with `vars(value).get("kernel")` when an engine starts, so a second engine in the same
    process (tests, notebooks) would fail with "'_lib_fn_wrapper' object has no attribute 'get'". Dunder names
    raise AttributeError, as for any object; llvmlite's own lookups are never dunders."""
    try:
        from llvmlite.binding import ffi
    except ImportError:
        return
    cls = ffi._lib_wrapper
    if getattr(cls.__getattr__, "_knapspec", False):
        return
    orig = cls.__getattr__

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return orig(self, name)

    __getattr__._knapspec = True
    cls.__getattr__ = __getattr__


class LookupDrafts:
    def __init__(self, cfg, runner, k_max: int, max_model_len: int):
        from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens

        self.match = _find_longest_matched_ngram_and_propose_tokens
        self.runner, self.k_max, self.max_model_len = runner, k_max, max_model_len
        self.lmin, self.lmax = cfg.lookup_min, cfg.lookup_max
        self.acceptance = LookupAcceptance()
        self.jump = VerifyJump()
        self.guard = LookupGuard()
        self.pending: dict[str, tuple] = {}  # req_id -> (lookup drafts the next step verifies, n-gram length)
        self.pending_skip = False  # the next step verifies layer-skip drafts in the other rows
        self.match_len = np.zeros(0, dtype=np.int64)  # [n] tokens of each row's lookup draft (0: no match)
        self.ngram_len = np.zeros(0, dtype=np.int64)  # [n] length of the n-gram each row matched (0: none)
        self.lengths: list[int] | None = None  # drafts per row the scheduler gets from this step (None: all k)
        self.pos = np.zeros(0, dtype=np.int64)  # [n] bonus positions of the last propose()
        self.shadow: dict[str, tuple] = {}  # req_id -> (first lookup token, n-gram length, bonus position): no draft
        _llvmlite_dunders_are_attribute_errors()
        self.match(np.arange(8, dtype=np.int32) % 3, 1, 2, 64, 2)  # numba JIT now, not in the first step

    def pending_tokens(self) -> int:
        return sum(t for t, _ in self.pending.values())

    @staticmethod
    def wanted(cfg, vllm_config) -> bool:
        return cfg.lookup == "auto" and not vllm_config.scheduler_config.async_scheduling

    def cut(self, out):
        """The runner's DraftTokenIds (what the scheduler schedules next), each row cut to `self.lengths`, set by
        the last fill(); called by the lookup_draft_lengths patch (patches/drafting.py)."""
        lengths, self.lengths = self.lengths, None
        if out is not None and lengths is not None:
            ids = out.draft_token_ids
            out.draft_token_ids = [list(d[:m]) for d, m in zip(ids, lengths)] + list(ids[len(lengths) :])
        return out

    def propose(self, n: int, bonus: np.ndarray, pos: np.ndarray):
        """Lookup drafts [n, k_max] for rows 0..n-1 (bonus token at position pos) and which rows have one. vLLM's
        matcher takes the longest matching n-gram in [lookup_min, lookup_max]; asked one length at a time,
        longest first, it also says which length matched (`ngram_len`: the acceptance is learned per length)."""
        tokens = self.runner.input_batch.token_ids_cpu
        self.pos = np.asarray(pos[:n], dtype=np.int64)
        drafts = np.repeat(bonus.reshape(n, 1), self.k_max, axis=1).astype(np.int64)
        self.match_len = np.zeros(n, dtype=np.int64)
        self.ngram_len = np.zeros(n, dtype=np.int64)
        for i in range(n):
            hist = np.append(tokens[i, : pos[i]], bonus[i]).astype(np.int32)
            if not len(self.match(hist, self.lmin, self.lmax, self.max_model_len, self.k_max)):
                continue  # no length matches: one call, not one per length
            for g in range(self.lmax, self.lmin - 1, -1):
                d = self.match(hist, g, g, self.max_model_len, self.k_max)
                if len(d):
                    self.match_len[i], self.ngram_len[i] = len(d), g
                    drafts[i, : len(d)] = d
                    drafts[i, len(d) :] = d[-1]
                    break
        return self.match_len > 0, drafts

    def alphas(self, n: int) -> np.ndarray:
        ids = self.runner.input_batch.req_ids[:n]
        ng = self.ngram_len.tolist() if len(self.ngram_len) >= n else [0] * n
        return np.array([self.acceptance.alpha(r, g or None, self._group(r)) for r, g in zip(ids, ng)])

    def _group(self, req_id: str) -> str | None:
        """The request's acceptance group: greedy or sampled (V1 InputBatch.greedy_reqs)."""
        greedy = getattr(self.runner.input_batch, "greedy_reqs", None)
        return None if greedy is None else ("greedy" if req_id in greedy else "sampled")

    def choose(self, selector, plan, has, ctx, n: int) -> StepChoice:
        lookup_len = self.match_len[:n] if len(self.match_len) >= n else None
        alphas = lambda: self.alphas(n)  # noqa: E731  (read only where a row has a match)
        return choose_with_models(selector, plan, has, alphas, lookup_len, ctx, n, self.k_max, self.jump, self.guard)

    def observe_cost(self, selector, ctx, n: int, verified: int, accepted: int, seconds: float) -> bool:
        return observe_cost(self.jump, self.guard, selector, ctx, n, verified, accepted, seconds)

    def fill(
        self,
        out: torch.Tensor,
        drafts: np.ndarray,
        lookup_rows: np.ndarray,
        skip_steps: int,
        gamma: int | None = None,
        lengths: np.ndarray | None = None,
    ) -> int:
        """Lookup drafts into `out` [n, k] in `lookup_rows`, and what each row verifies next (`lengths`, cut by
        the lookup_draft_lengths patch): a lookup row its own lookup draft (its match, at most the step's chosen
        `gamma`, its own chosen length in `lengths` and k), any other row the layer-skip draft's `skip_steps` (0:
        none). The lookup rows' drafts are accounted at the next step. Returns the lookup draft tokens."""
        n = len(lookup_rows)
        k = out.shape[1] if gamma is None else min(out.shape[1], gamma)
        if k and lookup_rows.any():
            idx = np.flatnonzero(lookup_rows)
            out[torch.from_numpy(idx).to(out.device), :k] = torch.from_numpy(drafts[idx, :k]).to(out.device)
        match = np.minimum(self.match_len, k) if len(self.match_len) == n else np.full(n, k)
        if lengths is not None:
            match = np.minimum(match, lengths)
        lk = np.where(lookup_rows, match, 0)
        self.lengths = np.where(lookup_rows, lk, min(skip_steps, k)).tolist()
        ids = self.runner.input_batch.req_ids
        ng = self.ngram_len if len(self.ngram_len) == n else np.zeros(n, dtype=np.int64)
        self.pending = {ids[i]: (int(lk[i]), int(ng[i]) or None) for i in np.flatnonzero(lk)}
        self.pending_skip = bool(k and skip_steps)
        # rows with a match that verify nothing next (not even layer-skip drafts): shadow trials of their match
        quiet = np.zeros(n, dtype=bool)
        if len(self.match_len) == n and len(self.pos) == n and not self.pending_skip:
            quiet = (self.match_len > 0) & (lk == 0)
        self.shadow = {ids[i]: (int(drafts[i, 0]), int(ng[i]) or None, int(self.pos[i])) for i in np.flatnonzero(quiet)}
        return int(lk.sum())

    def observe_shadow(self, n: int, bonus: np.ndarray, pos: np.ndarray) -> None:
        """Rows that had a match and verified nothing last step: whether the token they emitted (this step's
        bonus, one position on) was the match's first token (`LookupAcceptance.observe_first`)."""
        shadow, self.shadow = self.shadow, {}
        if not shadow:
            return
        for i, r in enumerate(self.runner.input_batch.req_ids[:n]):
            s = shadow.get(r)
            if s is not None and int(pos[i]) == s[2] + 1:
                self.acceptance.observe_first(r, int(bonus[i]) == s[0], ngram=s[1], group=self._group(r))

    def observe(self, n: int, rejected: np.ndarray | None) -> tuple[np.ndarray, int]:
        """What the step verified of the last step's lookup drafts, per request. Returns the rows whose drafts
        were not the layer-skip draft's (lookup drafts, or fillers of a lookup-only step: the plan's acceptance
        leaves them out) and the lookup tokens accepted."""
        ids = self.runner.input_batch.req_ids[:n]
        mask = np.array([r in self.pending for r in ids], dtype=bool)
        not_skip = mask if self.pending_skip else np.ones(n, dtype=bool)
        kept = 0
        if rejected is not None:
            for i in np.flatnonzero(mask):
                g, ngram = self.pending[ids[i]]
                a = max(0, g - int(rejected[i]))
                self.acceptance.observe(ids[i], g, a, ngram=ngram, group=self._group(ids[i]))
                kept += a
        self.acceptance.forget(set(ids))
        return not_skip, kept


def choose_with_models(
    selector, plan, has, alphas, lookup_len, ctx, n: int, k_max: int, jump, guard=None, uniform=False
):
    """choose_step with the selector's latency models: verification of x draft tokens in all, the plan's draft
    step, plain decoding; the bar is min_speedup as for layer-skip plans. No row has a lookup draft while
    `guard` (LookupGuard) holds lookup drafts off. `alphas`: [n] or [n, 2] acceptance (`choose_step`), or the
    call that gives it. A step with neither a plan nor a match is a plain step, unpriced (reading every row's
    acceptance and pricing each length costs host time that a step of a small model on a CPU notices)."""
    if guard is not None and not guard.allowed:
        has = np.zeros_like(has)
    if plan is None and not has.any():
        return StepChoice(0, False, np.zeros(n, dtype=bool), 0.0, 0.0)
    alphas = alphas() if callable(alphas) else alphas
    if not hasattr(selector, "target"):  # a fixed plan (skip_set): lookup drafts wherever there is a match
        g = 0 if plan is None else min(plan[1], k_max)
        return StepChoice(g, plan is not None, has & (g > 0), 0.0, 0.0)
    c = float(np.mean(ctx))
    t_plain, slope = _line(selector, ctx, n)

    def t_verify(x):  # measured beyond (or below) the line by the jump; never less than a plain step
        t = np.maximum(t_plain, t_plain * (1.0 + jump.extra(x)) + x * slope)
        return float(t) if np.ndim(t) == 0 else t

    alpha_skip = t_draft = None
    if plan is not None:
        alpha_skip = selector.predicted_alpha if selector.predicted_alpha is not None else 0.0
        t_draft = float(selector.latency.draft_step_time(plan[0], np.array([c])))
    return choose_step(
        has,
        alphas,
        alpha_skip,
        t_plain,
        t_verify,
        t_draft,
        k_max,
        bar=selector.cfg.min_speedup,
        lookup_len=lookup_len,
        uniform=uniform,
    )


# A shape's first step measured over this many times the line's prediction held one-off costs (a kernel's first
# launch at those sizes, a graph's first replay): on an H100, 12.2 ms against a ~3 ms prediction. Leaving out every
# shape's first step instead left a 2-core Xeon at batch 16, where per-row lookup lengths make dozens of shapes,
# with few measured drafting steps.
ONE_OFF_X = 2.0


def observe_cost(jump, guard, selector, ctx, n: int, verified: int, accepted: int, seconds: float) -> bool:
    """A steady step that verified `verified` draft tokens (none of them layer-skip drafts), `accepted` of them,
    took `seconds`: what it cost beyond the model's line feeds `jump` (VerifyJump), which prices the next
    choices' verification, and a drafting step's tokens per time feed `guard` (LookupGuard). Returns True when
    the guard turned lookup drafts off. The first step of a shape is neither's when it took over ONE_OFF_X times
    the line's prediction (`VerifyJump.first_of_shape`)."""
    if not hasattr(selector, "target") or not len(ctx):
        return False
    t_plain, slope = _line(selector, ctx, n)
    if jump.first_of_shape(n, verified) and seconds > ONE_OFF_X * (t_plain + verified * slope):
        return False
    jump.observe(verified, seconds, t_plain, t_plain + verified * slope)
    return bool(verified) and guard.observe(n + accepted, seconds, n, t_plain, float(selector.cfg.min_speedup))


def _line(selector, ctx, n: int) -> tuple[float, float]:
    """The latency model's plain step and its cost per verified draft token at ctx (batch n)."""
    t_plain, slope = selector.verify_line(ctx)
    return t_plain, slope / n
