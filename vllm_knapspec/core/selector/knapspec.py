"""KnapSpecSelector: the batch-aware KnapSpec selector (package docstring), made of its jobs (`choice`,
`schedule`, `guard`, `timing`, `telemetry`) and the per-step entry point `plan`."""

from __future__ import annotations

import copy
import time
from collections import deque

import numpy as np

from vllm_knapspec.core.latency import LatencyModel
from vllm_knapspec.core.selector.choice import Choice
from vllm_knapspec.core.selector.guard import Guard
from vllm_knapspec.core.selector.schedule import Schedule
from vllm_knapspec.core.selector.telemetry import LocalStats, Telemetry
from vllm_knapspec.core.selector.timing import FULL_WINDOW, PLAIN_WINDOW, TimingFeed, _PlainSteps
from vllm_knapspec.core.skipset import SkipSet


class KnapSpecSelector(Choice, Schedule, Guard, TimingFeed, Telemetry):
    """The plan of each engine step: `plan(rows, ctx)` returns (skip set, gamma) or None (plain decoding);
    `observe_draft` / `observe_verify` feed the step's timings back."""

    def __init__(self, cfg, adapter, latency: LatencyModel, num_layers: int, sync=None, stats=None):
        self.cfg, self.adapter, self.latency, self.L = cfg, adapter, latency, num_layers
        # The draft runs the target's sublayers eagerly one by one; the target step runs vLLM's compiled /
        # CUDA-graphed forward: same sublayers, very different cost (measured on an H100: 30 eager sublayers
        # ~10x a graphed verify step). So the draft and the target each get their own latency model, each
        # refit from its own live timings: `latency` prices draft steps, `target` prices verify/plain steps.
        self.target = copy.deepcopy(latency)
        # Tensor parallel: hidden states, logits and cosines are identical on every rank (all-reduce /
        # all-gather), timings are not. `sync` broadcasts rank 0's timing-dependent decisions (whether to
        # select, item weights, the final choice) so every rank runs the same DP and drafts with the same
        # skip set and gamma; identity with one rank.
        self.sync = sync or (lambda x: x)
        # Counters and gauges go to `stats` (the vLLM adapter passes its metrics writer); kept locally without.
        self.stats = stats if stats is not None else LocalStats()
        self.current: tuple[SkipSet, int] | None = None
        self.steps = 0  # engine steps since the last selection
        self.selected_ctx = None  # mean context at the last selection
        self.predicted_alpha = None  # the chosen set's acceptance as priced (Wilson lower bound)
        self.measured_alpha = None  # ... and as measured on the held-out tokens
        self.proposed = self.accepted = 0  # since the last selection
        self.selection_s = 0.0  # cost of the last selection
        self._cost_scale = 1.0  # last measured cost / its _estimated_selection_s
        self.since_selection_s = 0.0  # decode wall time since the last selection
        self.total_selection_s = self.total_decode_s = 0.0
        self.history: list[dict] = []  # one entry per selection (benchmarks, tests)
        self.guard_events: list[dict] = []  # one entry per guard stop
        self._metric_steps = 0
        self._plain_steps: deque = deque(maxlen=PLAIN_WINDOW)  # (Σ ctx, requests, seconds) of steady plain steps
        self._plain_scale = 1.0  # measured / predicted plain step time, set at each selection
        self._plain_scaled_at = None  # the newest plain step _plain_scale has seen
        self._line_memo = None  # verify_line's last answer: (ctx, newest plain step, coefficients, line)
        self._spec = self._new_spec()  # the current plan's measured record since its selection
        self._plain_obs = _PlainSteps()  # plain steps pending for the target model
        self._quiet_priced = False  # quiet steps price plain decoding (observe_quiet with ctx)
        self._full_extra: deque = deque(maxlen=FULL_WINDOW)  # full steps' seconds beyond the model's line
        self.interval = cfg.reselect_interval  # steps between selections (doubles while choosing plain)
        self._last_steady_s = 0.0  # the last steady step's time: caps what an unsteady gap counts
        self.pred_scale = 1.0  # measured / predicted speedup of the last plan that ran (<= 1)
        self._plan_pred = None  # predicted speedup of the current plan
        self._gauges_plain()  # until the first selection: plain decoding

    passes = True  # a due selection that cannot clear the bar is passed (Choice.best_case)

    def _hopeless(self, ctx) -> bool:
        return self.best_case(ctx) * self.pred_scale < self.cfg.min_speedup

    def plan(self, rows: np.ndarray, ctx: np.ndarray):
        self.steps += 1
        if self.current is not None and self.sync(self._guard()):
            self._stop_drafting(ctx)
        if self.sync(self._due(ctx)):
            if self.passes and self.cfg.min_speedup > 0 and self.sync(self._hopeless(ctx)):
                self.pass_selection(ctx)
                return None
            estimate = self._estimated_selection_s(ctx)
            t0 = time.perf_counter()
            try:
                self.select(rows, ctx)
            except Exception:
                # no retry every step: decode plainly until the next scheduled selection
                self.current = None
                self._reset_window(ctx)
                raise
            finally:
                self.selection_s = time.perf_counter() - t0
                self._cost_scale = self.selection_s / max(estimate, 1e-9)
            if self.history:
                self.history[-1]["cost_s"] = self.selection_s
            self.stats.inc("selections")
            self._count_selection_cost(self.selection_s)
        return self.current
