"""TPT objective: expected tokens, batch-aware TPT and the speculate-or-not decision."""

import math

import pytest
import torch

from vllm_knapspec.core.skipset import SkipSet
from vllm_knapspec.core.tpt import (
    batch_tpt,
    choose,
    draft_time,
    expected_tokens,
    plain_tpt,
    speculation_worthwhile,
    target_time,
    tpt,
)


def _series(a, g):
    return sum(a**k for k in range(g + 1))


@pytest.mark.parametrize("g", [0, 1, 4, 10, 17])
def test_expected_tokens_edges(g):
    assert expected_tokens(0.0, g) == 1.0
    assert expected_tokens(1.0, g) == g + 1
    assert expected_tokens(0, g) == 1.0 and expected_tokens(1, g) == g + 1
    t = expected_tokens(torch.tensor([0.0, 1.0]), g)
    assert t.tolist() == [1.0, float(g + 1)]
    assert expected_tokens(0.7, 0) == pytest.approx(1.0)


def test_expected_tokens_matches_series_and_is_stable_near_one():
    for a in [1e-6, 0.1, 0.5, 0.9, 0.99, 0.999999]:
        for g in [1, 3, 10, 16]:
            assert expected_tokens(a, g) == pytest.approx(_series(a, g), rel=1e-12)
    # the naive closed form loses its digits here; ours must not
    for eps in [1e-9, 1e-12, 1e-15]:
        a = 1.0 - eps
        assert expected_tokens(a, 10) == pytest.approx(11 - 55 * eps, rel=1e-12)
    a32 = torch.tensor([1 - 2**-24, 1 - 2**-20, 0.999, 0.5], dtype=torch.float32)
    got = expected_tokens(a32, 10)
    want = torch.tensor([_series(x, 10) for x in a32.double().tolist()], dtype=torch.float64)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), want, rtol=1e-5)
    # tensor gamma broadcasts, and the float and tensor paths agree
    g = torch.arange(0, 6)
    assert torch.allclose(
        expected_tokens(torch.tensor(0.8, dtype=torch.float64), g),
        torch.tensor([_series(0.8, int(k)) for k in g], dtype=torch.float64),
    )
    # monotone in alpha and in gamma, clamped outside [0, 1]
    xs = [expected_tokens(a / 20, 8) for a in range(21)]
    assert all(x < y for x, y in zip(xs, xs[1:]))
    assert expected_tokens(1.3, 5) == 6.0 and expected_tokens(-0.2, 5) == 1.0


def test_tpt_formulas():
    assert tpt(0.0, 3, 0.5, 2.0) == pytest.approx(1 / 3.5)
    assert tpt(1.0, 3, 0.5, 2.0) == pytest.approx(4 / 3.5)
    assert tpt(0.8, 4, 0.3, 1.0) == pytest.approx(_series(0.8, 4) / 2.2)
    alphas = [0.9, 0.5, 0.0]
    want = sum(_series(a, 5) for a in alphas) / (5 * 0.25 + 1.0)
    assert batch_tpt(alphas, 5, 0.25, 1.0) == pytest.approx(want)
    assert batch_tpt(torch.tensor(alphas, dtype=torch.float64), 5, 0.25, 1.0).item() == pytest.approx(want)
    # [C, R] tensor: sums over the last dim only
    two = batch_tpt(torch.tensor([alphas, [1.0, 1.0, 1.0]], dtype=torch.float64), 5, 0.25, 1.0)
    assert two.shape == (2,) and two[1].item() == pytest.approx(18 / 2.25)
    assert plain_tpt(16, 2.0) == 8.0
    # the official code's TPT for one request (Knapspec.TPT) is the same number
    s = SkipSet.parse(4, "a1,a2,m1")
    t_attn, t_mlp, d, a = 0.3, 0.2, 6, 0.85
    official = ((a ** (d + 1) - 1) / (a - 1)) / (t_attn * (s.n_attn_kept * d + 4) + t_mlp * (s.n_mlp_kept * d + 4))
    assert tpt(a, d, draft_time(s, t_attn, t_mlp), target_time(4, t_attn, t_mlp)) == pytest.approx(official)


def test_speculation_worthwhile_margin():
    # best TPT 3 % above plain: worth it with margin 0, not with margin 5 %
    assert speculation_worthwhile(1.03 * plain_tpt(4, 1.0), 4, 1.0, margin=0.0)
    assert not speculation_worthwhile(1.03 * plain_tpt(4, 1.0), 4, 1.0, margin=0.05)
    assert not speculation_worthwhile(plain_tpt(4, 1.0), 4, 1.0, margin=0.0)


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_choose_speculate_or_not(impl):
    t_target = 1.0
    # no draft is ever accepted: every gamma loses to plain decoding -> do not speculate
    res = choose(torch.zeros(3, 8), torch.tensor([0.2, 0.3, 0.4]), t_target, 16, impl=impl)
    assert not res.speculate and res.gamma == 1 and res.index == 0
    assert res.plain == 8.0 and res.tpt == pytest.approx(8 / 1.2, rel=1e-6)
    # high acceptance, cheap draft: speculate, with a long gamma
    res = choose(torch.full((2, 8), 0.95), torch.tensor([0.5, 0.25]), t_target, 16, impl=impl)
    assert res.speculate and res.index == 1 and res.gamma > 4
    # middling acceptance with an expensive draft: E[tokens] grows too slowly to pay the draft steps
    a, td = 0.3, 0.6
    res = choose(torch.full((1, 4), a), torch.tensor([td]), t_target, 16, impl=impl)
    best = max(batch_tpt([a] * 4, g, td, t_target) for g in range(1, 17))
    assert res.tpt == pytest.approx(best, rel=1e-6)
    assert res.speculate == (best > 1.05 * 4)


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_choose_is_batch_aware(impl):
    # candidate 0 is perfect for request 0 but useless for the other 15; candidate 1 is decent for all.
    # Per request 0 alone candidate 0 wins; for the batch step (one shared skip set) candidate 1 must win.
    R = 16
    alpha = torch.zeros(2, R)
    alpha[0, 0] = 1.0
    alpha[1, :] = 0.7
    t_draft = torch.tensor([0.3, 0.3])
    assert choose(alpha[:, :1], t_draft, 1.0, 10, impl=impl).index == 0
    res = choose(alpha, t_draft, 1.0, 10, impl=impl)
    assert res.index == 1
    want = max((batch_tpt(alpha[c].double(), g, 0.3, 1.0).item(), c, g) for c in range(2) for g in range(1, 11))
    assert (res.tpt, res.index, res.gamma) == (pytest.approx(want[0], rel=1e-6), want[1], want[2])


def test_draft_and_target_time():
    s = SkipSet.parse(6, "a0,a3,m5")
    assert draft_time(s, 2.0, 1.0) == pytest.approx(4 * 2.0 + 5 * 1.0)
    assert target_time(6, 2.0, 1.0) == pytest.approx(18.0)
    assert draft_time(SkipSet.empty(6), 2.0, 1.0) == target_time(6, 2.0, 1.0)
    assert math.isclose(tpt(0.0, 1, target_time(6, 2, 1), target_time(6, 2, 1)), 1 / 36)
