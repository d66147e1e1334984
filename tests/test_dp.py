"""The knapsack DP: exactness on additive problems (vs brute force), and the real cosine DP on a toy model."""

import itertools
import random

import numpy as np
import pytest
import torch

from vllm_knapspec.core.dp import (
    Candidate,
    cosine_proxy,
    default_budget,
    default_frozen_items,
    estimate_acceptance,
    holdout_split,
    integer_weights,
    item_weights,
    knapsack_additive,
    knapsack_dp,
    stack_hidden,
)
from vllm_knapspec.core.kernels import HAS_TRITON, interpret_mode
from vllm_knapspec.core.skipset import SkipSet

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and (interpret_mode() or torch.cuda.is_available())),
    reason="needs triton with CUDA or TRITON_INTERPRET=1",
)


# -- weights / budget ----------------------------------------------------------------------------------


def test_integer_weights_official_rule():
    assert integer_weights(1.0, 1.0) == (1, 1)
    assert integer_weights(3.2, 1.0) == (3, 1)
    assert integer_weights(0.02, 0.01) == (2, 1)
    assert integer_weights(2.5, 1.0) == (2, 1)  # Python round (banker's), as the official int(round())
    assert integer_weights(3.5, 1.0) == (4, 1)
    assert integer_weights(40.0, 1.0) == (5, 1)  # capped at 5
    assert integer_weights(40.0, 1.0, cap=3) == (3, 1)
    assert integer_weights(1.0, 2.6) == (1, 3)
    assert integer_weights(1.0, 1.2) == (1, 1)
    with pytest.raises(ValueError):
        integer_weights(0.0, 1.0)


def test_budget_and_frozen_defaults():
    assert default_budget(32, 3, 1) == 64  # (w_attn + w_mlp) * L // 2
    assert default_budget(5, 1, 1) == 5
    assert item_weights(3, 2, 1) == [2, 1, 2, 1, 2, 1]
    assert default_frozen_items(32) == (0, 1, 62, 63)
    assert default_frozen_items(1) == (0, 1)


# -- additive mode vs brute force ---------------------------------------------------------------------------


def _brute(values, weights, budget, frozen):
    best = 0.0
    free = [i for i in range(len(values)) if i not in frozen]
    for k in range(len(free) + 1):
        for s in itertools.combinations(free, k):
            if sum(weights[i] for i in s) <= budget:
                best = max(best, sum(values[i] for i in s))
    return best


def _problem(rng):
    n = rng.randint(1, 12)
    values = [rng.randint(0, 20) for _ in range(n)]
    weights = [rng.randint(1, 5) for _ in range(n)]
    budget = rng.randint(0, sum(weights))
    frozen = set(rng.sample(range(n), rng.randint(0, min(2, n))))
    return values, weights, budget, frozen


def _check_solution(sol, values, weights, budget, frozen):
    assert sol.value == _brute(values, weights, budget, frozen)
    assert sol.weight == sum(weights[i] for i in sol.items) <= budget
    assert sol.value == sum(values[i] for i in sol.items)
    assert not frozen & set(sol.items)
    assert len(set(sol.items)) == len(sol.items)


@pytest.mark.parametrize("branches", ["live", "prefix"])
def test_additive_equals_brute_force(branches):
    rng = random.Random(1234)
    for _ in range(60):
        values, weights, budget, frozen = _problem(rng)
        sol = knapsack_additive(values, weights, budget, frozen_items=frozen, impl="torch", branches=branches)
        _check_solution(sol, values, weights, budget, frozen)


@needs_triton
def test_additive_equals_brute_force_triton():
    rng = random.Random(99)
    for _ in range(3):  # the interpreter is slow; the kernel is compared in full
        values, weights, budget, frozen = _problem(rng)  # against torch in test_kernels.py
        sol = knapsack_additive(values, weights, min(budget, 6), frozen_items=frozen, impl="triton", device=DEV)
        _check_solution(sol, values, weights, min(budget, 6), frozen)


def test_additive_known_instance():
    # classic: values 60, 100, 120; weights 1, 2, 3; capacity 5 -> items 1, 2 (value 220)
    sol = knapsack_additive([60, 100, 120], [1, 2, 3], 5)
    assert sorted(sol.items) == [1, 2] and sol.value == 220 and sol.weight == 5
    assert knapsack_additive([5, 5], [3, 3], 2).items == []
    assert knapsack_additive([0, 0], [1, 1], 2).value == 0


# -- the cosine DP on a toy residual model ------------------------------------------------------------------

L, R, D = 6, 4, 16
NEAR_ID = {3, 4, 7}  # m1, a2, m3: sublayers whose update is tiny (skippable)
FROZEN = default_frozen_items(L)  # (0, 1, 10, 11)
W = item_weights(L, 2, 1)  # attention weight 2, MLP weight 1 -> NEAR_ID weighs 1 + 2 + 1 = 4


class ToyModel:
    """2L residual sublayers h <- h + s_i * tanh(h @ A_i); near-identity items have s_i = 1e-3."""

    def __init__(self, seed=0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.A = (torch.randn(2 * L, D, D, generator=g) / D**0.5).to(device)
        self.s = torch.tensor([1e-3 if i in NEAR_ID else 1.0 for i in range(2 * L)]).to(device)
        self.x = torch.randn(R, D, generator=g).to(device)
        self.calls = []

    def item(self, i, h):
        return h + self.s[i] * torch.tanh(h @ self.A[i])

    def run_item(self, i, h):
        assert h.dim() == 3 and h.shape[1:] == (R, D)
        self.calls.append((i, h.shape[0]))
        return self.item(i, h)

    def refs(self):
        hs = [self.x]
        for i in range(2 * L):
            hs.append(self.item(i, hs[-1]))
        return torch.stack(hs)

    def forward(self, skip_items):
        h = self.x
        for i in range(2 * L):
            if i not in skip_items:
                h = self.item(i, h)
        return h


def _run(model, budget=None, thr=0.5, impl="torch", branches="live"):
    budget = default_budget(L, 2, 1) if budget is None else budget
    return knapsack_dp(
        model.run_item, model.refs(), W, budget, sim_threshold=thr, frozen_items=FROZEN, impl=impl, branches=branches
    )


def test_dp_finds_near_identity_items():
    model = ToyModel()
    budget = default_budget(L, 2, 1)  # 9
    cands = _run(model, budget)
    by_w = {c.weight: c for c in cands}
    assert [c.weight for c in cands] == sorted(by_w)  # one per budget, sorted
    assert by_w[0].skipset == SkipSet.empty(L) and by_w[0].cos == pytest.approx(1.0, abs=1e-6)
    assert set(by_w[4].skipset.items()) == NEAR_ID  # the full set of harmless items at its exact weight
    for j in (1, 2, 3):  # lighter budgets: subsets of the harmless items
        assert set(by_w[j].skipset.items()) <= NEAR_ID
    assert by_w[4].cos > 0.999
    full = model.refs()[-1]
    for c in cands:
        items = c.skipset.items()
        assert c.weight == sum(W[i] for i in items) <= budget
        assert not set(items) & set(FROZEN)
        h = model.forward(set(items))  # the backtracked set really produces this state
        assert torch.allclose(c.hidden, h, atol=1e-5)
        assert c.cos == pytest.approx(cosine_proxy(h[None], full)[0].item(), abs=1e-5)
        assert c.cos >= 0.5
    # skipping a real sublayer costs cosine: heavier drafts are worse than the harmless one
    assert all(c.cos < by_w[4].cos for c in cands if c.weight > 4)


def test_dp_runs_only_live_states_once_per_item():
    model = ToyModel()
    _run(model, thr=0.5)
    assert [i for i, _ in model.calls] == list(range(2 * L))  # one batched call per item
    assert model.calls[0][1] == 1  # only j = 0 is live at the start
    assert max(n for _, n in model.calls) <= default_budget(L, 2, 1) + 1


@pytest.mark.parametrize("thr", [0.5, 0.99, -2.0])
def test_dp_prefix_branches_equal_live_branches(thr):
    """ "prefix" (no host sync: the first reachable states, rounded up to a power of two) gives the same
    candidates as "live" (exactly the valid states), and run_item sees only powers of two or K+1 rows."""
    live, pre = ToyModel(), ToyModel()
    a, b = _run(live, thr=thr), _run(pre, thr=thr, branches="prefix")
    assert [(c.weight, c.skipset) for c in a] == [(c.weight, c.skipset) for c in b]
    for x, y in zip(a, b):
        assert x.cos == pytest.approx(y.cos, abs=1e-6) and torch.allclose(x.hidden, y.hidden, atol=1e-6)
    K = default_budget(L, 2, 1)
    sizes = [n for _, n in pre.calls]
    assert [i for i, _ in pre.calls] == list(range(2 * L)) and sizes == sorted(sizes)
    assert set(sizes) <= {1, 2, 4, 8, K + 1} and sizes[0] == 1
    assert all(n >= m for n, (_, m) in zip(sizes, live.calls))  # every live state was run
    with pytest.raises(ValueError, match="branches"):
        _run(ToyModel(), branches="all")


def test_dp_budget_and_pruning():
    model = ToyModel()
    cands = _run(model, budget=2)
    assert max(c.weight for c in cands) <= 2 and set(cands[-1].skipset.items()) <= NEAR_ID
    strict = _run(model, thr=0.99)  # prune everything that skips a real sublayer
    assert all(c.cos >= 0.99 for c in strict)
    assert {c.weight for c in strict} <= {0, 1, 2, 3, 4}
    assert len(strict) < len(_run(model, thr=-2.0))
    assert len(_run(ToyModel(), budget=0)) == 1


def test_dp_always_returns_the_empty_set():
    model = ToyModel()

    def bad(i, h):  # a "model" that disagrees with its refs everywhere
        return -h

    cands = knapsack_dp(bad, model.refs(), W, 9, sim_threshold=0.5, frozen_items=FROZEN)
    assert len(cands) == 1 and cands[0].weight == 0 and not cands[0].skipset
    assert torch.equal(cands[0].hidden, model.refs()[-1])


@needs_triton
def test_dp_triton_equals_torch():
    a = _run(ToyModel(device=DEV), impl="triton")
    b = _run(ToyModel(device=DEV), impl="torch")
    assert [c.weight for c in a] == [c.weight for c in b]
    for x, y in zip(a, b):
        assert x.cos == pytest.approx(y.cos, abs=1e-5)
        # near-identity items differ by ~1e-7 in cosine, so fp32 summation order may flip such a near-tie
        # (seen on CUDA); any other difference is a bug
        if x.skipset == y.skipset:
            assert torch.allclose(x.hidden, y.hidden, atol=1e-5)
        else:
            assert set(x.skipset.items()) | set(y.skipset.items()) <= NEAR_ID
    by_a, by_b = {c.weight: c for c in a}, {c.weight: c for c in b}
    assert set(by_a[4].skipset.items()) == set(by_b[4].skipset.items()) == NEAR_ID


# -- acceptance estimate ------------------------------------------------------------------------------------


def test_estimate_acceptance_top1_agreement():
    g = torch.Generator().manual_seed(0)
    V = 50
    head = torch.randn(D, V, generator=g)

    def logits_fn(h):
        return h @ head

    full = torch.randn(R, D, generator=g)
    noisy = full + 0.3 * torch.randn(R, D, generator=g)
    cands = torch.stack([full, -full, noisy, torch.randn(R, D, generator=g)])
    alpha = estimate_acceptance(cands, full, logits_fn)
    want = [(logits_fn(c).argmax(-1) == logits_fn(full).argmax(-1)).float().mean().item() for c in cands]
    assert alpha.tolist() == pytest.approx(want)
    assert alpha[0] == 1.0 and alpha[1] == 0.0
    assert torch.equal(estimate_acceptance(cands, full, logits_fn, chunk=1), alpha)
    cos = cosine_proxy(cands, full)
    assert cos[0].item() == pytest.approx(1.0) and cos[1].item() == pytest.approx(-1.0)
    # stack_hidden feeds DP candidates straight in
    cs = [Candidate(SkipSet.empty(L), 0, 1.0, full), Candidate(SkipSet.empty(L), 1, 0.9, noisy)]
    assert torch.equal(estimate_acceptance(stack_hidden(cs), full, logits_fn), alpha[[0, 2]])


def test_warmup_kernels_runs_every_specialisation_class_or_nothing():
    """The load-time warm-up compiles the DP kernel for each value class of r and w (interpreted here); with the
    torch path there is nothing to compile and it does no work."""
    from vllm_knapspec.core.dp import warmup_kernels

    assert warmup_kernels(64, torch.float32, "cpu", 32, impl="torch") == 0
    if HAS_TRITON and interpret_mode():
        assert warmup_kernels(64, torch.float32, "cpu", 32, impl="auto") == 2 * 4
        assert warmup_kernels(64, torch.float32, "cpu", 1, impl="auto") == 4  # r = 1 has one class


# -- held-out tokens ---------------------------------------------------------------------------------------


def test_holdout_split_alternates_within_each_request():
    tw, held = holdout_split([np.arange(0, 5), np.arange(5, 6), np.arange(6, 8)], 8)
    assert tw.sum().item() == pytest.approx(1.0)
    assert (tw > 0).nonzero().flatten().tolist() == [0, 2, 4, 5, 6]  # a one-token request is on both sides
    assert [h.tolist() for h in held] == [[1, 3], [5], [7]]


def test_dp_with_token_weights_never_sees_held_out_tokens():
    """The DP's choice depends on its own tokens only: other inputs at the held-out places give the same
    candidates, scored on the DP's tokens; the held-out tokens still run through every branch."""
    a, b = ToyModel(), ToyModel()
    b.x = b.x.clone()
    b.x[1::2] = torch.randn(R // 2, D, generator=torch.Generator().manual_seed(9)) * 3
    tw, held = holdout_split([np.arange(R)], R)
    budget = default_budget(L, 2, 1)
    ca, cb = (knapsack_dp(m.run_item, m.refs(), W, budget, 0.5, FROZEN, token_weights=tw) for m in (a, b))
    assert [(c.weight, c.skipset) for c in ca] == [(c.weight, c.skipset) for c in cb]
    full = a.refs()[-1]
    for x, y in zip(ca, cb):
        assert x.cos == pytest.approx(y.cos, abs=1e-6)
        assert x.cos == pytest.approx(cosine_proxy(x.hidden[None, 0::2], full[0::2])[0].item(), abs=1e-5)
        assert torch.allclose(x.hidden, a.forward(set(x.skipset.items())), atol=1e-5)  # held-out rows too
    assert held[0].tolist() == [1, 3]


def test_a_selection_prices_acceptance_at_its_lower_bound(monkeypatch):
    """Each candidate's per-request held-out agreement is scaled so that its token-weighted mean is the Wilson
    lower bound over all held-out tokens: 15 of 16 is priced at 0.76, not 0.94, and the ranking of candidates
    measured on the same tokens is kept."""
    from types import SimpleNamespace

    from vllm_knapspec.core import dp as dp_mod
    from vllm_knapspec.core.selector import choice

    raw = [torch.tensor([1.0, 0.5]), torch.tensor([7 / 8, 0.5])]  # [C] per request: 15/16 and 8/16 in all
    it = iter(raw)
    monkeypatch.setattr(dp_mod, "stack_hidden", lambda cands: torch.zeros(2, 16, 4))
    monkeypatch.setattr(dp_mod, "estimate_acceptance", lambda h, full, fn: next(it))
    ref = SimpleNamespace(refs=torch.zeros(3, 16, 4), logits_fn=None)
    held = [np.arange(0, 16, 2), np.arange(1, 16, 2)]  # two requests, 8 held-out tokens each
    sel = SimpleNamespace()
    a = choice.Choice._alpha(sel, None, ref, held, batch=3)  # [C, 3]: the third request gets the mean
    lb = dp_mod.wilson_lower(torch.tensor([15 / 16, 0.5]), 16, choice.ALPHA_Z)
    assert torch.allclose(a[:, :2].mean(1), lb, atol=1e-6)
    assert torch.allclose(a[:, 2], a[:, :2].mean(1))
    assert a[0, 0] > a[0, 1] and (a[:, :2] <= torch.stack(raw, 1)).all()
    assert 0.75 < float(a[0, :2].mean()) < 0.77
    assert torch.allclose(sel.alpha_point, torch.tensor([15 / 16, 0.5]))  # the reselection trigger's reference
