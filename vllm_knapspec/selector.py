"""Which skip set S and draft length gamma to use at each engine step.

KnapSpecSelector (the paper's method, batch-aware):
  1. weights: integer latencies of Attn/MLP at the batch's current context (LatencyModel, refit online);
  2. knapsack DP over the 2L sublayers on reference hidden states of the real context -> candidate sets;
  3. alpha per candidate and request: top-1 agreement with the full model on the reference tokens;
  4. argmax over (candidate, gamma) of the batch's sum_r E[tokens_r] / (gamma t_draft(S) + t_verify(gamma));
  5. speculate only if that beats plain decoding (B / t_plain) by `min_speedup`; otherwise draft nothing
     until the next selection. t_plain is the target model's prediction scaled by what the last plain steps
     measured (the model may still be converging from its prior when the first selection runs);
  6. guard: while speculating, the measured tokens per second of the plan (accepted + bonus tokens over
     draft + verify time) is compared with plain decoding's; after GUARD_STEPS steps at or below it (times
     min(1, min_speedup)), drafting stops until the next selection (no DP needed). A plan that a wrong
     prediction or the confidence stop makes slower than plain decoding costs GUARD_STEPS steps, not the
     rest of the selection interval.
  7. a plan that ran (or was stopped by the guard) measured some share of its predicted speedup: later
     predictions are discounted by that share (min 1; it recovers by RECOVER per selection), so that a
     latency model that flatters the draft on this machine (an H100 profile on an H200: plans predicted at
     1.06-1.14x measured 0.5-0.69x) does not start one losing plan after another.
Re-selection: every `reselect_interval` steps, or earlier when the context grew by `context_change` or the
realised acceptance left the prediction by `acceptance_change`; never more often than keeps selection time
under `max_selection_overhead` of the decode wall time (decode time = steps and drafts; the gap before a step
that admitted new requests counts as at most two steady steps: it may hold an idle server). While selections
keep choosing plain decoding the interval doubles, up to BACKOFF_MAX x `reselect_interval` (the context-change
trigger stays), and the overhead share shrinks with it, down to 1/BUDGET_BACKOFF_MAX of `max_selection_overhead`:
a model on which no draft pays (SmolLM2 on an H200: 10 selections, all choosing plain, were 1.8 % of decode time
in one A/B) stops paying the full share for asking again.

No vLLM imports: the model side comes in through `adapter` (draft.ReferenceBuilder over LayerSkipModel).
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque

import numpy as np
import torch

from vllm_knapspec import dp, tpt
from vllm_knapspec.latency import LatencyModel
from vllm_knapspec.metrics import KnapSpecStats
from vllm_knapspec.skipset import SkipSet

logger = logging.getLogger("vllm.knapspec")

GUARD_STEPS = 16  # steps of a plan measured before the guard may stop it
OUTLIER_X = 4.0  # a plan step counts as at most this many typical steps in the guard
PLAIN_WINDOW = 32  # recent plain steps that calibrate t_plain
METRIC_EVERY = 32  # latency-model gauges are refreshed every this many refit steps
PLAIN_BATCH = 32  # plain steps of one batch size averaged into one observation of the target model
BACKOFF_MAX = 16  # re-selection interval while choosing plain decoding: up to this x reselect_interval
BUDGET_BACKOFF_MAX = 4  # ... and the overhead share down to max_selection_overhead / this
RECOVER = 1.05  # the plan-measured discount of predictions moves back toward 1 by this per selection


class _PlainSteps:
    """Plain steps of one batch size not yet fed to the target model (see KnapSpecSelector._refit_target)."""

    __slots__ = ("batch", "steps", "ctx_sum", "seconds")

    def __init__(self):
        self.batch, self.steps, self.ctx_sum, self.seconds = 0, 0, 0.0, 0.0


class _PhaseClock:
    """Wall time of the phases of one selection (device work included: synchronised on the phase's tensor)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str, tensor) -> None:
        if tensor is not None and tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 6)
        self._t = now


class FixedSelector:
    """A fixed skip set (config `skip_set`) drafting gamma tokens: debugging and the static baseline."""

    def __init__(self, skip: SkipSet, gamma: int):
        self.skip, self.gamma = skip, gamma

    def plan(self, rows, ctx):
        return self.skip, self.gamma

    def observe_verify(self, ctx, proposed, accepted, seconds, steady=True):
        pass

    def observe_draft(self, skip, ctx, drafts, seconds, steps=1):
        pass

    def charge_capture(self, seconds):
        pass


class KnapSpecSelector:
    def __init__(self, cfg, adapter, latency: LatencyModel, num_layers: int, sync=None):
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
        self.stats = KnapSpecStats.get()
        self.current: tuple[SkipSet, int] | None = None
        self.steps = 0  # engine steps since the last selection
        self.selected_ctx = None  # mean context at the last selection
        self.predicted_alpha = None
        self.proposed = self.accepted = 0  # since the last selection
        self.selection_s = 0.0  # cost of the last selection
        self._cost_scale = 1.0  # last measured cost / its _estimated_selection_s
        self.since_selection_s = 0.0  # decode wall time since the last selection
        self.total_selection_s = self.total_decode_s = 0.0
        self.history: list[dict] = []  # one entry per selection (benchmarks, tests)
        self.guard_events: list[dict] = []  # one entry per guard stop
        self._metric_steps = 0
        self._plain_steps: deque = deque(maxlen=PLAIN_WINDOW)  # (ctx, k, seconds): steady plain steps at ctx + k
        self._plain_scale = 1.0  # measured / predicted plain step time, set at each selection
        self._spec = self._new_spec()  # the current plan's measured record since its selection
        self._plain_obs = _PlainSteps()  # plain steps pending for the target model
        self.interval = cfg.reselect_interval  # steps between selections (doubles while choosing plain)
        self._last_steady_s = 0.0  # the last steady step's time: caps what an unsteady gap counts
        self.pred_scale = 1.0  # measured / predicted speedup of the last plan that ran (<= 1)
        self._plan_pred = None  # predicted speedup of the current plan
        for name in ("drafting_enabled", "skipped_attention", "skipped_mlp", "draft_length"):
            self.stats.set(name, 0)  # until the first selection: plain decoding

    # -- per step ------------------------------------------------------------------------------------
    def plan(self, rows: np.ndarray, ctx: np.ndarray):
        self.steps += 1
        if self.current is not None and self.sync(self._guard()):
            self._stop_drafting(ctx)
        if self.sync(self._due(ctx)):
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

    def _due(self, ctx: np.ndarray) -> bool:
        if self.selected_ctx is None:  # first selection: once plain decoding has paid for it ...
            if self.cfg.min_speedup <= 0:
                return True  # ... unless the config asks to always draft: at once
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
            return abs(realised - self.predicted_alpha) > self.cfg.acceptance_change
        return False

    def _affordable(self, ctx) -> bool:
        """The next selection costs more than the last when the context or the batch grew (its reference pass
        attends over the context): predict it from the cost model, scaled by how far the last measured cost was
        from that model's estimate, so the overhead share holds while contexts grow (on an H100 a 1K -> 4K
        context step tripled the DP cost and a last-cost rule let the share reach 5-9 % per cell)."""
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

    def observe_verify(self, ctx, proposed, accepted, seconds, steady=True):
        """One engine step finished: `proposed` drafts were verified, `accepted` of them accepted; `seconds` is
        the wall time between drafts (verification + engine overhead), None when unknown."""
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
            self._account(ctx, proposed, accepted, seconds)
            if self.cfg.online_refit:
                self._refit_target(ctx, proposed, seconds)

    def _decode_time(self, seconds: float) -> None:
        self.since_selection_s += seconds
        self.total_decode_s += seconds
        self.stats.inc("verify_seconds", seconds)

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

    def _account(self, ctx, proposed, accepted, seconds):
        """Steady steps: plain ones calibrate t_plain; a plan's steps (drafted or not: a confidence stop
        still paid for its draft step) feed the guard."""
        if self.current is None:
            if not proposed:
                self._plain_steps.append((ctx.copy(), 0, seconds))
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

    def charge_capture(self, seconds: float) -> None:
        """A draft step that first captured the plan's CUDA graphs: the capture is a one-off cost of the
        selection (it counts in the selection-overhead share and delays the next selection), not a cost of
        the plan's steps - charged to them, it once made the guard stop a plan predicted at 1.69x after 16
        steps (0.06x "measured": one 0.7 s capture against 16 steps of 2.3 ms)."""
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

    def observe_draft(self, skip: SkipSet, ctx, drafts, seconds, steps=1):
        if self.current is not None:  # charged to the plan with the next verify step
            self._spec["pending_draft_s"] += seconds
        self.since_selection_s += seconds
        self.total_decode_s += seconds
        self.stats.inc("draft_seconds", seconds)
        if self.cfg.online_refit and steps and len(ctx):
            self.latency.observe_draft(skip.n_attn_kept, skip.n_mlp_kept, ctx, seconds, num_steps=steps)

    def _latency_metrics(self):
        for kind, model in (("draft", self.latency), ("verify", self.target)):
            err = model.prediction_error()[kind]
            if err == err:
                self.stats.set("latency_model_error", err, kind)
        for name, v in self.latency.coefficients().items():
            if name.endswith("_s"):
                self.stats.set("latency_coefficient", v, name)

    # -- selection -----------------------------------------------------------------------------------
    def select(self, rows: np.ndarray, ctx: np.ndarray) -> None:
        cfg = self.cfg
        self._flush_plain()  # the target model sees every plain step before it prices
        if self.current is not None:
            self._measure_plan()
        self.pred_scale = min(1.0, self.pred_scale * RECOVER)
        w_attn, w_mlp, budget, r = self._dp_shape(ctx)
        clock = _PhaseClock()
        ref = self.adapter.build(rows, ctx, r)
        clock.lap("reference", ref.refs)
        cands, alpha = self._candidates(ref, w_attn, w_mlp, budget, len(ctx), clock)
        choice, t_plain, t_draft = self._choose(cands, alpha, ctx)
        clock.lap("choose", None)
        choice = choice._replace(
            **dict(zip(("index", "gamma", "speculate"), self.sync((choice.index, choice.gamma, choice.speculate))))
        )
        best = cands[choice.index]
        self.top = self._top(cands, alpha, t_draft, t_plain)
        self.current = (best.skipset, choice.gamma) if choice.speculate else None
        self._plan_pred = choice.tpt / choice.plain if choice.speculate else None
        self.interval = (
            cfg.reselect_interval if choice.speculate else min(2 * self.interval, BACKOFF_MAX * cfg.reselect_interval)
        )
        self.predicted_alpha = float(alpha[choice.index].mean())
        self._reset_window(ctx)
        if choice.speculate:  # what one step of the plan should cost: gamma drafts (verify slope folded in) + plain
            self._spec["pred_step_s"] = choice.gamma * float(t_draft[choice.index]) + t_plain
        self._record(best.skipset, choice, t_plain, w_attn, w_mlp, len(cands), ctx)
        self.history[-1]["phases_s"] = clock.laps

    def _dp_shape(self, ctx):
        """Integer weights (rank 0's under TP), knapsack budget and reference tokens of a selection at ctx."""
        cfg = self.cfg
        w_attn, w_mlp = self.sync(dp.integer_weights(*self._sublayer_times(ctx), cfg.weight_cap))
        budget = int(cfg.budget_fraction * (w_attn + w_mlp) * self.L)
        r = min(cfg.reference_tokens, self.adapter.max_reference_tokens(budget + 1))  # DP memory <= 1 % of KV
        return w_attn, w_mlp, budget, r

    def _candidates(self, ref, w_attn, w_mlp, budget, batch, clock):
        L = self.L
        cands = dp.knapsack_dp(
            ref.run_item,
            ref.refs,
            dp.item_weights(L, w_attn, w_mlp),
            budget,
            self.cfg.sim_threshold,
            dp.default_frozen_items(L),
            impl=self.cfg.kernels,
        )
        clock.lap("dp", ref.refs)
        alpha = self._alpha(cands, ref, batch)
        clock.lap("alpha", None)
        return cands, alpha

    def calibrate(self) -> float:
        """At start-up (GPU: the drafter_warmup patch): one selection-shaped pass - reference, DP, acceptance - on
        the adapter's synthetic reference (one request, context 2r), timed; the cost model's estimates are
        scaled by it until a real selection measures its own. The model prices compute only: on an H200
        SmolLM2's first selection cost 0.215 s (the DP launch-bound, 0.139 s) and, waiting only for the
        estimate, took 2.6 % of its benchmark cell's decode time under a 1 % share. Returns the cost (s)."""
        ctx = np.array([2 * self.cfg.reference_tokens])
        w_attn, w_mlp, budget, r = self._dp_shape(ctx)
        clock = _PhaseClock()
        ref = self.adapter.synthetic(r)
        clock.lap("reference", ref.refs)
        self._candidates(ref, w_attn, w_mlp, budget, 1, clock)
        cost = sum(clock.laps.values())
        self._cost_scale = cost / max(self._estimated_selection_s(np.array([2 * r])), 1e-9)
        return cost

    def _alpha(self, cands, ref, batch: int) -> torch.Tensor:
        """alpha[C, B]: per sampled request from its own reference tokens; unsampled requests get the mean."""
        H = dp.stack_hidden(cands)
        full = ref.refs[-1]
        per_req = torch.stack([dp.estimate_acceptance(H[:, g], full[g], ref.logits_fn) for g in ref.groups], 1)
        a = per_req.mean(1, keepdim=True).expand(-1, batch).clone()
        a[:, : per_req.shape[1]] = per_req
        return a.float().cpu()

    def _choose(self, cands, alpha, ctx):
        t_model = self.target.plain_step_time(ctx)
        t_plain = self._t_plain(ctx)
        # verify(gamma) is linear in gamma (T = B(1+gamma)): fold its slope into the per-draft-token cost.
        slope = max(self.target.verify_step_time(ctx, 2) - t_model, 0.0) * self._plain_scale
        t_draft = torch.tensor(
            [self.latency.draft_step_time(c.skipset, ctx) + slope for c in cands], dtype=torch.float32
        )
        # min_speedup = 0 drafts always; otherwise the bar rises by what the last plan fell short of its prediction
        bar = self.cfg.min_speedup / self.pred_scale if self.cfg.min_speedup > 0 else 0.0
        choice = tpt.choose(
            alpha,
            t_draft,
            t_plain,
            self.cfg.num_speculative_tokens,
            t_plain=t_plain,
            margin=bar - 1.0,
            impl=self.cfg.kernels,
        )
        return choice, t_plain, t_draft

    def _top(self, cands, alpha, t_draft, t_plain, k: int = 5) -> list[dict]:
        """The k best candidates by predicted speedup (for logs, benchmarks and tests)."""
        from vllm_knapspec.kernels.tpt_argmax import tpt_grid_torch

        grid = tpt_grid_torch(alpha, t_draft, t_plain, self.cfg.num_speculative_tokens)  # [C, gamma]
        best, g = grid.max(1)
        plain = alpha.shape[1] / t_plain
        order = best.argsort(descending=True)[:k].tolist()
        return [
            dict(
                skip=str(cands[c].skipset),
                alpha=round(float(alpha[c].mean()), 3),
                gamma=int(g[c]) + 1,
                speedup=round(float(best[c]) / plain, 3),
                cos=round(cands[c].cos, 4),
            )
            for c in order
        ]

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

    def _t_plain(self, ctx) -> float:
        """The target model's plain step time, scaled down by the median measured/predicted ratio of the last
        plain steps (the model refits online but may not have converged from its prior at the first selection;
        on an H100 the graphed-draft prior priced the compiled target step 1.8x too high). Only down: plain
        steps measured slower than predicted (a busy host) would slow the drafts too, which no draft timing
        has shown yet, so scaling up would favour speculation on a guess."""
        if len(self._plain_steps) >= 8:
            ratios = [sec / max(self.target.plain_step_time(c + k), 1e-12) for c, k, sec in self._plain_steps]
            self._plain_scale = min(1.0, float(np.median(ratios)))
        return self.target.plain_step_time(ctx) * self._plain_scale

    def _reset_window(self, ctx):
        self._spec = self._new_spec()
        self.steps, self.selected_ctx = 0, float(ctx.mean())
        self.proposed = self.accepted = 0
        self.since_selection_s = 0.0

    def _record(self, skip, choice, t_plain, w_attn, w_mlp, n_cands, ctx):
        s = self.stats
        spec = choice.speculate
        s.set("drafting_enabled", int(spec))
        s.set("skipped_attention", skip.n_attn_skipped if spec else 0)
        s.set("skipped_mlp", skip.n_mlp_skipped if spec else 0)
        s.set("draft_length", choice.gamma if spec else 0)
        s.set("predicted_tpt_speedup", choice.tpt / choice.plain)
        s.set("predicted_acceptance", self.predicted_alpha)
        entry = dict(
            ctx=float(ctx.mean()),
            batch=len(ctx),
            skip=str(skip),
            attn=skip.n_attn_skipped,
            mlp=skip.n_mlp_skipped,
            gamma=choice.gamma,
            speculate=spec,
            alpha=self.predicted_alpha,
            speedup=choice.tpt / choice.plain,
            w_attn=w_attn,
            w_mlp=w_mlp,
            candidates=n_cands,
        )
        entry["top"] = self.top
        self.history.append(entry)
        logger.info(
            "KnapSpec selection at context %.0f x %d: %s, gamma %d, predicted %.3fx of plain decoding (alpha %.2f)",
            entry["ctx"],
            entry["batch"],
            f"draft skipping {skip}" if spec else "plain decoding",
            choice.gamma,
            entry["speedup"],
            self.predicted_alpha,
        )
        logger.debug("KnapSpec selection: %s", entry)


class ClaspSelector(KnapSpecSelector):
    """CLaSp-style baseline: whole layers, cosine DP, a fixed number of skipped layers, fixed gamma,
    re-selected on the same schedule (no latency model, no TPT, always speculates)."""

    def _guard(self) -> bool:  # the baseline as published: no guard
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


def make_latency_model(cfg, vllm_config, num_layers: int) -> LatencyModel:
    """A profile when one matches (explicit path or profile_dir), else a roofline prior from the shapes."""
    from vllm_knapspec.latency import LatencyModel as LM

    if cfg.latency_profile:
        return LM.load(cfg.latency_profile)
    mc = vllm_config.model_config
    hf = mc.hf_config
    tp = vllm_config.parallel_config.tensor_parallel_size
    if cfg.profile_dir:
        import os

        from vllm_knapspec.latency import profile_path

        p = profile_path(os.path.expanduser(cfg.profile_dir), mc.model, device_name(), str(mc.dtype), tp)
        if os.path.isfile(p):
            return LM.load(p)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return LM.from_model_shape(
        num_layers,
        hf.hidden_size,
        hf.intermediate_size,
        hf.num_attention_heads,
        getattr(hf, "num_key_value_heads", hf.num_attention_heads),
        head_dim,
        vocab_size=hf.vocab_size,
        dtype_bytes=torch.tensor([], dtype=mc.dtype).element_size(),
        tp=tp,
        **_device_roofline(),
    )


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return "cpu"


def _device_roofline() -> dict:
    if torch.cuda.is_available():
        return {}
    # A 2-core CPU: ~10 GB/s effective, ~50 GFLOP/s, ~20 us per eager op (the draft is eager Python).
    return dict(mem_bw_bytes_per_s=1.0e10, flops_per_s=5.0e10, launch_s=2e-5)


def make_selector(cfg, draft, vllm_config):
    from vllm_knapspec.draft import ReferenceBuilder

    if cfg.skip_set is not None:
        return FixedSelector(SkipSet.parse(draft.num_layers, cfg.skip_set), cfg.num_speculative_tokens)
    latency = make_latency_model(cfg, vllm_config, draft.num_layers)
    cls = ClaspSelector if cfg.selector == "clasp" else KnapSpecSelector
    return cls(cfg, ReferenceBuilder(draft), latency, draft.num_layers, tp_sync())


def tp_sync():
    """Broadcast from tensor-parallel rank 0 (vLLM's TP group); None with one rank."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return None
    return lambda obj: group.broadcast_object(obj, src=0)
