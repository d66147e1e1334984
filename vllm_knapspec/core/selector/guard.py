"""The guard: a running plan's measured tokens per time against plain decoding's; a plan at or below it after
GUARD_STEPS steps stops drafting until the next selection, and what plans measured discounts later predictions."""

from __future__ import annotations

import logging
from collections import deque

from vllm_knapspec.core.selector.timing import plain_step

logger = logging.getLogger("vllm.knapspec")

GUARD_STEPS = 16  # steps of a plan measured before the guard may stop it
OUTLIER_X = 4.0  # a plan step counts as at most this many typical steps in the guard
RECOVER = 1.05  # the plan-measured discount of predictions moves back toward 1 by this per selection


class Guard:
    """KnapSpecSelector's guard over the current plan (mixin)."""

    def _guard(self) -> bool:
        """True when the current plan has measurably decoded no faster than plain decoding would have
        (min_speedup < 1 lowers the bar; 0 turns the guard off, as it makes every plan draft)."""
        return self._spec["steps"] >= GUARD_STEPS and self._realised_speedup() <= min(1.0, self.cfg.min_speedup)

    def _realised_speedup(self) -> float:
        """(tokens / s of the plan since the selection) / (tokens / s plain decoding gives the same steps)."""
        sp = self._spec
        if sp["seconds"] <= 0 or sp["plain_s"] <= 0 or sp["plain_tokens"] <= 0:
            return float("nan")
        return (sp["tokens"] / sp["seconds"]) / (sp["plain_tokens"] / sp["plain_s"])

    def _stop_drafting(self, ctx):
        r, n = self._realised_speedup(), self._spec["steps"]
        self.guard_events.append(
            dict(
                ctx=float(ctx.mean()) if len(ctx) else 0.0,
                steps=n,
                realised_speedup=r,
                skip=str(self.current[0]),
                gamma=self.current[1],
                # what fell short: acceptance (predicted: the selection's alpha) or the step (predicted: pred_step_s)
                acceptance=self.accepted / self.proposed if self.proposed else None,
                predicted_alpha=self.predicted_alpha,
                step_s=sorted(self._spec["recent"])[len(self._spec["recent"]) // 2] if self._spec["recent"] else None,
                predicted_step_s=self._spec["pred_step_s"],
            )
        )
        logger.info(
            "KnapSpec guard: plan %s measured %.3fx of plain decoding over %d steps; drafting off until "
            "the next selection",
            self.current[0],
            r,
            n,
        )
        self._measure_plan()
        self.current = None
        self.stats.inc("guard_stops")
        self.stats.set("drafting_enabled", 0)
        self.stats.set("draft_length", 0)

    def _measure_plan(self) -> None:
        """The plan ran GUARD_STEPS steps or more: its measured share of the predicted speedup discounts later
        predictions (only down; 1 when it did as predicted or better)."""
        r = self._realised_speedup()
        if self._plan_pred and self._spec["steps"] >= GUARD_STEPS and r == r:
            self.pred_scale = min(1.0, r / self._plan_pred)
            self.stats.set("prediction_scale", self.pred_scale)
        self._plan_pred = None

    def _account(self, ctx, proposed, accepted, seconds):
        """Steady steps: plain ones calibrate t_plain; a plan's steps (drafted or not: a confidence stop
        still paid for its draft step) feed the guard."""
        if self.current is None:
            if not proposed:
                self._plain_steps.append(plain_step(ctx, seconds))
            return
        sp = self._spec
        step_s = seconds + sp["pending_draft_s"]
        sp["pending_draft_s"] = 0.0
        # One-off costs land on single steps (on an H100 vLLM's rejection-sampler kernel JIT-compiles on the
        # first speculative step of the process: one step of a 1.87x plan took ~0.2 s and the guard read
        # 0.15x). Such a step counts as at most OUTLIER_X times the plan's typical step: the median of its
        # recent steps, or the selection's prediction before there are any.
        recent = sp["recent"]
        typical = sorted(recent)[len(recent) // 2] if len(recent) >= 4 else sp["pred_step_s"]  # per step: no numpy
        if typical and step_s > OUTLIER_X * typical:
            step_s = OUTLIER_X * typical
            self.stats.inc("guard_capped_steps")
        recent.append(step_s)
        sp["tokens"] += accepted + len(ctx)
        sp["seconds"] += step_s
        sp["plain_tokens"] += len(ctx)
        sp["plain_s"] += self.target.plain_step_time(ctx) * self._plain_scale
        sp["steps"] += 1
        if sp["steps"] % GUARD_STEPS == 0:
            self.stats.set("realised_tpt_speedup", self._realised_speedup())

    @staticmethod
    def _new_spec() -> dict:
        return dict(
            tokens=0.0,
            seconds=0.0,
            plain_tokens=0.0,
            plain_s=0.0,
            steps=0,
            pending_draft_s=0.0,
            recent=deque(maxlen=32),
            pred_step_s=0.0,
        )
