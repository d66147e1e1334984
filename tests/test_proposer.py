"""The proposer's quiet path (no model needed): while the selector chose plain decoding, plain steps of the same
requests are only timed (the runner asks quiet_begin() before a step, patches.py patch 9) and handed to the
selector at the next full step - which must then know exactly what it would have known step by step."""
import types

import numpy as np
import pytest

from vllm_knapspec import proposer as P
from vllm_knapspec.config import parse_knapspec
from vllm_knapspec.latency import LatencyModel
from vllm_knapspec.metrics import KnapSpecStats
from vllm_knapspec.selector import KnapSpecSelector

L = 30


class Clock:
    def __init__(self):
        self.t = 100.0

    def perf_counter(self):
        return self.t


def make(quiet_steps: int, monkeypatch, clock):
    cfg = parse_knapspec({"num_speculative_tokens": 5})
    vllm_config = types.SimpleNamespace(speculative_config=types.SimpleNamespace(knapspec=cfg, num_speculative_tokens=5),
                                        model_config=types.SimpleNamespace(max_model_len=8192))
    monkeypatch.setattr(P, "time", clock)
    monkeypatch.setattr(KnapSpecStats, "_instance", None)      # each proposer its own counters
    prop = P.KnapSpecProposer(vllm_config)
    prop.quiet_steps = quiet_steps
    sel = KnapSpecSelector(cfg, adapter=None, latency=LatencyModel.prior(L, unit_s=1e-4), num_layers=L)
    sel.selection_s = 1e9                      # never due: no model to select with
    prop.selector = sel
    prop.runner = types.SimpleNamespace(input_batch=types.SimpleNamespace(req_ids=[]))
    plans = []
    orig = sel.plan
    sel.plan = lambda rows, ctx: plans.append(len(ctx)) or orig(rows, ctx)
    return prop, plans


def sched(req_ids, prev_ids, tokens=None, drafts=None):
    """The SchedulerOutput fields quiet_begin() reads, for a step of req_ids after a step of prev_ids."""
    tokens = tokens or {r: 1 for r in req_ids}
    return types.SimpleNamespace(num_scheduled_tokens=tokens, total_num_scheduled_tokens=sum(tokens.values()),
                                 scheduled_new_reqs=[r for r in req_ids if r not in prev_ids],
                                 finished_req_ids={r for r in prev_ids if r not in req_ids},
                                 scheduled_spec_decode_tokens=drafts or {})


def step(prop, clock, so, req_ids, sampled, ntok, dt) -> bool:
    """One engine step as the wrapped runner runs it; True when it went quietly."""
    clock.t += dt
    quiet = prop.quiet_begin(so)
    prop.hand_over()                    # patch 9: right after the forward's launch, every step
    if quiet:
        prop.quiet_end()
        return True
    prop.runner.input_batch.req_ids[:] = req_ids
    assert prop.propose(sampled, ntok, None) == [[] for _ in sampled]
    return False


def drive(prop, clock, steps):
    """steps: (req_ids, contexts, seconds since the last step); every request sampled one token."""
    ntok = np.zeros(64, dtype=np.int32)
    prev = []
    for req_ids, ctx, dt in steps:
        ntok[: len(ctx)] = ctx
        step(prop, clock, sched(req_ids, prev), req_ids, [[7]] * len(ctx), ntok, dt)
        prev = req_ids


def workload(rng):
    """Two requests decoding 40 steps, a third joining (its prefill step is not steady), 30 more steps, one leaving."""
    steps, ctx, ids = [], np.array([1000, 2500]), ["a", "b"]
    for _ in range(40):
        ctx = ctx + 1
        steps.append((list(ids), ctx.copy(), rng.uniform(2e-3, 3e-3)))
    ids, ctx = ids + ["c"], np.append(ctx + 1, 300)
    steps.append((list(ids), ctx.copy(), 0.05))
    for _ in range(30):
        ctx = ctx + 1
        steps.append((list(ids), ctx.copy(), rng.uniform(2e-3, 3e-3)))
    ids, ctx = ids[1:], ctx[1:] + 1
    for _ in range(20):
        steps.append((list(ids), ctx.copy(), rng.uniform(2e-3, 3e-3)))
        ctx = ctx + 1
    return steps


def test_quiet_path_reports_what_step_by_step_reports(monkeypatch):
    steps = workload(np.random.default_rng(0))
    clock = Clock()                                          # one module clock: both runs see the same gaps
    quiet, q_plans = make(P.QUIET_STEPS, monkeypatch, clock)
    full, f_plans = make(0, monkeypatch, clock)
    for prop in (quiet, full):
        drive(prop, clock, steps)
        prop.propose([[7]], np.array([5000]), None)         # another request set: the quiet run is flushed
    assert len(f_plans) == len(steps) + 1
    assert len(q_plans) < len(steps) / 4                     # most steps never reached the selector directly
    a, b = quiet.selector, full.selector
    assert a.steps == b.steps
    assert a.since_selection_s == pytest.approx(b.since_selection_s, rel=1e-12)
    assert a.total_decode_s == pytest.approx(b.total_decode_s, rel=1e-12)
    assert [((c + k).tolist(), s) for c, k, s in a._plain_steps] == [((c + k).tolist(), s) for c, k, s in b._plain_steps]
    assert a.stats.counters["no_spec_steps"] == b.stats.counters["no_spec_steps"] == len(f_plans)
    # the target model was fed the same steps in the same groups: the same law
    for ctx in ([1000, 2500], [1000, 2500, 300], [4000]):
        assert a.target.plain_step_time(np.array(ctx)) == pytest.approx(b.target.plain_step_time(np.array(ctx)), rel=1e-9)


@pytest.mark.parametrize("change", ["new request", "finished", "prefill tokens", "drafts", "run over"])
def test_quiet_path_gives_way_when_anything_changes(monkeypatch, change):
    clock = Clock()
    prop, plans = make(P.QUIET_STEPS, monkeypatch, clock)
    ntok = np.zeros(8, dtype=np.int32)
    ids, quiet = ["a", "b"], []
    for k in range(4):          # admission step, a steady full step opens the run, two quiet steps follow
        ntok[:2] = [1001 + k, 2001 + k]
        quiet.append(step(prop, clock, sched(ids, [] if k == 0 else ids), ids, [[7], [7]], ntok, 2e-3))
    assert quiet == [False, False, True, True] and len(plans) == 2 and len(prop._quiet.seconds) == 2
    ntok[:2] = [1005, 2005]
    so = {"new request": sched(["a", "b", "c"], ids),
          "finished": sched(["a"], ids),
          "prefill tokens": sched(ids, ids, tokens={"a": 1, "b": 7}),     # e.g. a request resumed after preemption
          "drafts": sched(ids, ids, drafts={"a": [3]}),
          "run over": sched(ids, ids)}[change]
    if change == "run over":
        prop._quiet.limit = 2
    assert not step(prop, clock, so, ids, [[7], [7]], ntok, 2e-3)
    assert len(plans) == 3                                   # the full path ran ...
    assert prop.selector.steps == 5 and prop.stats.counters["no_spec_steps"] == 5   # ... after the deferred steps


def test_quiet_path_does_not_delay_a_selection(monkeypatch):
    """Selections happen at the same steps with and without the quiet path: the first once the overhead budget
    allows it, later ones when the re-selection interval is reached."""
    steps = workload(np.random.default_rng(1))
    steps = steps[:41] + [(ids, ctx + k, dt) for k in range(1, 4) for ids, ctx, dt in steps[41:71]]   # longer
    clock = Clock()
    seen = {}
    for name, quiet_steps in (("quiet", P.QUIET_STEPS), ("full", 0)):
        prop, _ = make(quiet_steps, monkeypatch, clock)
        sel, at = prop.selector, seen.setdefault(name, [])
        sel.selection_s = 0.002 * sel.cfg.max_selection_overhead * 30      # the budget allows one after ~30 steps
        sel.cfg = sel.cfg.model_copy(update={"reselect_interval": 24})
        sel.interval = 24

        def select(rows, ctx, sel=sel, at=at, prop=prop):                  # a selection that chooses plain decoding
            at.append(sel.steps)
            sel.current = None
            sel._reset_window(ctx)
        sel.select = select
        drive(prop, clock, steps)
    assert len(seen["full"]) >= 3 and seen["quiet"] == seen["full"], seen
