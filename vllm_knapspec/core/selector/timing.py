"""The timing feed: step and draft timings from the engine into the decode-time account and the two latency
models (draft steps refit `latency`, verify and plain steps refit `target`), and the plain step time the choice
compares against."""

from __future__ import annotations

import numpy as np

from vllm_knapspec.core.skipset import SkipSet

PLAIN_WINDOW = 32  # recent plain steps that calibrate t_plain
PLAIN_MIN = 8  # ... at least this many before t_plain is scaled by them (and before a priced selection)
METRIC_EVERY = 32  # latency-model gauges are refreshed every this many refit steps
PLAIN_BATCH = 32  # plain steps of one batch size averaged into one observation of the target model
FULL_WINDOW, FULL_MIN = 16, 4  # full steps without a layer-skip draft, whose extra cost prices a drafting step


def plain_step(ctx, seconds: float) -> tuple:
    """A steady plain step as KnapSpecSelector._plain_steps keeps it: (Σ ctx, requests, seconds), so repricing the
    window is one call (`_t_plain`)."""
    return float(np.sum(ctx)), len(ctx), seconds


class _PlainSteps:
    """Plain steps of one batch size not yet fed to the target model (see KnapSpecSelector._refit_target)."""

    __slots__ = ("batch", "steps", "ctx_sum", "seconds")

    def __init__(self):
        self.batch, self.steps, self.ctx_sum, self.seconds = 0, 0, 0.0, 0.0


class TimingFeed:
    """KnapSpecSelector's timing feed (mixin)."""

    def observe_verify(self, ctx, proposed, accepted, seconds, steady=True, verified=None):
        """One engine step finished: `proposed` drafts of the plan were verified, `accepted` of them accepted;
        `seconds` is the wall time between drafts (verification + engine overhead), None when unknown.
        `verified`: every draft token the step verified (prompt-lookup drafts too; default `proposed`). A step
        that verified only lookup drafts is neither a plain step nor a refit of the target model: what it cost
        beyond the model's line is VerifyJump's to measure (lookup.VerifyJump). Refit with such steps, the line
        itself rose with their extra cost, and with it the plain step that every plan, the guard and VerifyJump
        are priced against (real Qwen2.5-Coder-1.5B at batch 16 on an H200: predicted 3.4-3.8x, measured
        0.43-0.79x; docs/real-model.md)."""
        verified = proposed if verified is None else verified
        self.proposed += proposed
        self.accepted += accepted
        if self.proposed:
            self.stats.set("realised_acceptance", self.accepted / self.proposed)
        if seconds is None:
            return
        if not steady:  # the gap may hold an idle server: count it as at most two steps like the last steady one
            self._decode_time(min(seconds, 2.0 * self._last_steady_s))
            return
        self._last_steady_s = seconds
        self._decode_time(seconds)
        if len(ctx):
            full_plain = not verified and self.current is None and self._quiet_priced
            if self._quiet_priced and self.current is None and not proposed:  # a full step, no layer-skip draft
                t_plain, slope = self.verify_line(ctx)
                self._full_extra.append(seconds - t_plain - verified * slope / len(ctx))
            if (verified == proposed or self.current is not None) and not full_plain:
                self._account(ctx, proposed, accepted, seconds)
            if self.cfg.online_refit and (proposed or not verified) and not full_plain:
                self._refit_target(ctx, verified, seconds)

    def observe_quiet(self, steps: int, seconds: float, ctx=None) -> None:
        """Plain steps the engine did not report one by one (while plain decoding is planned it reports one
        step in a few): they count in the re-selection interval and in decode time (the selection budget).
        With `ctx` (the batch's context lengths, the same batch throughout) they are also what plain decoding
        costs here, and from then on the only plain steps that price it: their mean time holds the full
        steps' host work spread over the stride, as plain decoding with KnapSpec pays it. A full step that
        plans plain decoding costs more (real Qwen2.5-Coder-1.5B at 1K x 16 on an H100: 3.1-4.4 ms against
        2.4-3.3 ms per quiet step; docs/real-model.md), and priced from those, plain decoding looked slow and
        lookup drafts that lost to it were kept."""
        self.steps += steps
        self._decode_time(seconds)
        if ctx is None or steps <= 0 or seconds <= 0 or not len(ctx):
            return
        self._quiet_priced = True
        # each quiet step is one plain step at the window's mean time
        self._plain_steps.extend([plain_step(ctx, seconds / steps)] * min(steps, PLAIN_WINDOW))
        if self.cfg.online_refit:
            if self._plain_obs.batch != len(ctx):
                self._flush_plain()
            self._pend_plain(len(ctx), steps, float(sum(ctx.tolist())) * steps, seconds)

    def _decode_time(self, seconds: float) -> None:
        self.since_selection_s += seconds
        self.total_decode_s += seconds
        self.stats.inc("verify_seconds", seconds)

    def observe_draft(self, skip: SkipSet, ctx, drafts, seconds, steps=1):
        if self.current is not None:  # charged to the plan with the next verify step
            self._spec["pending_draft_s"] += seconds
        self.since_selection_s += seconds
        self.total_decode_s += seconds
        self.stats.inc("draft_seconds", seconds)
        if self.cfg.online_refit and steps and len(ctx):
            self.latency.observe_draft(skip.n_attn_kept, skip.n_mlp_kept, ctx, seconds, num_steps=steps)

    def _refit_target(self, ctx, proposed, seconds):
        """Feed the target model. A step with drafts is one observation; plain steps of one batch size are
        averaged PLAIN_BATCH at a time: they all measure the same shape, and one online update costs
        ~170 us of host time, several % of a 2.7 ms SmolLM2 step on an H100."""
        if proposed or self._plain_obs.batch != len(ctx):
            self._flush_plain()
        if proposed:
            self._target_observe(ctx, len(ctx) + proposed, seconds)
            return
        self._pend_plain(len(ctx), 1, float(sum(ctx.tolist())), seconds)  # no numpy reduction per step

    def _pend_plain(self, batch: int, steps: int, ctx_sum: float, seconds: float) -> None:
        b = self._plain_obs
        b.batch, b.steps = batch, b.steps + steps
        b.ctx_sum, b.seconds = b.ctx_sum + ctx_sum, b.seconds + seconds
        if b.steps >= PLAIN_BATCH:
            self._flush_plain()

    def _flush_plain(self):
        b = self._plain_obs
        if b.steps:  # the mean step of the pending ones
            self._target_observe(b.ctx_sum / b.steps, b.batch, b.seconds / b.steps, num_reqs=b.batch)
            self._plain_obs = _PlainSteps()

    def _target_observe(self, ctx, tokens, seconds, **kw):
        self.target.observe_verify(ctx, tokens, seconds, **kw)
        self._metric_steps += 1
        if self._metric_steps % METRIC_EVERY == 1:  # medians over windows: not every step (host time)
            self._latency_metrics()

    def plain_measured(self) -> bool:
        """Plain decoding has been measured enough to price a plan against: PLAIN_MIN plain steps, and once
        quiet steps price it, FULL_MIN full steps for `full_step_extra_s`. Until then a selection would price
        with the latency model's prior alone: on an H100 the first selection (real Qwen2.5-Coder-1.5B, 1K x 1)
        priced plain decoding at 3.41 ms where quiet steps then measured 2.44 ms, and its plan, predicted at
        1.15x, was stopped by the guard at 0.58x."""
        if len(self._plain_steps) < PLAIN_MIN:
            return False
        return not self._quiet_priced or len(self._full_extra) >= FULL_MIN

    def full_step_extra_s(self) -> float:
        """What a full step costs beyond the model's line for the tokens it verified: the median over the
        recent full steps without a layer-skip draft (plain ones and lookup-only ones), once quiet steps price
        plain decoding (0 before). Every drafting step is a full step: the drafter's host work runs in it
        (plan, feedback, lookup search, draft-loop launch), and where that outlasts the device step the engine
        waits for it. Real Qwen2.5-Coder-1.5B on an H100 at 1K x 1: quiet steps 2.4 ms, full plain steps 3.0
        ms, lookup steps verifying 5 tokens 4.7 ms; layer-skip plans priced without it were predicted at
        1.07-1.15x and measured 0.42-0.67x (docs/real-model.md)."""
        if len(self._full_extra) < FULL_MIN:
            return 0.0
        return max(0.0, float(np.median(self._full_extra)))

    def verify_line(self, ctx) -> tuple[float, float]:
        """The plain step at ctx (`_t_plain`) and what one more verified token per request adds to it: the
        target model's line, scaled like t_plain. verify(gamma) is linear in gamma (T = B(1+gamma)).
        One step asks it for its context two or three times (the lookup cost, the choice, the full-step cost):
        the answer is kept while the context, the newest plain step and the target model's coefficients are
        the same."""
        last, coef = self._plain_steps[-1] if self._plain_steps else None, self.target.coefficient_bytes()
        memo = self._line_memo
        if memo is not None and memo[0] is ctx and memo[1] is last and memo[2] == coef:
            return memo[3]
        t_model = self.target.plain_step_time(ctx)
        t_plain = self._t_plain(ctx)  # may rescale: the slope below takes the new scale
        line = t_plain, max(self.target.verify_step_time(ctx, 2) - t_model, 0.0) * self._plain_scale
        self._line_memo = (ctx, last, coef, line)
        return line

    def _t_plain(self, ctx) -> float:
        """The target model's plain step time, scaled down by the median measured/predicted ratio of the last
        plain steps (the model refits online but may not have converged from its prior at the first selection;
        on an H100 the graphed-draft prior priced the compiled target step 1.8x too high). Only down: plain
        steps measured slower than predicted (a busy host) would slow the drafts too, which no draft timing
        has shown yet, so scaling up would favour speculation on a guess."""
        last = self._plain_steps[-1] if len(self._plain_steps) >= PLAIN_MIN else None
        if last is not None and last is not self._plain_scaled_at:  # once per new plain step
            sums, reqs, seconds = np.array(self._plain_steps, dtype=np.float64).T  # [PLAIN_WINDOW] each
            ratios = seconds / np.maximum(self.target.plain_step_times(sums, reqs), 1e-12)
            self._plain_scale, self._plain_scaled_at = min(1.0, float(np.median(ratios))), last
        return self.target.plain_step_time(ctx) * self._plain_scale
