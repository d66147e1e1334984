"""The selector's re-selection schedule (no model needed): selection time stays under its share of decode time
even when the next selection will cost more than the last one (longer context, bigger batch)."""

import numpy as np
import pytest

from vllm_knapspec.config import parse_knapspec
from vllm_knapspec.core.latency import LatencyModel
from vllm_knapspec.core.selector import PLAIN_MIN, PLAIN_WINDOW, KnapSpecSelector

L = 30


def selector(**cfg):
    cfg = parse_knapspec({"num_speculative_tokens": 5, "reselect_interval": 1, **cfg})
    return KnapSpecSelector(cfg, adapter=None, latency=LatencyModel.prior(L, unit_s=1e-4), num_layers=L)


def test_next_selection_waits_for_its_predicted_cost():
    sel = selector(max_selection_overhead=0.02)
    short, long_ = np.array([1000] * 4), np.array([8000] * 16)
    # pretend a selection ran at the short context and cost 1.5x the model's estimate
    sel.selection_s = 1.5 * sel._estimated_selection_s(short)
    sel._cost_scale = 1.5
    sel._reset_window(short)
    predicted_long = 1.5 * sel._estimated_selection_s(long_)
    assert predicted_long > 1.2 * sel.selection_s  # the long context makes the DP dearer
    sel.steps = 10
    sel.since_selection_s = sel.selection_s / 0.02 * 1.01  # enough for the last cost ...
    assert sel._due(short)  # ... at the same context: due
    assert not sel._due(long_)  # ... not for the dearer one
    sel.since_selection_s = predicted_long / 0.02 * 1.01
    assert sel._due(long_)


def plain_measured(sel, ctx):
    """Plain steps at the model's plain step time: enough for t_plain to be measured (a priced selection
    waits for them)."""
    for _ in range(PLAIN_MIN):
        sel.observe_verify(ctx, 0, 0, sel.target.plain_step_time(ctx))


def test_cost_scale_tracks_measured_selection_cost():
    sel = selector(max_selection_overhead=1.0)
    ctx = np.array([2000, 3000])
    plain_measured(sel, ctx)
    sel.select = lambda rows, c: None  # a "DP" that costs nothing measurable
    sel.since_selection_s = 1e9
    sel.plan(np.arange(2), ctx)
    assert sel.selection_s < 0.01 and sel._cost_scale < 0.1  # far cheaper than the estimate


def _speculating(sel, ctx):
    from vllm_knapspec.core.skipset import SkipSet

    sel.current = (SkipSet.parse(L, "a3,a4,m5"), 2)
    sel._reset_window(ctx)
    sel.predicted_alpha = 0.5
    sel.selection_s = 1e9  # no new selection during the test (adapter=None: no model)
    sel.cfg = sel.cfg.model_copy(update={"online_refit": False})  # plain step time fixed: exact ratios


def test_guard_stops_a_plan_slower_than_plain_decoding():
    """A plan predicted to pay but measured slower than plain decoding (here: each step costs 2x a plain step and
    yields 1.5 tokens per request) is switched off after GUARD_STEPS steps, without a new selection."""
    from vllm_knapspec.core.selector import GUARD_STEPS

    sel = selector(max_selection_overhead=0.02, reselect_interval=10_000)
    ctx = np.array([1000, 1200])
    t_plain = sel.target.plain_step_time(ctx)
    _speculating(sel, ctx)
    sel.selected_ctx = float(ctx.mean())
    for step in range(GUARD_STEPS):
        assert sel.plan(np.arange(2), ctx) is not None, step  # not before GUARD_STEPS measured steps
        sel.observe_draft(sel.current[0], ctx, [[1], [1]], t_plain)
        sel.observe_verify(ctx, proposed=2, accepted=1, seconds=t_plain)  # 3 tokens for 2 requests
    assert sel.plan(np.arange(2), ctx) is None
    event = sel.guard_events[0] if sel.guard_events else {}
    assert abs(event["realised_speedup"] - 0.75) < 1e-6
    assert event["acceptance"] == 0.5 and abs(event["step_s"] - 2 * t_plain) < 1e-12  # what fell short, and by how much
    assert sel.stats.counters["guard_stops"] >= 1


def test_guard_keeps_a_plan_that_pays():
    sel = selector(max_selection_overhead=0.02, reselect_interval=10_000)
    ctx = np.array([1000, 1200])
    t_plain = sel.target.plain_step_time(ctx)
    _speculating(sel, ctx)
    sel.selected_ctx = float(ctx.mean())
    for _ in range(4 * 16):
        assert sel.plan(np.arange(2), ctx) is not None
        sel.observe_draft(sel.current[0], ctx, [[1, 2], [1, 2]], 0.3 * t_plain)
        sel.observe_verify(ctx, proposed=4, accepted=3, seconds=1.1 * t_plain)  # 5 tokens in 1.4 plain steps
    assert not sel.guard_events and abs(sel._realised_speedup() - 2.5 / 1.4) < 1e-6


def test_plain_steps_calibrate_the_plain_step_time():
    """The first selection may come before the online refit has moved the target model from its prior: the
    plain-step time used against the drafts is scaled by what the last plain steps measured."""
    sel = selector()
    ctx = np.array([3000])
    predicted = sel.target.plain_step_time(ctx)
    assert sel._t_plain(ctx) == predicted  # nothing measured yet
    sel.cfg = sel.cfg.model_copy(update={"online_refit": False})  # isolate the calibration from the refit
    for _ in range(12):
        sel.observe_verify(ctx, proposed=0, accepted=0, seconds=0.5 * predicted)
    assert abs(sel._t_plain(ctx) - 0.5 * predicted) < 1e-9 * predicted
    for _ in range(PLAIN_WINDOW):  # slower than predicted: never scaled up
        sel.observe_verify(ctx, proposed=0, accepted=0, seconds=2.0 * predicted)
    assert sel._t_plain(ctx) == predicted


def test_graph_capture_is_charged_to_the_selection_not_to_the_plan():
    """A new plan's first draft step captures its CUDA graphs (GPU); the drafter takes that time out of the
    step and charges it here: it counts in the selection-overhead share and delays the next selection, and
    the guard judges the plan on its steps alone."""
    from vllm_knapspec.core.selector import GUARD_STEPS

    sel = selector(max_selection_overhead=0.02, reselect_interval=10_000)
    ctx = np.array([1000, 1200])
    t_plain = sel.target.plain_step_time(ctx)
    _speculating(sel, ctx)
    sel.selection_s, sel.total_selection_s = 0.2, 0.2
    sel.history.append({})
    before = sel.stats.counters.get("selection_seconds", 0.0)  # process-wide counters
    sel.charge_capture(0.7)
    assert abs(sel.selection_s - 0.9) < 1e-12 and abs(sel.total_selection_s - 0.9) < 1e-12
    assert sel.history[-1]["capture_s"] == 0.7 and sel._spec["pending_draft_s"] == 0.0
    assert abs(sel.stats.counters["selection_seconds"] - before - 0.7) < 1e-9
    for _ in range(2 * GUARD_STEPS):  # the plan pays: 5 tokens in 1.4 plain steps
        sel.observe_draft(sel.current[0], ctx, [[1, 2], [1, 2]], 0.3 * t_plain)
        sel.observe_verify(ctx, proposed=4, accepted=3, seconds=1.1 * t_plain)
        assert sel.plan(np.arange(2), ctx) is not None
    assert not sel.guard_events


def test_guard_caps_a_one_off_slow_step():
    """One step of a paying plan takes 0.2 s (vLLM's rejection sampler JIT-compiling on the process's first
    speculative step, on the H100): the guard counts it as OUTLIER_X typical steps and keeps the plan; a plan
    that is slow on every step is still stopped (test_guard_stops_a_plan_slower_than_plain_decoding)."""
    from vllm_knapspec.core.selector import GUARD_STEPS

    sel = selector(max_selection_overhead=0.02, reselect_interval=10_000)
    ctx = np.array([1000, 1200])
    t_plain = sel.target.plain_step_time(ctx)
    _speculating(sel, ctx)
    sel._spec["pred_step_s"] = 1.4 * t_plain
    for step in range(2 * GUARD_STEPS):
        sel.observe_draft(sel.current[0], ctx, [[1, 2], [1, 2]], 0.3 * t_plain)
        sel.observe_verify(ctx, proposed=4, accepted=3, seconds=(2000 if step == 0 else 1.1) * t_plain)
        assert sel.plan(np.arange(2), ctx) is not None, step
    assert not sel.guard_events and sel._realised_speedup() > 1.4


def test_plain_steps_reach_the_target_model_averaged():
    """Plain steps of one batch size go to the target model PLAIN_BATCH at a time, as their mean step (same
    shape, one online update instead of eight: host time per step); a step with drafts or another batch size
    flushes what is pending first; what it learns matches feeding every step."""
    from vllm_knapspec.core.selector import PLAIN_BATCH

    sel, each = selector(), selector()
    seen = []
    orig = sel.target.observe_verify
    sel.target.observe_verify = lambda *a, **kw: seen.append((a, kw)) or orig(*a, **kw)
    ctx = np.array([1000, 3000])
    true_s = 2.0 * sel.target.plain_step_time(ctx)  # the machine is 2x slower than the prior
    for k in range(3 * PLAIN_BATCH):
        for s in (sel, each):
            s.observe_verify(ctx + k, 0, 0, true_s)
        each._flush_plain()  # the control: one update per step
    assert len(seen) == 3 and seen[0][0][0] == float((ctx + (PLAIN_BATCH - 1) / 2).sum())  # mean Σctx
    sel.observe_verify(ctx, 0, 0, true_s)
    sel.observe_verify(ctx[:1], 0, 0, true_s)  # another batch size: the pending step goes
    sel.observe_verify(ctx[:1], 3, 2, true_s)  # a verify step: pending plain step, then it
    assert [a[1] for a, _ in seen[3:]] == [2, 1, 4]
    a, b = sel.target.plain_step_time(ctx), each.target.plain_step_time(ctx)
    assert abs(a / true_s - 1) < 0.25 and abs(b / true_s - 1) < 0.25, (a / true_s, b / true_s)


def test_idle_gaps_are_not_decode_time():
    """The gap before a step that admitted new requests may hold an idle server (in an A/B harness: the other
    engine's whole run): it counts as at most two steps like the last steady one."""
    sel = selector()
    ctx = np.array([1000, 2000])
    sel.observe_verify(ctx, 0, 0, 30.0, steady=False)
    assert sel.since_selection_s == 0.0 and sel.total_decode_s == 0.0
    sel.observe_verify(ctx, 0, 0, 0.01)
    sel.observe_verify(ctx, 0, 0, 30.0, steady=False)
    sel.observe_verify(ctx, 0, 0, 0.015, steady=False)
    assert abs(sel.since_selection_s - (0.01 + 0.02 + 0.015)) < 1e-12


class _ToyAdapter:
    """Reference states of a toy residual model with L layers (no vLLM): enough for select() to run for real."""

    def __init__(self, r=8, d=16, vocab=64, seed=0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(2 * L, d, d, generator=g) / d**0.5
        self.s = torch.full((2 * L,), 0.3)
        self.V = torch.randn(d, vocab, generator=g)
        self.x = torch.randn(r, d, generator=g)
        self.r = r
        self.delay = 0.0  # seconds per sublayer run (a launch-bound device)

    def item(self, i, h):
        import time

        import torch

        if self.delay:
            time.sleep(self.delay)
        return h + self.s[i] * torch.tanh(h @ self.A[i])

    def max_reference_tokens(self, num_states):
        return self.r

    def build(self, rows, ctx, r):
        import types

        import torch

        hs = [self.x]
        for i in range(2 * L):
            hs.append(self.item(i, hs[-1]))
        return types.SimpleNamespace(
            refs=torch.stack(hs),
            groups=[np.arange(self.r)],
            rows_np=rows,
            run_item=self.item,
            logits_fn=lambda h: h @ self.V,
        )

    def synthetic(self, r):
        return self.build(np.zeros(1, np.int64), np.array([2 * r]), r)


def _toy_selector(**cfg):
    sel = selector(kernels="torch", **cfg)
    sel.adapter = _ToyAdapter()
    return sel


def test_reselection_backs_off_while_choosing_plain_decoding():
    """Interval and overhead share back off together while nothing pays; both reset once a plan is chosen."""
    from vllm_knapspec.core.selector import BACKOFF_MAX, BUDGET_BACKOFF_MAX

    sel = _toy_selector(reselect_interval=4, min_speedup=10.0, max_selection_overhead=0.02)  # nothing beats 10x
    ctx, rows = np.array([1000]), np.arange(1)
    intervals, shares = [], []
    for _ in range(7):
        sel.select(rows, ctx)
        assert sel.current is None
        intervals.append(sel.interval)
        shares.append(sel._share())
    assert intervals == [8, 16, 32, 64, 64, 64, 64] and 64 == BACKOFF_MAX * 4
    assert shares == [0.01, 0.005] + [0.02 / BUDGET_BACKOFF_MAX] * 5
    # the budget gate follows the share: a selection that cost 1 s waits for 1 / 0.005 s of decoding
    sel.selection_s, sel.steps, sel.selected_ctx = 1.0, 10_000, 1000.0
    sel.since_selection_s = 0.99 / 0.005
    assert not sel._due(ctx)
    sel.since_selection_s = 1.01 / 0.005
    sel._cost_scale = 1.0 / sel._estimated_selection_s(ctx)  # predicted cost == the last one
    assert sel._due(ctx)
    sel.cfg = sel.cfg.model_copy(update={"min_speedup": 0.0})  # always draft: the interval resets
    sel.select(rows, ctx)
    assert sel.current is not None and sel.interval == 4 and sel._share() == 0.02


def test_a_plan_that_fell_short_raises_the_bar_for_the_next():
    """The guard measured a plan at 0.55x where 1.1x was predicted: later predictions count at half, so a
    candidate predicted to pay by less than 2x min_speedup is not started; the discount recovers slowly."""
    from vllm_knapspec.core.selector import RECOVER

    sel = _toy_selector(reselect_interval=1)
    ctx, rows = np.array([1000]), np.arange(1)
    sel.cfg = sel.cfg.model_copy(update={"min_speedup": 0.0})
    sel.select(rows, ctx)
    predicted = sel.history[-1]["speedup"]  # the toy's best plan, always the same
    sel.cfg = sel.cfg.model_copy(update={"min_speedup": 0.9 * predicted})
    sel.select(rows, ctx)
    assert sel.current is not None  # 1.0 x predicted clears 0.9 x predicted
    sel._plan_pred, sel._spec["steps"] = 1.1, 16  # what the guard saw of that plan
    sel._realised_speedup = lambda: 0.55
    sel._stop_drafting(ctx)
    assert abs(sel.pred_scale - 0.5) < 1e-9
    sel.select(rows, ctx)
    assert sel.current is None  # 0.5 * 1.05 x predicted < 0.9 x predicted
    for _ in range(12):  # 0.5 * 1.05^13 > 0.9: drafting again
        sel.select(rows, ctx)
    assert sel.current is not None and abs(sel.pred_scale - 0.5 * RECOVER**13) < 1e-9


def test_first_selection_waits_for_its_calibrated_cost():
    """calibrate() (GPU start-up) times a selection-shaped pass on the adapter's synthetic reference; the first
    selection then waits until decode time x share covers that cost, not only the cost model's estimate, which
    prices compute only (a launch-bound DP on an H200 cost 3-10x it)."""
    sel = _toy_selector(max_selection_overhead=0.01)
    ctx = np.array([1000])
    plain_measured(sel, ctx)
    est = sel._estimated_selection_s(ctx)
    sel.adapter.delay = 4 * est / L  # every sublayer run: the pass costs >> the estimate
    cost = sel.calibrate()
    assert cost > 5 * est and sel.current is None and not sel.history  # a measurement, not a selection
    pred = sel._predicted_selection_s(ctx)
    assert pred >= 0.99 * cost  # the context here is longer than the calibration's
    sel.since_selection_s = 0.9 * pred / 0.01
    assert not sel._due(ctx)  # the uncalibrated estimate would have let it run
    sel.since_selection_s = 1.1 * pred / 0.01
    assert sel._due(ctx)


def test_lookup_only_steps_leave_the_target_model_to_verify_jump():
    """A step that verified only prompt-lookup drafts is not a plain step and does not refit the target model:
    its cost beyond the model's line is VerifyJump's. Fed to the model, 3x-slow lookup steps would raise the
    plain step every plan and the guard are priced against. A step with layer-skip drafts refits with every
    token it verified."""
    sel = selector()
    seen = []
    orig = sel.target.observe_verify
    sel.target.observe_verify = lambda *a, **kw: seen.append(a) or orig(*a, **kw)
    ctx = np.array([1000, 3000])
    plain = sel.target.plain_step_time(ctx)
    for _ in range(40):
        sel.observe_verify(ctx, 0, 0, 3 * plain, verified=7)  # lookup drafts only: slow steps
    assert seen == [] and len(sel._plain_steps) == 0
    assert abs(sel.target.plain_step_time(ctx) / plain - 1) < 1e-9
    sel.observe_verify(ctx, 0, 0, plain)  # a plain step still calibrates
    assert len(sel._plain_steps) == 1
    sel.observe_verify(ctx, 4, 2, plain, verified=7)  # layer-skip rows and lookup rows in one step
    assert seen[-1][1] == 2 + 7


def test_quiet_steps_price_plain_decoding_and_full_plain_steps_stop_counting():
    """On the async path most plain steps are quiet (the drafter reports them per stride window with the
    batch's context): their mean time is what plain decoding costs, and full steps that plan plain decoding
    (dearer: the selector's host work) no longer calibrate t_plain or refit the target model."""
    sel = selector()
    ctx = np.array([1000, 3000])
    predicted = sel.target.plain_step_time(ctx)
    sel.cfg = sel.cfg.model_copy(update={"online_refit": False})  # isolate the calibration from the refit
    for _ in range(12):
        sel.observe_verify(ctx, proposed=0, accepted=0, seconds=0.9 * predicted)  # full plain steps
    assert abs(sel._t_plain(ctx) / predicted - 0.9) < 1e-9
    sel.observe_quiet(7, 7 * 0.5 * predicted)  # without ctx (the batch changed): counted, not priced
    assert abs(sel._t_plain(ctx) / predicted - 0.9) < 1e-9 and sel.steps == 7
    sel.observe_quiet(15, 15 * 0.5 * predicted, ctx)
    assert abs(sel._t_plain(ctx) / predicted - 0.5) < 1e-9
    n = len(sel._plain_steps)
    sel.observe_verify(ctx, proposed=0, accepted=0, seconds=0.9 * predicted)  # a full plain step: left out
    assert len(sel._plain_steps) == n and abs(sel._t_plain(ctx) / predicted - 0.5) < 1e-9
    sel.observe_verify(ctx, proposed=0, accepted=0, seconds=3 * predicted, verified=8)  # lookup only: VerifyJump's
    assert len(sel._plain_steps) == n


def test_quiet_steps_refit_the_target_model():
    sel = selector()
    seen = []
    orig = sel.target.observe_verify
    sel.target.observe_verify = lambda *a, **kw: seen.append((a, kw)) or orig(*a, **kw)
    ctx = np.array([1000, 3000])
    true_s = 0.5 * sel.target.plain_step_time(ctx)
    for _ in range(4):
        sel.observe_quiet(15, 15 * true_s, ctx)
    sel.observe_verify(ctx, 0, 0, 4 * true_s)  # a full plain step: no refit
    sel._flush_plain()
    assert seen and all(kw.get("num_reqs") == 2 for _, kw in seen)
    assert all(abs(a[2] - true_s) < 1e-12 for a, _ in seen)  # the quiet steps' mean, never the full step
    assert sum(1 for _ in seen) == 2  # 60 quiet steps: PLAIN_BATCH at a time


def test_a_selection_that_cannot_clear_the_bar_is_not_run():
    """best_case bounds every selection's prediction (the cheapest draft the budget allows, every token
    accepted). Once a plan measured short of its prediction, a due selection whose best case, discounted, stays
    under min_speedup decodes plainly without the reference pass: it backs off and recovers like a selection
    that chose plain decoding."""
    from vllm_knapspec.core.selector import RECOVER

    sel = _toy_selector(reselect_interval=4, max_selection_overhead=1.0)
    ctx, rows = np.array([1000]), np.arange(1)
    for gamma_cap in (1, 5):  # any draft length, any candidate: at most the bound
        sel.cfg = sel.cfg.model_copy(update={"min_speedup": 0.0, "num_speculative_tokens": gamma_cap})
        sel.select(rows, ctx)
        assert max(t["speedup"] for t in sel.top) <= sel.best_case(ctx) * (1 + 1e-5)
    sel.cfg = sel.cfg.model_copy(update={"min_speedup": 1.02})
    builds = []
    build = sel.adapter.build
    sel.adapter.build = lambda *a: builds.append(1) or build(*a)
    sel.pred_scale = 0.99 * 1.02 / sel.best_case(ctx)  # just under the bar
    sel.steps, sel.since_selection_s, sel.selection_s = 100, 1e9, 1e-3
    interval = sel.interval
    assert sel.plan(rows, ctx) is None and not builds
    assert sel.stats.counters["selections_passed"] == 1 and sel.interval == 2 * interval
    assert abs(sel.pred_scale - 0.99 * 1.02 / sel.best_case(ctx) * RECOVER) < 1e-9  # recovered: clears the bar now
    sel.steps, sel.since_selection_s = 100, 1e9
    sel.plan(rows, ctx)
    assert builds == [1]  # the discounted best case clears the bar: the selection runs


def test_full_steps_price_a_drafting_steps_host_work():
    """Once quiet steps price plain decoding, the full steps that plan it measure what a full step costs beyond
    a quiet one (the drafter's host work, which every drafting step pays). A plan that beats plain decoding
    without that cost and loses with it is not chosen, and the best case says so before any reference pass."""
    sel = _toy_selector(reselect_interval=1, min_speedup=0.0)
    ctx, rows = np.array([1000]), np.arange(1)
    sel.select(rows, ctx)
    sel.cfg = sel.cfg.model_copy(update={"min_speedup": 0.8 * sel.history[-1]["speedup"]})
    sel.select(rows, ctx)
    assert sel.current is not None  # the toy's plan clears the bar against the model's plain step
    best = sel.best_case(ctx)
    assert sel.full_step_extra_s() == 0.0 and sel.history[-1]["full_step_extra_s"] == 0.0
    sel.current = None
    t = sel._t_plain(ctx)
    sel.observe_quiet(8, 8 * t, ctx)  # quiet steps at the model's plain step
    t = sel._t_plain(ctx)
    for _ in range(3):
        sel.observe_verify(ctx, 0, 0, 4 * t)  # full plain steps: 3 t of host work each
    assert sel.full_step_extra_s() == 0.0  # too few to say
    sel.observe_verify(ctx, 0, 0, 4 * t)
    assert abs(sel.full_step_extra_s() - 3 * t) < 1e-6 * t
    assert sel.best_case(ctx) < 1.0 < best  # no skip set can beat plain decoding now
    sel.select(rows, ctx)
    assert sel.current is None and abs(sel.history[-1]["full_step_extra_s"] - 3 * t) < 1e-6 * t


def test_lookup_steps_measure_the_full_step_extra_beyond_their_verified_tokens():
    """A lookup-only step costs the model's line for its verified tokens plus the full step's extra; the extra
    is what is left once the line is taken off, so drafting steps of any length measure the same host work."""
    sel = _toy_selector()
    ctx = np.array([1000, 1000])
    sel.observe_quiet(8, 8 * sel._t_plain(ctx), ctx)
    t, slope = sel.verify_line(ctx)
    per_token, extra = slope / len(ctx), 1e-3
    assert per_token > 0
    for verified in (2, 4, 6, 8):
        sel.observe_verify(ctx, 0, 1, t + verified * per_token + extra, verified=verified)
    assert abs(sel.full_step_extra_s() - extra) < 1e-9


def test_the_clasp_baseline_runs_every_due_selection():
    """CLaSp as published always speculates: a hopeless best case does not pass its selections."""
    from vllm_knapspec.config import parse_knapspec
    from vllm_knapspec.core.selector import ClaspSelector

    cfg = parse_knapspec(
        {"num_speculative_tokens": 5, "reselect_interval": 1, "kernels": "torch", "clasp_skip_layers": 4}
    )
    sel = ClaspSelector(cfg, adapter=_ToyAdapter(), latency=LatencyModel.prior(L, unit_s=1e-4), num_layers=L)
    sel.pred_scale = 1e-3  # no best case clears min_speedup at this discount
    assert sel._hopeless(np.array([1000]))
    plain_measured(sel, np.array([1000]))
    sel.steps, sel.since_selection_s = 100, 1e9
    assert sel.plan(np.arange(1), np.array([1000])) is not None
    assert "selections_passed" not in sel.stats.counters


def test_the_first_priced_selection_waits_for_plain_decoding_to_be_measured():
    """Plain decoding is what every plan is priced against: the first selection waits for PLAIN_MIN plain steps
    and, once quiet steps price plain decoding, for the full steps that measure a drafting step's extra cost.
    A config that asks to always draft does not wait."""
    from vllm_knapspec.core.selector.timing import FULL_MIN

    sel = selector(max_selection_overhead=1.0)
    ctx = np.array([1000])
    sel.since_selection_s = 1e9
    assert not sel._due(ctx)
    sel.observe_quiet(PLAIN_MIN, PLAIN_MIN * sel.target.plain_step_time(ctx), ctx)
    assert len(sel._plain_steps) >= PLAIN_MIN and not sel._due(ctx)  # the full steps' extra is not known yet
    for _ in range(FULL_MIN):
        sel.observe_verify(ctx, 0, 0, 1.5 * sel._t_plain(ctx))
    assert sel._due(ctx)
    eager = selector(min_speedup=0.0)
    assert eager._due(ctx)


def test_the_line_is_kept_per_step_and_repriced_after_a_refit_or_a_plain_step():
    """verify_line answers a step's repeated questions from one computation, and only while nothing it depends
    on moved: a refit of the target model or a new plain step prices the same context anew."""
    sel = _toy_selector()
    ctx = np.array([1000, 1000])
    sel.observe_quiet(PLAIN_MIN, PLAIN_MIN * 0.5 * sel._t_plain(ctx), ctx)  # plain steps at half the model's price
    first = sel.verify_line(ctx)
    assert sel.verify_line(ctx) is first  # the same step asks again
    assert sel.verify_line(ctx.copy()) == first and sel.verify_line(ctx.copy()) is not first
    sel.target._theta *= 2.0  # a refit doubled the model (the scale is remeasured at the next plain step)
    assert sel.verify_line(ctx)[0] == pytest.approx(2.0 * first[0])
    before = sel.verify_line(ctx)
    sel.observe_quiet(1, 0.1 * sel.target.plain_step_time(ctx), ctx)  # a cheaper plain step moves the median
    assert sel.verify_line(ctx) is not before
