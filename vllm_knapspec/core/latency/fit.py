"""Offline fits of the cost law from timed samples (knapspec-profile).

Offline: :meth:`LatencyModel.fit_sublayers` fits the sublayer coefficients from profiler samples
with a robust (Huber-IRLS on relative residuals), non-negative least-squares fit.
:meth:`LatencyModel.fit_draft_steps` fits the draft-step law on whole timed draft steps, with the sublayer fit as
its prior.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from vllm_knapspec.core.latency.law import (
    _A_ATTN,
    _A_MLP,
    _B_ATTN,
    _B_MLP,
    _C_ATTN,
    _D,
    _OD0,
    _OD1,
    _OV0,
    _OV1,
    COEF_NAMES,
    PRIOR_RATIOS,
    _ctx_stats,
)

# Relative sd of the sublayer fit as a prior for the whole-step fit: what a step adds between its
# sublayers is per-step and per-sublayer overhead (caches, OpenMP wake-ups, allocator: up to ~1.5x on
# a 2-core CPU), not per-context-token work, so the context slope measured sublayer by sublayer is
# trusted more than the intercepts.
STEP_FIT_PRIOR_SIGMA = {
    "attn_per_ctx_token_s": 0.25,
    "attn_base_s": 1.0,
    "attn_per_query_token_s": 1.0,
    "mlp_base_s": 1.0,
    "mlp_per_token_s": 1.0,
    "draft_overhead_s": 1.0,
    "draft_overhead_per_token_s": 1.0,
}


def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares for a few columns (≤ ~6): best feasible subset solve."""
    n = A.shape[1]
    best, best_res = np.zeros(n), float(b @ b)
    for mask in range(1, 1 << n):
        cols = [j for j in range(n) if mask >> j & 1]
        sol, *_ = np.linalg.lstsq(A[:, cols], b, rcond=None)
        if np.any(sol < 0):
            continue
        r = b - A[:, cols] @ sol
        res = float(r @ r)
        if res < best_res - 1e-15 * max(1.0, best_res):
            best_res, best = res, np.zeros(n)
            best[cols] = sol
    return best


def _robust_nnls(
    X: np.ndarray,
    y: np.ndarray,
    iters: int = 30,
    k: float = 1.345,
    trials: int = 64,
    prior: tuple[np.ndarray, float] | None = None,
) -> np.ndarray:
    """Robust θ ≥ 0 for y ≈ Xθ with relative errors: min Σ ρ_Huber((y - Xθ)/(Xθ) / σ).

    Start: least median of relative residuals over random minimal subsets plus the plain
    relative-error NNLS (a few wild samples, e.g. timer glitches reading 100x too short, would
    dominate a 1/y-weighted start).  Then IRLS with Huber weights on the residual relative to the
    prediction and σ = 1.4826·MAD.
    prior = (θ0, s): a Gaussian prior θ_j/θ0_j - 1 ~ N(0, s_j²) on each θ0_j > 0 (s: one sd per column
    or one for all), added to the IRLS solves as rows of weight σ/s_j (the samples' noise against the
    prior's), so a coefficient the
    samples barely identify stays near θ0 instead of jumping to 0, and plenty of good samples
    still outweigh a wrong θ0.
    """
    n, p = X.shape
    rng = np.random.default_rng(0)  # deterministic
    ry = 1.0 / np.maximum(y, 1e-12)
    cands = [_nnls(X * ry[:, None], np.ones(n))]
    if n > p:
        for _ in range(trials):
            idx = rng.choice(n, size=p, replace=False)
            cands.append(_nnls(X[idx] * ry[idx, None], np.ones(p)))
    floor = 1e-6 * float(np.median(y))
    if prior is not None:
        th0, s = prior
        pj = np.flatnonzero(th0 > 0)
        P = np.zeros((pj.size, p))
        P[np.arange(pj.size), pj] = 1.0 / th0[pj]
        ps = np.broadcast_to(np.asarray(s, dtype=np.float64), (p,))[pj]
        cands.append(np.where(th0 > 0, th0, 0.0))

    def med_rel(th):
        pred = np.maximum(X @ th, floor)
        return float(np.median(np.abs(y - pred) / pred))

    theta = min(cands, key=med_rel)
    for _ in range(iters):
        pred = np.maximum(X @ theta, floor)
        e = (y - pred) / pred
        sigma = max(1.4826 * float(np.median(np.abs(e))), 1e-4)
        a = np.abs(e) / sigma
        w = np.where(a <= k, 1.0, k / np.maximum(a, 1e-12))
        sw = np.sqrt(w) / pred
        A, b = X * sw[:, None], y * sw
        if prior is not None:
            A, b = np.vstack([A, P * (sigma / ps)[:, None]]), np.concatenate([b, sigma / ps])
        new = _nnls(A, b)
        done = np.allclose(new, theta, rtol=1e-7, atol=0.0)
        theta = new
        if done:
            break
    return theta


class OfflineFit:
    """LatencyModel's offline fits (mixin)."""

    def fit_sublayers(self, samples: Iterable[Mapping]) -> dict:
        """Robust non-negative least-squares fit of the sublayer (and optionally overhead) law.

        Each sample is a mapping with
          kind: "attn" | "mlp" (one decoder layer's sublayer) | "overhead" (the non-layer part of
                a draft step: embedding, final norm, lm_head, sampling; fitted as od0 + od1·T) |
                "verify_overhead" (same for a verify step; if absent, ov0 = 2·od0 and ov1 = od1 as
                in the prior);
          ctx_lens (per-request list) or total_ctx (number): KV tokens read (attention only);
          num_tokens: query tokens (default: number of requests, else 1);
          seconds: measured time.
        Features that do not vary across the samples (e.g. a batch-1 profile has T ≡ 1) cannot be
        separated from the intercept: their coefficient keeps its current ratio to the intercept.
        Kinds without samples keep their values; if the overhead was never fitted it is rescaled
        with the attention base so the prior's ratios hold.  Resets the online state.
        Returns {"attn": {...}, "mlp": {...}, ...} with the fitted values, n and the median abs
        relative residual ("mdape") per kind.
        """
        rows = {"attn": [], "mlp": [], "overhead": [], "verify_overhead": []}
        for s in samples:
            kind = s["kind"]
            if kind not in rows:
                raise ValueError(f"unknown sample kind {kind!r}")
            if "ctx_lens" in s and s["ctx_lens"] is not None:
                S, R = _ctx_stats(s["ctx_lens"])
            else:
                S, R = float(s.get("total_ctx", 0.0)), 1
            T = float(s["num_tokens"]) if s.get("num_tokens") is not None else float(R)
            sec = float(s["seconds"])
            if not (sec > 0 and math.isfinite(sec)):
                continue
            rows[kind].append((S, T, sec))
        old = self._theta.copy()
        out = {}
        spec = {
            "attn": ((_A_ATTN, None), (_B_ATTN, 0), (_C_ATTN, 1)),
            "mlp": ((_A_MLP, None), (_B_MLP, 1)),
            "overhead": ((_OD0, None), (_OD1, 1)),
            "verify_overhead": ((_OV0, None), (_OV1, 1)),
        }
        for kind, cols in spec.items():
            if not rows[kind]:
                continue
            data = np.asarray(rows[kind], dtype=np.float64)  # columns S, T, seconds
            y = data[:, 2]
            intercept = cols[0][0]
            var_cols, const_cols = [], []
            for j, feat in cols[1:]:
                v = data[:, feat]
                (var_cols if np.ptp(v) > 1e-9 * max(1.0, abs(v).max()) else const_cols).append((j, v))
            X = np.column_stack([np.ones_like(y)] + [v for _, v in var_cols])
            sol = _robust_nnls(X, y)
            # split the merged intercept A = a + Σ c_j v_j by the current ratios ρ_j = c_j / a
            a_old = old[intercept]
            rho = {j: (old[j] / a_old if a_old > 0 else 0.0) for j, _ in const_cols}
            denom = 1.0 + sum(rho[j] * v[0] for j, v in const_cols)
            a = sol[0] / denom
            self._theta[intercept] = a
            for j, _ in const_cols:
                self._theta[j] = rho[j] * a
            for (j, _), c in zip(var_cols, sol[1:]):
                self._theta[j] = c
            pred = X @ sol
            res = np.abs(pred - y) / y
            out[kind] = {COEF_NAMES[j]: float(self._theta[j]) for j, _ in cols}
            out[kind].update(n=int(y.size), mdape=float(np.median(res)))
        if rows["overhead"] and not rows["verify_overhead"]:
            self._theta[_OV0] = self._theta[_OD0] * (
                PRIOR_RATIOS["verify_overhead_s"] / PRIOR_RATIOS["draft_overhead_s"]
            )
            self._theta[_OV1] = self._theta[_OD1]
        elif not rows["overhead"] and rows["attn"] and old[_A_ATTN] > 0:
            g = self._theta[_A_ATTN] / old[_A_ATTN]
            for j in (_OD0, _OD1) + (() if rows["verify_overhead"] else (_OV0, _OV1)):
                self._theta[j] = old[j] * g
        self.source = "profile"
        self._reset_online()
        return out

    def fit_draft_steps(
        self, samples: Iterable[Mapping], prior_sigma: Mapping[str, float] | float | None = None
    ) -> dict:
        """Robust non-negative fit of the draft-step law on whole draft steps.

        Sublayers timed one by one (fit_sublayers) miss what a real step adds between them: on a
        2-core CPU a whole eager step costs up to ~1.5x the sum of its isolated sublayers (caches,
        OpenMP wake-ups, allocator), and the gap depends on batch and context.  Fitting the same
        additive law on whole steps with random skip sets keeps the per-sublayer form the DP needs
        and prices the sublayers as they run inside a step.  Each sample: n_attn_kept, n_mlp_kept,
        ctx_lens (per request), seconds.  Verify-side coefficients are left as they are.
        The current coefficients (the sublayer fit) are the prior, with relative sd prior_sigma (per
        coefficient name or one for all; 0 or absent: no prior; default STEP_FIT_PRIOR_SIGMA): 16
        noisy steps barely separate seven coefficients, and without it a term the sublayer timings
        measure clearly (the per-context-token attention cost) can be fitted to 0.
        Returns the fitted draft coefficients with n and the in-sample median |relative residual|.
        """
        cols = (_A_ATTN, _B_ATTN, _C_ATTN, _A_MLP, _B_MLP, _OD0, _OD1)
        X, y = [], []
        for s in samples:
            sec = float(s["seconds"])
            if not (sec > 0 and math.isfinite(sec)):
                continue
            S, R = _ctx_stats(s["ctx_lens"])
            X.append(
                self._draft_features(int(s["n_attn_kept"]), int(s["n_mlp_kept"]), S, float(R), np.empty(_D))[list(cols)]
            )
            y.append(sec)
        if len(y) < 2 * len(cols):
            raise ValueError(f"fit_draft_steps needs at least {2 * len(cols)} timed steps, got {len(y)}")
        X, y = np.asarray(X), np.asarray(y)
        # Scale columns to O(1) so the NNLS subset solves are well conditioned (S·n_attn ~ 1e5).
        scale = np.maximum(np.abs(X).max(0), 1e-12)
        ps = STEP_FIT_PRIOR_SIGMA if prior_sigma is None else prior_sigma
        ps = np.array([ps.get(COEF_NAMES[j], 0.0) if isinstance(ps, Mapping) else ps for j in cols], float)
        th0 = np.where(ps > 0, self._theta[list(cols)], 0.0) * scale
        prior = (th0, np.where(ps > 0, ps, 1.0)) if np.any(th0 > 0) else None
        sol = _robust_nnls(X / scale, y, prior=prior) / scale
        for j, c in zip(cols, sol):
            self._theta[j] = c
        self.source = "profile"
        self._reset_online()
        out = {COEF_NAMES[j]: float(self._theta[j]) for j in cols}
        out.update(n=int(y.size), mdape=float(np.median(np.abs(X @ sol - y) / y)))
        return out
