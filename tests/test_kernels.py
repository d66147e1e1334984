"""Triton kernels vs their torch references (run on CPU with TRITON_INTERPRET=1, or on CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from vllm_knapspec.core.kernels import HAS_TRITON, interpret_mode, resolve_impl
from vllm_knapspec.core.kernels.dp_step import dp_step, dp_step_torch
from vllm_knapspec.core.kernels.tpt_argmax import tpt_argmax, tpt_argmax_torch
from vllm_knapspec.core.tpt import batch_tpt

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and (interpret_mode() or torch.cuda.is_available())),
    reason="needs triton with CUDA or TRITON_INTERPRET=1",
)


# -- dp_step ------------------------------------------------------------------------------------------


def _oracle(prev, exe, ref, w, pv, thr):
    """Independent per-j loop of the transition rule (F.normalize cosines, float64)."""
    K1 = prev.shape[0]
    refn = F.normalize(ref.double(), dim=-1)

    def score(h):
        return (F.normalize(h.double(), dim=-1) * refn).sum(-1).mean().item()

    sel, sc, ok = [], [], []
    for j in range(K1):
        cands = []
        if pv[j]:
            cands.append(("exec", score(exe[j])))
        if j - w >= 0 and pv[j - w]:
            cands.append(("skip", score(prev[j - w])))
        if not cands:
            sel.append(None), sc.append(float("-inf")), ok.append(False)
            continue
        best = cands[0]
        if len(cands) == 2 and cands[1][1] > cands[0][1]:
            best = cands[1]
        sel.append(best[0]), sc.append(best[1]), ok.append(best[1] >= thr)
    return sel, sc, ok


def _case(seed, K1, r, d, dtype=torch.float32, p_valid=0.7):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(r, d, generator=g)
    # a spread of noise levels, so scores spread over [~0, ~1] and the threshold prunes some states
    prev = ref + torch.randn(K1, r, d, generator=g) * (torch.rand(K1, 1, 1, generator=g) * 4)
    exe = ref + torch.randn(K1, r, d, generator=g) * (torch.rand(K1, 1, 1, generator=g) * 4)
    pv = torch.rand(K1, generator=g) < p_valid
    return [t.to(DEV, dtype) for t in (prev, exe, ref)] + [pv.to(DEV)]


def _check_same(a, b):
    assert a.parent_skip.tolist() == b.parent_skip.tolist()
    assert a.valid.tolist() == b.valid.tolist()
    fin = torch.isfinite(b.score)  # -inf = no candidate, in both
    assert torch.equal(torch.isfinite(a.score), fin)
    assert torch.equal(a.score[~fin], b.score[~fin])
    assert torch.allclose(a.score[fin], b.score[fin], atol=1e-5, rtol=0)
    assert torch.equal(a.new, b.new)  # a copy of the chosen candidate, bit for bit


def test_dp_step_torch_matches_oracle():
    seen = {"exec": 0, "skip": 0, "pruned": 0, "none": 0}
    for w in [0, 1, 3, 9, 50]:
        prev, exe, ref, pv = _case(w, 9, 3, 17)
        out = dp_step_torch(prev, exe, ref, w, pv, sim_threshold=0.3)
        sel, sc, ok = _oracle(prev.cpu(), exe.cpu(), ref.cpu(), w, pv.cpu(), 0.3)
        assert out.valid.tolist() == ok
        assert out.parent_skip.tolist() == [s == "skip" for s in sel]
        for j, s in enumerate(sel):
            if s is None:
                assert out.score[j].item() == float("-inf")
            else:
                assert out.score[j].item() == pytest.approx(sc[j], abs=1e-5)
            want = (prev[j - w] if s == "skip" else exe[j]) if ok[j] else torch.zeros_like(ref)
            assert torch.equal(out.new[j], want)
            seen["none" if s is None else s if ok[j] else "pruned"] += 1
    assert min(seen.values()) > 0, seen  # every branch of the rule was exercised


@needs_triton
@pytest.mark.parametrize(
    "K1,r,d,w,dtype,thr,p",
    [
        (9, 3, 17, 1, torch.float32, 0.3, 0.7),
        (9, 3, 17, 0, torch.float32, 0.3, 0.7),  # w = 0: skip and execute compete for the same j
        (12, 5, 40, 4, torch.float32, 0.2, 0.5),  # w > j for j < 4
        (6, 2, 40, 7, torch.float32, 0.2, 0.9),  # w > K: skip never possible (how frozen items run)
        (8, 6, 600, 2, torch.float32, 0.1, 0.8),  # d > BLOCK_D and r > BLOCK_T: both loops, masked tails
        (7, 9, 24, 2, torch.float16, 0.3, 0.7),  # half precision, non-power-of-2 r
        (5, 2, 8, 1, torch.float32, 0.3, 0.0),  # nothing valid
        (5, 2, 8, 1, torch.float32, -2.0, 1.0),  # nothing pruned
    ],
)
def test_dp_step_triton_matches_torch(K1, r, d, w, dtype, thr, p):
    prev, exe, ref, pv = _case(K1 * 100 + d + w, K1, r, d, dtype, p)
    a = dp_step(prev, exe, ref, w, pv, thr, impl="triton")
    b = dp_step(prev, exe, ref, w, pv, thr, impl="torch")
    _check_same(a, b)
    assert a.score.dtype == torch.float32 and a.new.dtype == dtype
    if p == 0.0:
        assert not a.valid.any() and torch.isinf(a.score).all()


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_dp_step_tie_goes_to_execute(impl):
    prev, exe, ref, pv = _case(7, 6, 3, 16, p_valid=1.0)
    w = 2
    exe[3] = prev[1]  # identical candidates for j = 3: exact tie
    out = dp_step(prev, exe, ref, w, pv, -2.0, impl=impl)
    assert out.parent_skip[3].item() is False
    # and a strictly better skip wins
    exe[4] = -ref  # cos = -1 for execute at j = 4
    out = dp_step(prev, exe, ref, w, pv, -2.0, impl=impl)
    assert out.parent_skip[4].item() is True and torch.equal(out.new[4], prev[2])


@needs_triton
def test_dp_step_out_buffer_and_alias():
    prev, exe, ref, pv = _case(3, 6, 2, 8)
    buf = torch.empty_like(prev)
    a = dp_step(prev, exe, ref, 1, pv, 0.2, impl="triton", out=buf)
    assert a.new.data_ptr() == buf.data_ptr()
    _check_same(a, dp_step_torch(prev, exe, ref, 1, pv, 0.2))
    with pytest.raises(ValueError):
        dp_step(prev, exe, ref, 1, pv, 0.2, impl="triton", out=prev)


def _held_out_case(seed, K1=9, r=6, d=24):
    """A case and its twin whose odd tokens (weight 0) are different noise: the score must not see them."""
    prev, exe, ref, pv = _case(seed, K1, r, d, p_valid=0.8)
    tw = torch.tensor([1.0, 0.0] * (r // 2), device=DEV)
    tw = tw / tw.sum()
    prev2, exe2 = prev.clone(), exe.clone()
    prev2[:, 1::2] = torch.randn_like(prev2[:, 1::2]) * 5
    exe2[:, 1::2] = -exe2[:, 1::2]
    return (prev, exe, ref, pv, tw), (prev2, exe2)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_dp_step_token_weights_score_only_their_tokens(impl):
    (prev, exe, ref, pv, tw), (prev2, exe2) = _held_out_case(11)
    a = dp_step(prev, exe, ref, 3, pv, 0.2, impl=impl, tw=tw)
    b = dp_step(prev2, exe2, ref, 3, pv, 0.2, impl=impl, tw=tw)
    assert a.parent_skip.tolist() == b.parent_skip.tolist() and a.valid.tolist() == b.valid.tolist()
    fin = torch.isfinite(a.score)
    assert torch.allclose(a.score[fin], b.score[fin], atol=1e-5)
    # the weighted score is the mean over the weighted tokens: the same step on those tokens alone
    even = dp_step(prev[:, 0::2].contiguous(), exe[:, 0::2].contiguous(), ref[0::2].contiguous(), 3, pv, 0.2, impl=impl)
    assert a.parent_skip.tolist() == even.parent_skip.tolist()
    assert torch.allclose(a.score[fin], even.score[fin], atol=1e-5)
    # held-out tokens are still carried: `new` holds every token of the chosen branch
    for j in a.valid.nonzero().flatten().tolist():
        assert torch.equal(a.new[j], prev[j - 3] if a.parent_skip[j] else exe[j])


@needs_triton
def test_dp_step_triton_token_weights_match_torch():
    (prev, exe, ref, pv, _), _ = _held_out_case(5, K1=12, r=7, d=600)
    tw = torch.rand(7, device=DEV)
    tw = tw / tw.sum()
    a = dp_step(prev, exe, ref, 2, pv, 0.1, impl="triton", tw=tw)
    _check_same(a, dp_step_torch(prev, exe, ref, 2, pv, 0.1, tw=tw))


# -- tpt_argmax -------------------------------------------------------------------------------------------


def _tpt_brute(alpha, t_draft, t_target, G):
    """Python loop over (c, gamma) with vllm_knapspec.core.tpt.batch_tpt in float64."""
    best = (-1.0, None, None)
    for c in range(alpha.shape[0]):
        for g in range(1, G + 1):
            v = batch_tpt(alpha[c].double(), g, float(t_draft[c]), t_target).item()
            if v > best[0]:
                best = (v, c, g)
    return best


def _tpt_case(seed, C, R):
    g = torch.Generator().manual_seed(seed)
    alpha = torch.rand(C, R, generator=g) ** 0.3  # mostly high acceptance, like real drafts
    t_draft = 0.2 + 0.8 * torch.rand(C, generator=g)
    return alpha.to(DEV), t_draft.to(DEV)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("C,R,G", [(1, 1, 1), (7, 3, 5), (40, 16, 16), (300, 2, 10)])
def test_tpt_argmax_matches_brute_force(impl, C, R, G):
    alpha, t_draft = _tpt_case(C * 31 + R, C, R)
    res = tpt_argmax(alpha, t_draft, 1.5, G, return_grid=True, impl=impl)
    v, c, g = _tpt_brute(alpha.cpu(), t_draft.cpu(), 1.5, G)
    assert (res.best_c, res.best_gamma) == (c, g)
    assert res.best_tpt == pytest.approx(v, rel=1e-5)
    assert res.grid.shape == (C, G)
    assert res.grid[c, g - 1].item() == pytest.approx(v, rel=1e-5)


@needs_triton
@pytest.mark.parametrize("C,R,G", [(5, 1, 3), (64, 16, 16), (200, 16, 16), (130, 4, 20)])
def test_tpt_argmax_triton_matches_torch(C, R, G):
    alpha, t_draft = _tpt_case(C + R + G, C, R)
    a = tpt_argmax(alpha, t_draft, 2.0, G, return_grid=True, impl="triton")
    b = tpt_argmax_torch(alpha, t_draft, 2.0, G, return_grid=True)
    assert (a.best_c, a.best_gamma) == (b.best_c, b.best_gamma)
    assert a.best_tpt == pytest.approx(b.best_tpt, rel=1e-6)
    assert torch.allclose(a.grid, b.grid, rtol=1e-6, atol=0)
    assert tpt_argmax(alpha, t_draft, 2.0, G, impl="triton").grid is None


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_tpt_argmax_ties_and_edges(impl):
    C, R, G = 300, 3, 8  # 300 > one Triton block: ties across blocks too
    alpha = torch.full((C, R), 0.5, device=DEV)
    t_draft = torch.ones(C, device=DEV)
    alpha[200] = 0.9  # best row, duplicated later and in another block
    alpha[290] = 0.9
    t_draft[200] = t_draft[290] = 0.3
    res = tpt_argmax(alpha, t_draft, 1.0, G, impl=impl)
    assert res.best_c == 200
    # all-zero acceptance: E = 1 for every gamma, so TPT falls with gamma -> gamma 1, cheapest draft
    z = torch.zeros(6, 2, device=DEV)
    td = torch.tensor([0.5, 0.2, 0.2, 0.9, 0.2, 0.4], device=DEV)
    res = tpt_argmax(z, td, 1.0, 10, impl=impl)
    assert (res.best_c, res.best_gamma) == (1, 1)
    assert res.best_tpt == pytest.approx(2 / 1.2, rel=1e-6)
    # perfect acceptance with a free draft: longest gamma, TPT = R (gamma+1) / t_target
    one = torch.ones(3, 4, device=DEV)
    res = tpt_argmax(one, torch.tensor([1.0, 0.0, 1.0], device=DEV), 2.0, 7, impl=impl)
    assert (res.best_c, res.best_gamma) == (1, 7) and res.best_tpt == pytest.approx(4 * 8 / 2.0)
    # 1-D alpha = one request per candidate
    res = tpt_argmax(torch.tensor([0.1, 0.95], device=DEV), torch.tensor([0.1, 0.1], device=DEV), 1.0, 6, impl=impl)
    assert res.best_c == 1


def test_resolve_impl():
    t = torch.zeros(1)
    assert resolve_impl("torch", t) == "torch"
    with pytest.raises(ValueError):
        resolve_impl("cuda", t)
    want = "triton" if HAS_TRITON and interpret_mode() else "torch"
    assert resolve_impl("auto", t) == want
