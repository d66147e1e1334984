"""When to select, and what selections may cost: the re-selection schedule (interval, context and acceptance
triggers, the backoff while plain decoding is chosen) under the selection-overhead budget, priced by a cost model
scaled by what the last selection measured."""

from __future__ import annotations

import numpy as np

from vllm_knapspec.core import dp

BACKOFF_MAX = 16  # re-selection interval while choosing plain decoding: up to this x reselect_interval
BUDGET_BACKOFF_MAX = 4  # ... and the overhead share down to max_selection_overhead / this


class Schedule:
    """KnapSpecSelector's re-selection schedule and selection budget (mixin)."""

    def _due(self, ctx: np.ndarray) -> bool:
        if self.selected_ctx is None:  # first selection: once plain decoding has paid for it ...
            if self.cfg.min_speedup <= 0:
                return True  # ... unless the config asks to always draft: at once
            if not self.plain_measured():
                return False  # ... and been measured: the plans are priced against it
            if not self.selection_s:
                self.selection_s = self._predicted_selection_s(ctx)  # calibrated at start-up on a GPU
            return self.since_selection_s * self._share() >= self.selection_s
        if self.since_selection_s * self._share() < self.selection_s:
            return False  # keep selection under its share of wall time
        return self._wanted(ctx) and self._affordable(ctx)  # cost estimate only when a selection is wanted

    def _wanted(self, ctx) -> bool:
        if self.steps >= self.interval:
            return True
        if ctx.mean() >= self.selected_ctx * (1 + self.cfg.context_change):
            return True
        if self.current is not None and self.proposed >= 8 * self.cfg.num_speculative_tokens:
            realised = self.accepted / self.proposed
            measured = self.measured_alpha if self.measured_alpha is not None else self.predicted_alpha  # not the bound
            return abs(realised - measured) > self.cfg.acceptance_change
        return False

    def _affordable(self, ctx) -> bool:
        """The next selection costs more than the last when the context or the batch grew (its reference pass
        attends over the context): predict it from the cost model, scaled by how far the last measured cost was
        from that model's estimate, so the overhead share holds while contexts grow (on an H100 a 1K -> 4K
        context step triples the DP cost, and pricing by the last cost lets the share reach 5-9 % per cell)."""
        return self.since_selection_s * self._share() >= self._predicted_selection_s(ctx)

    def _predicted_selection_s(self, ctx) -> float:
        """The next selection's cost at this context: the cost model, scaled by how far the last measured
        cost was from its estimate."""
        return self._estimated_selection_s(ctx) * self._cost_scale

    def _share(self) -> float:
        """The selection-overhead share allowed now: max_selection_overhead, divided by the interval's backoff
        (capped at BUDGET_BACKOFF_MAX) while selections keep choosing plain decoding."""
        backoff = min(BUDGET_BACKOFF_MAX, self.interval / self.cfg.reselect_interval)
        return self.cfg.max_selection_overhead / max(1.0, backoff)

    def _estimated_selection_s(self, ctx) -> float:
        """A DP pass runs each item once on up to K+1 branches of r tokens: about a full forward over
        (K+1)*r tokens (no lm_head: alpha's logits are a small share). Replaced by the measured cost after."""
        w_attn, w_mlp = dp.integer_weights(*self._sublayer_times(ctx), self.cfg.weight_cap)
        branches = int(self.cfg.budget_fraction * (w_attn + w_mlp) * self.L) + 1
        t_attn, t_mlp = self.latency.sublayer_times([int(np.mean(ctx))], branches * self.cfg.reference_tokens)
        return self.L * (t_attn + t_mlp)

    def _sublayer_times(self, ctx) -> tuple[float, float]:
        """Draft sublayer costs, floored so that neither weight degenerates (an online fit can drive a
        coefficient to 0; integer weights need both positive)."""
        t_attn, t_mlp = self.latency.sublayer_times(ctx)
        floor = 1e-3 * max(t_attn, t_mlp, 1e-9)
        return max(t_attn, floor), max(t_mlp, floor)

    def charge_capture(self, seconds: float) -> None:
        """A draft step that first captured the plan's CUDA graphs: the capture is a one-off cost of the
        selection (it counts in the selection-overhead share and delays the next selection), not a cost of
        the plan's steps - charged to them, one 0.7 s capture against 16 steps of 2.3 ms reads as 0.06x and
        makes the guard stop a plan predicted at 1.69x."""
        self.selection_s += seconds
        if self.history:
            self.history[-1]["capture_s"] = self.history[-1].get("capture_s", 0.0) + seconds
        self._count_selection_cost(seconds)

    def _count_selection_cost(self, seconds: float) -> None:
        self.total_selection_s += seconds
        self.stats.inc("selection_seconds", seconds)
        self.stats.set(
            "selection_overhead_ratio", self.total_selection_s / max(self.total_decode_s + self.total_selection_s, 1e-9)
        )

    def _reset_window(self, ctx):
        self._spec = self._new_spec()
        self.steps, self.selected_ctx = 0, float(ctx.mean())
        self.proposed = self.accepted = 0
        self.since_selection_s = 0.0
