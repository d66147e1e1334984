"""Tests for vllm_knapspec.core.latency (pure numpy, fast)."""

import json
import math
import os

import numpy as np
import pytest

from vllm_knapspec.core.latency import COEF_NAMES, PRIOR_RATIOS, LatencyModel, ProfileKey, profile_path
from vllm_knapspec.core.skipset import SkipSet

L = 32
# a known "true" law (seconds), deliberately not the prior's scale or ratios
TRUE = {
    "attn_base_s": 25e-6,
    "attn_per_ctx_token_s": 3e-9,
    "attn_per_query_token_s": 0.1e-6,
    "mlp_base_s": 90e-6,
    "mlp_per_token_s": 0.2e-6,
    "draft_overhead_s": 0.8e-3,
    "draft_overhead_per_token_s": 3e-6,
    "verify_overhead_s": 2e-3,
    "verify_overhead_per_token_s": 4e-6,
}


def true_attn(S, T, c=TRUE):
    return c["attn_base_s"] + c["attn_per_ctx_token_s"] * S + c["attn_per_query_token_s"] * T


def true_mlp(T, c=TRUE):
    return c["mlp_base_s"] + c["mlp_per_token_s"] * T


def true_draft(na, nm, ctx, c=TRUE):
    S, T = float(np.sum(ctx)), len(ctx)
    return na * true_attn(S, T, c) + nm * true_mlp(T, c) + c["draft_overhead_s"] + c["draft_overhead_per_token_s"] * T


def true_verify(ctx, T, c=TRUE):
    S = float(np.sum(ctx))
    return L * (true_attn(S, T, c) + true_mlp(T, c)) + c["verify_overhead_s"] + c["verify_overhead_per_token_s"] * T


def scaled(c, f, names=None):
    return {k: v * f if names is None or k in names else v for k, v in c.items()}


def rel(a, b):
    return abs(a - b) / b


def random_batch(rng):
    R = int(rng.integers(1, 33))
    return rng.integers(100, 20000, size=R)


def probe_set(seed=123, n=40):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ctx = random_batch(rng)
        na, nm = int(rng.integers(L // 2, L + 1)), int(rng.integers(L // 2, L + 1))
        out.append(("draft", na, nm, ctx, None))
        out.append(("verify", None, None, ctx, len(ctx) * int(rng.integers(2, 10))))
    return out


def probe_max_err(model, probes, c):
    errs = []
    for kind, na, nm, ctx, T in probes:
        if kind == "draft":
            errs.append(rel(model.draft_step_time((na, nm), ctx), true_draft(na, nm, ctx, c)))
        else:
            errs.append(rel(model.verify_step_time(ctx, T // len(ctx)), true_verify(ctx, T, c)))
    return max(errs), float(np.median(errs))


def simulate(model, rng, steps, truth_at, noise=0.02, outlier_rate=0.0, gamma=4):
    """Drive the model like an engine: gamma draft steps then one verify, repeated.

    truth_at(i) -> coefficient dict at step i.  Yields (i, kind) after each observation.
    """
    i = 0
    while i < steps:
        ctx = random_batch(rng)
        na, nm = int(rng.integers(L // 2, L + 1)), int(rng.integers(L // 2, L + 1))
        for j in range(gamma + 1):
            c = truth_at(i)
            if j < gamma:
                t = true_draft(na, nm, ctx + j, c)
            else:
                T = len(ctx) * (gamma + 1)
                t = true_verify(ctx, T, c)
            t *= math.exp(noise * rng.standard_normal())
            if outlier_rate and rng.random() < outlier_rate:
                t *= rng.uniform(5, 50)  # GC pause / preemption
            if j < gamma:
                model.observe_draft(na, nm, ctx + j, t)
            else:
                model.observe_verify(ctx, T, t)
            yield i, ("draft" if j < gamma else "verify")
            i += 1
            if i >= steps:
                return


def sublayer_samples(rng, n=400, noise=0.03, outlier_rate=0.0, verify_overhead=False):
    samples = []
    for _ in range(n):
        R = int(rng.integers(1, 65))
        hi = int(np.exp(rng.uniform(np.log(200), np.log(32000))))  # short and long batches
        ctx = rng.integers(16, hi, size=R)
        q = int(rng.choice([1, 2, 5]))
        T = R * q
        for kind, t in (("attn", true_attn(ctx.sum(), T)), ("mlp", true_mlp(T))):
            t *= math.exp(noise * rng.standard_normal())
            if outlier_rate and rng.random() < outlier_rate:
                # mostly stalls, some timer glitches that read far too short
                t *= rng.uniform(10, 100) if rng.random() < 0.7 else rng.uniform(0.01, 0.1)
            samples.append({"kind": kind, "ctx_lens": ctx.tolist(), "num_tokens": T, "seconds": t})
        oh = TRUE["draft_overhead_s"] + TRUE["draft_overhead_per_token_s"] * T
        samples.append({"kind": "overhead", "num_tokens": T, "seconds": oh * math.exp(noise * rng.standard_normal())})
        if verify_overhead:
            ov = TRUE["verify_overhead_s"] + TRUE["verify_overhead_per_token_s"] * T
            samples.append(
                {"kind": "verify_overhead", "num_tokens": T, "seconds": ov * math.exp(noise * rng.standard_normal())}
            )
    return samples


def grid_errors(model):
    """Relative errors over realistic batches: R requests of mean context c, q tokens each."""
    errs = []
    for R in (1, 4, 16, 64):
        for c in (100, 1000, 10_000, 30_000):
            for q in (1, 5):
                S, T = R * c, R * q
                ta, tm = model.sublayer_times(S, T)
                errs += [rel(ta, true_attn(S, T)), rel(tm, true_mlp(T))]
    return np.array(errs)


# ----------------------------------------------------------------------------------------------------
def test_prior_used_when_nothing_observed():
    m = LatencyModel(L)
    c = m.coefficients()
    for name in COEF_NAMES:
        assert c[name] == pytest.approx(PRIOR_RATIOS[name] * 40e-6)
    assert m.source == "prior"
    ta, tm = m.sublayer_times([512])
    assert 1.5 < tm / ta < 2.5  # MLP ≈ 2x attention at short context
    ta_long, _ = m.sublayer_times([200_000])
    assert ta_long > tm  # attention dominates at long context
    assert all(math.isnan(v) for v in m.prediction_error().values())
    assert c["draft_observations"] == 0 and c["verify_observations"] == 0
    # prior steps are self-consistent: skipping makes the draft cheaper than the full model
    full = m.draft_step_time((L, L), [2000] * 4)
    assert m.draft_step_time((L // 2, L // 2), [2000] * 4) < full
    assert m.plain_step_time([2000] * 4) > 0
    # scale-free: another unit changes absolute values, not the ratios the DP uses
    m2 = LatencyModel.prior(L, unit_s=1e-3)
    ta2, tm2 = m2.sublayer_times([512])
    assert tm2 / ta2 == pytest.approx(tm / ta)


def test_attention_grows_with_context_mlp_does_not():
    m = LatencyModel(L, TRUE)
    short, long_ = [1000] * 8, [30000] * 8
    a0, m0 = m.sublayer_times(short)
    a1, m1 = m.sublayer_times(long_)
    assert a1 > 2 * a0
    assert m1 == m0
    # MLP grows (weakly) with tokens, attention with context
    assert m.sublayer_times(short, 64)[1] > m0
    # draft: each kept attention sublayer costs more at long context, an MLP does not
    d_attn = m.draft_step_time((L, L), long_) - m.draft_step_time((L - 8, L), long_)
    d_attn_short = m.draft_step_time((L, L), short) - m.draft_step_time((L - 8, L), short)
    d_mlp = m.draft_step_time((L, L), long_) - m.draft_step_time((L, L - 8), long_)
    d_mlp_short = m.draft_step_time((L, L), short) - m.draft_step_time((L, L - 8), short)
    assert d_attn > 2 * d_attn_short
    assert d_mlp == pytest.approx(d_mlp_short)
    # verify with 1+γ tokens costs more than a plain step; SkipSet and counts agree
    assert m.verify_step_time(short, 5) > m.plain_step_time(short)
    ss = SkipSet(L, frozenset({3, 5}), frozenset({7}))
    assert m.draft_step_time(ss, short) == pytest.approx(m.draft_step_time((L - 2, L - 1), short))
    with pytest.raises(ValueError):
        m.draft_step_time(SkipSet(L + 1), short)
    # exact values against the law
    assert m.draft_step_time((20, 25), short) == pytest.approx(true_draft(20, 25, np.array(short)))
    assert m.verify_step_time(short, 5) == pytest.approx(true_verify(short, 40))


def test_offline_fit_recovers_linear_law():
    rng = np.random.default_rng(0)
    m = LatencyModel(L)
    report = m.fit_sublayers(sublayer_samples(rng, verify_overhead=True))
    errs = grid_errors(m)
    assert np.median(errs) <= 0.05 and errs.max() <= 0.15, errs
    c = m.coefficients()
    assert c["attn_per_ctx_token_s"] == pytest.approx(TRUE["attn_per_ctx_token_s"], rel=0.1)
    assert c["mlp_base_s"] == pytest.approx(TRUE["mlp_base_s"], rel=0.1)
    assert c["draft_overhead_s"] == pytest.approx(TRUE["draft_overhead_s"], rel=0.1)
    assert c["verify_overhead_s"] == pytest.approx(TRUE["verify_overhead_s"], rel=0.1)
    ctx = np.array([3000, 12000, 500])
    assert rel(m.verify_step_time(ctx, 5), true_verify(ctx, 15)) < 0.05
    assert rel(m.draft_step_time((20, 26), ctx), true_draft(20, 26, ctx)) < 0.05
    assert report["attn"]["mdape"] < 0.05 and report["mlp"]["n"] == 400
    assert m.source == "profile"
    assert all(v >= 0 for k, v in c.items() if k in COEF_NAMES)


def test_offline_fit_robust_to_outliers():
    rng = np.random.default_rng(1)
    m = LatencyModel(L)
    m.fit_sublayers(sublayer_samples(rng, outlier_rate=0.05))
    errs = grid_errors(m)
    assert np.median(errs) <= 0.05 and errs.max() <= 0.2, errs


def test_offline_fit_batch1_profile_like_paper():
    """Batch-1 profile (T ≡ 1, as in the paper): intercept/T split keeps the prior ratio."""
    rng = np.random.default_rng(2)
    samples = []
    for n in range(1000, 26000, 1000):
        for _ in range(3):
            samples.append(
                {"kind": "attn", "total_ctx": n, "seconds": true_attn(n, 1) * math.exp(0.01 * rng.standard_normal())}
            )
            samples.append({"kind": "mlp", "seconds": true_mlp(1) * math.exp(0.01 * rng.standard_normal())})
    m = LatencyModel(L)
    m.fit_sublayers(samples)
    for n in (1000, 12000, 25000):
        ta, tm = m.sublayer_times(n, 1)
        assert rel(ta, true_attn(n, 1)) < 0.03 and rel(tm, true_mlp(1)) < 0.03
    c = m.coefficients()
    assert c["attn_per_query_token_s"] / c["attn_base_s"] == pytest.approx(
        PRIOR_RATIOS["attn_per_query_token_s"] / PRIOR_RATIOS["attn_base_s"]
    )
    # overhead was not profiled: rescaled with the attention base, prior ratios kept
    assert c["draft_overhead_s"] / c["attn_base_s"] == pytest.approx(
        PRIOR_RATIOS["draft_overhead_s"] / PRIOR_RATIOS["attn_base_s"], rel=0.02
    )


def test_online_converges_from_prior():
    rng = np.random.default_rng(3)
    m = LatencyModel(L)  # prior: wrong scale and ratios
    probes = probe_set()
    for _ in simulate(m, rng, 600, lambda i: TRUE):
        pass
    worst, med = probe_max_err(m, probes, TRUE)
    assert med <= 0.03 and worst <= 0.10, (med, worst)
    err = m.prediction_error()
    assert err["draft"] <= 0.05 and err["verify"] <= 0.05, err


def test_online_robust_to_outliers():
    rng = np.random.default_rng(4)
    m = LatencyModel(L)
    m.fit_sublayers(sublayer_samples(np.random.default_rng(5), n=100))
    probes = probe_set()
    n_out = 0
    for _ in simulate(m, rng, 1500, lambda i: TRUE, outlier_rate=0.05):
        n_out += 1
    worst, med = probe_max_err(m, probes, TRUE)
    assert med <= 0.05 and worst <= 0.10, (med, worst)
    assert m.regime_changes == 0  # isolated spikes are not a new regime
    err = m.prediction_error()
    assert err["draft"] <= 0.05 and err["verify"] <= 0.05, err


def _steps_to_adapt(m, rng, new_truth, change_at=400, total=800, tol=0.10):
    probes = probe_set()

    def truth(i):
        return TRUE if i < change_at else new_truth

    last_bad = None
    for i, _ in simulate(m, rng, total, truth):
        if i < change_at:
            continue
        worst, _ = probe_max_err(m, probes, new_truth)
        if worst > tol:
            last_bad = i
    assert last_bad is None or last_bad < total - 100  # settled well before the end
    return 0 if last_bad is None else last_bad - change_at + 1


ADAPT_BOUND = 20  # observations after a uniform x2 change until every probe is within 10 %


@pytest.mark.parametrize("seed,start", [(6, "prior"), (16, "profile")])
def test_online_adapts_to_uniform_slowdown(seed, start):
    rng = np.random.default_rng(seed)
    m = LatencyModel(L)
    if start == "profile":
        m.fit_sublayers(sublayer_samples(np.random.default_rng(seed + 1), n=100))
    before = m.regime_changes
    steps = _steps_to_adapt(m, rng, scaled(TRUE, 2.0))
    assert 0 < steps <= ADAPT_BOUND, steps
    assert m.regime_changes > before


def test_online_adapts_to_uniform_speedup_with_outliers():
    rng = np.random.default_rng(7)
    m = LatencyModel(L)
    probes = probe_set()
    new = scaled(TRUE, 0.5)
    for i, _ in simulate(m, rng, 900, lambda i: TRUE if i < 400 else new, outlier_rate=0.03):
        pass
    worst, med = probe_max_err(m, probes, new)
    assert worst <= 0.10 and med <= 0.05, (worst, med)


def test_online_adapts_to_attention_only_slowdown():
    """Non-uniform change (e.g. a slower attention backend): RLS must re-split the costs."""
    rng = np.random.default_rng(8)
    m = LatencyModel(L)
    names = {"attn_base_s", "attn_per_ctx_token_s", "attn_per_query_token_s"}
    steps = _steps_to_adapt(m, rng, scaled(TRUE, 3.0, names), total=900)
    assert steps <= 200, steps  # observed 49-154 over 30 seeds


def test_outlier_bursts_are_not_a_regime_change():
    """Bursts of 3 consecutive huge steps (GC storm / preemption) every 97 steps."""
    rng = np.random.default_rng(11)
    m = LatencyModel(L)
    m.fit_sublayers(sublayer_samples(np.random.default_rng(12), n=100))
    probes = probe_set()
    ctx = random_batch(rng)
    for i in range(1200):
        if i % 5 == 0:
            ctx = random_batch(rng)
            na, nm = int(rng.integers(L // 2, L + 1)), int(rng.integers(L // 2, L + 1))
        burst = i % 97 in (50, 51, 52)
        f = rng.uniform(3, 30) if burst else math.exp(0.02 * rng.standard_normal())
        if i % 5 < 4:
            m.observe_draft(na, nm, ctx, true_draft(na, nm, ctx) * f)
        else:
            m.observe_verify(ctx, 5 * len(ctx), true_verify(ctx, 5 * len(ctx)) * f)
        if i > 300 and i % 97 == 53:  # right after a burst
            worst, med = probe_max_err(m, probes, TRUE)
            assert worst <= 0.10 and med <= 0.05, (i, worst, med)
    baseline = m.regime_changes
    assert baseline <= 1  # at most the initial verify-overhead fix


def test_bad_measurements_ignored():
    m = LatencyModel(L, TRUE)
    before = m.coefficients()
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        m.observe_draft(20, 20, [1000], bad)
        m.observe_verify([1000], 5, bad)
    after = m.coefficients()
    assert all(before[n] == after[n] for n in COEF_NAMES)
    assert after["draft_observations"] == 0


def test_gradual_drift_tracked():
    rng = np.random.default_rng(9)
    m = LatencyModel(L)
    probes = probe_set()

    def f(i):  # +50 % over 1000 steps
        return 1.0 if i < 300 else min(1.5, 1.0 + (i - 300) / 1000)

    for i, _ in simulate(m, rng, 1500, lambda i: scaled(TRUE, f(i))):
        if i > 400 and i % 25 == 0:
            worst, _ = probe_max_err(m, probes, scaled(TRUE, f(i)))
            assert worst <= 0.10, (i, worst)


def test_adapt_false_only_records_errors():
    m = LatencyModel(L, TRUE, adapt=False)
    before = m.coefficients()
    ctx = np.array([1000, 2000])
    m.observe_draft(20, 30, ctx, 2 * true_draft(20, 30, ctx))
    m.observe_verify(ctx, 10, true_verify(ctx, 10))
    after = m.coefficients()
    assert all(before[n] == after[n] for n in COEF_NAMES)
    err = m.prediction_error()
    assert err["draft"] == pytest.approx(0.5) and err["verify"] == pytest.approx(0.0, abs=1e-12)


def test_fit_draft_steps_recovers_law_from_whole_steps():
    """Whole draft steps with random skip sets (2 % noise, a few wild timings) pin down the per-sublayer
    law, including the attention/MLP split the DP weights come from."""
    rng = np.random.default_rng(7)
    samples = []
    for _ in range(150):
        ctx = random_batch(rng)
        na, nm = int(rng.integers(0, L + 1)), int(rng.integers(0, L + 1))
        sec = true_draft(na, nm, ctx) * (1 + 0.02 * rng.standard_normal())
        if rng.random() < 0.03:
            sec *= 5  # a GC pause
        samples.append(dict(n_attn_kept=na, n_mlp_kept=nm, ctx_lens=ctx, seconds=sec))
    m = LatencyModel(L, scaled(TRUE, 0.3))  # a sublayer fit 3x too cheap
    report = m.fit_draft_steps(samples)
    assert report["n"] == 150 and report["mdape"] < 0.03
    for ctx in (np.array([512]), np.array([8000] * 16)):
        assert rel(m.draft_step_time((20, 25), ctx), true_draft(20, 25, ctx)) < 0.03
        t_attn, t_mlp = m.sublayer_times(ctx)
        assert rel(t_attn, true_attn(ctx.sum(), len(ctx))) < 0.15 and rel(t_mlp, true_mlp(len(ctx))) < 0.15
    assert m.coefficients()["verify_overhead_s"] == pytest.approx(0.3 * TRUE["verify_overhead_s"])
    with pytest.raises(ValueError, match="at least"):
        m.fit_draft_steps(samples[:5])


def test_observe_draft_multi_step_matches_sum():
    m = LatencyModel(L, TRUE, adapt=False)
    ctx = np.array([1000, 5000, 7])
    total = sum(true_draft(20, 28, ctx + j) for j in range(6))
    pred = m.observe_draft(20, 28, ctx, total, num_steps=6)
    assert pred == pytest.approx(total, rel=1e-12)


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(10)
    key = ProfileKey.make("meta-llama/Llama-3.1-8B-Instruct", "NVIDIA H100 80GB HBM3", "torch.bfloat16", 2)
    m = LatencyModel(L, key=key)
    for _ in simulate(m, rng, 200, lambda i: TRUE):
        pass
    path = profile_path(tmp_path, key.model, key.device, "torch.bfloat16", 2)
    name = os.path.basename(path)
    assert "/" not in name and " " not in name and name.endswith(".json")
    assert "bfloat16" in name and "tp2" in name and "torch" not in name
    assert profile_path(tmp_path, "org/m", "d", "fp16", 1) != profile_path(tmp_path, "org_m", "d", "fp16", 1)
    m.save(path)
    json.load(open(path))  # plain JSON
    m2 = LatencyModel.load(path, expect_key=key)
    assert m2.key == key and m2.num_layers == L
    c1, c2 = m.coefficients(), m2.coefficients()
    for n in COEF_NAMES:
        assert c2[n] == pytest.approx(c1[n], rel=1e-12)
    ctx = [4000, 100, 9000]
    assert m2.draft_step_time((20, 25), ctx) == pytest.approx(m.draft_step_time((20, 25), ctx))
    with pytest.raises(ValueError):
        LatencyModel.load(path, expect_key=ProfileKey.make(key.model, key.device, "float16", 2))
    m3 = LatencyModel.load_or_prior(tmp_path, key.model, key.device, "torch.bfloat16", 2, L)
    assert m3.coefficients()["attn_base_s"] == pytest.approx(c1["attn_base_s"])
    m4 = LatencyModel.load_or_prior(tmp_path, key.model, key.device, "float16", 2, L)
    assert m4.source == "prior"


def test_roofline_prior_is_sane():
    m = LatencyModel.from_model_shape(32, 4096, 14336, 32, 8, vocab_size=128256)
    ta, tm = m.sublayer_times([512])
    assert 1.5 < tm / ta < 6
    assert 1e-5 < ta < 1e-3 and 1e-5 < tm < 1e-3


def test_fit_draft_steps_prior_keeps_context_slope_from_few_noisy_steps():
    """The profiler's quick grid (2 contexts x 2 batches x 4 skip sets, 10 % timing noise) barely separates seven
    coefficients: without the sublayer fit as a prior the per-context-token attention cost is sometimes fitted to 0
    (CI saw it once); with it, never, and whole steps are predicted better."""
    sub = {
        "attn_base_s": 4.8e-4,
        "attn_per_ctx_token_s": 1.5e-7,
        "attn_per_query_token_s": 2.8e-4,
        "mlp_base_s": 7.0e-4,
        "mlp_per_token_s": 1.8e-4,
        "draft_overhead_s": 3.2e-3,
        "draft_overhead_per_token_s": 8.8e-4,
    }  # a CPU sublayer fit of SmolLM2 (30 layers)
    true = dict(sub, attn_base_s=6e-4, mlp_base_s=8e-4, attn_per_ctx_token_s=1.2e-7)  # whole steps cost more
    n_layers, res = 30, {}
    for name, ps in (("none", 0.0), ("prior", None)):
        zeros, errs = 0, []
        for seed in range(60):
            rng = np.random.default_rng(seed)
            m = LatencyModel(n_layers, {k: v * (1 + 0.1 * rng.standard_normal()) for k, v in sub.items()})
            samples, probes = [], []
            for n in (512, 2048):
                for B in (1, 2):
                    for _ in range(4):
                        na, nm = (int(x) for x in rng.integers(0, n_layers + 1, 2))
                        sec = true_draft(na, nm, [n] * B, true) * (1 + 0.1 * rng.standard_normal())
                        samples.append(dict(n_attn_kept=na, n_mlp_kept=nm, ctx_lens=[n] * B, seconds=sec))
                        probes.append((int(rng.integers(0, n_layers + 1)), int(rng.integers(0, n_layers + 1)), n, B))
            m.fit_draft_steps(samples, prior_sigma=ps)
            zeros += m.coefficients()["attn_per_ctx_token_s"] == 0
            errs += [
                rel(m.draft_step_time((na, nm), [n] * B), true_draft(na, nm, [n] * B, true)) for na, nm, n, B in probes
            ]
        res[name] = zeros, float(np.median(errs))
    assert res["none"][0] > 0 and res["prior"][0] == 0, res
    assert res["prior"][1] < res["none"][1], res


# draft-model coefficients as the live CPU engine had them (SmolLM2, 30 layers), seconds
CPU_LIVE = dict(zip(COEF_NAMES, [4.23e-4, 5.78e-7, 1.40e-5, 2.02e-3, 2.06e-4, 2.37e-2, 2.84e-3, 7e-3, 5e-4]))


@pytest.mark.parametrize("seed", range(8))
def test_an_update_never_moves_its_own_prediction_away_from_the_measurement(seed):
    """The live CPU stream's shape: the skip set barely changes (n_attn / n_mlp jitter by a few), noise
    is 25 %, P is wide open (as after a regime change) and the steps measure half the prediction.
    The non-negativity constraint binds; clipping after an unconstrained step (the old update) moved
    the step's own prediction away from its measurement in 7 of these 8 seeds and left predictions
    climbing 2x above steps that all measured below them. Every update must move its own step's
    prediction toward the measurement, and the model must settle near the truth."""
    rng = np.random.default_rng(seed)
    m, truth = LatencyModel(30, CPU_LIVE, source="prior"), LatencyModel(30, CPU_LIVE)
    ctx, errs = rng.integers(10, 14, size=8), []
    for i in range(70):
        ctx = ctx + 1
        na, nm = int(rng.integers(19, 24)), int(rng.integers(14, 18))
        true = truth.draft_step_time((na, nm), ctx) * 0.5
        y = true * math.exp(0.25 * rng.standard_normal())
        before = m.observe_draft(na, nm, ctx, y)
        after = m.draft_step_time((na, nm), ctx)
        assert abs(after - y) <= abs(before - y) * (1 + 1e-9), (i, before, after, y)
        errs.append(abs(before / true - 1))
    assert np.median(errs[30:]) < 0.15, np.median(errs[30:])
