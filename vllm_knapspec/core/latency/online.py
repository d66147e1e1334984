"""Online refit of the cost law from live step timings.

Online: :meth:`LatencyModel.observe_draft` / :meth:`LatencyModel.observe_verify` run recursive
least squares with forgetting on live step timings.  Details:

* Relative errors: each observation is normalised by its prediction, so the state is in
  dimensionless "fraction of the step" units and a 2 ms and a 20 ms step weigh the same.
  Internally θ = θ_ref ⊙ φ and RLS runs on φ (all O(1)), which keeps P well conditioned although
  the raw coefficients span 1e-9 … 1e-3 s.
* Robustness: the relative residual is compared with k·σ, σ a robust running scale of the
  residuals (EWMA of |residual|, separately for draft and verify; an outlier enters it as k·σ at a
  quarter of the rate).  A larger residual is clipped to ±k·σ before the update (Huber ψ), so one
  GC pause or preemption moves θ by at most a few σ·gain.
* Regime change: a sustained shift is not a run of outliers but a new regime (hardware got
  slower/faster, clocks throttled, another tenant arrived, the prior was for another model).  An
  EWMA of the clipped residuals in σ units (shared by draft and verify) detects it after ~4
  saturated residuals of one sign; isolated spikes add at most α·k and never reach the threshold.
  The last 5 measured/predicted ratios must also agree, which a burst of GC pauses does not.
  Then θ is multiplied by their median and P is re-inflated, so a uniform ×2 slowdown is absorbed
  within a handful of steps and a non-uniform one is finished off by RLS.
* Two time scales.  A uniform speed change (clocks, contention, another tenant) moves θ along
  itself, so the overall scale is modelled as a random walk: process noise Q = q·φφᵀ is added to
  P before each update, with q = (1-λ)²/λ so that the steady-state gain along φ is 1-λ, i.e. the
  scale is tracked like exponential forgetting with λ = ``forgetting`` (0.97, memory ~33 steps).
  The shape (ratios between coefficients) uses directional forgetting (Kulhavý) with λ_s =
  ``shape_forgetting`` (0.995): information is discounted only along the direction an observation
  re-measures, so directions that the traffic does not excite (a frozen skip set leaves the
  attention/MLP split unobserved; a constant batch makes T collinear with the intercept) neither
  wind up P nor drift with noise; they keep what the profile or earlier traffic established.
  Plain exponential forgetting at 0.97 on all of θ would fit the live stream but let those weak
  directions wander by 10-25 % within a few hundred steps (worst-case predictions off by that much
  under a slow drift).  P's diagonal is clamped as a safety net (a diagonal congruence
  keeps P positive definite).  θ ≥ 0: a step whose posterior mean leaves the orthant takes the
  mean conditioned on those coordinates being 0, so correlated coordinates move back with them.
* O(d²) per update with d = 9, into preallocated buffers.
"""

from __future__ import annotations

import math

import numpy as np

from vllm_knapspec.core.latency.law import _A_ATTN, _B_ATTN, _D, _PRIOR_SOURCES, _ctx_stats, _tokens


class _Robust:
    """Per-kind robust residual state and the (pred, meas) window."""

    def __init__(self, window: int, s0: float):
        self.s = s0  # robust EWMA of |relative residual|
        self.pred = np.zeros(window)
        self.meas = np.zeros(window)
        self.n = 0  # observations seen

    def record(self, pred: float, meas: float):
        i = self.n % self.pred.size
        self.pred[i] = pred
        self.meas[i] = meas
        self.n += 1

    def mdape(self) -> float:
        m = min(self.n, self.pred.size)
        if m == 0:
            return float("nan")
        p, y = self.pred[:m], self.meas[:m]
        return float(np.median(np.abs(p - y) / np.maximum(y, 1e-12)))


class OnlineRefit:
    """LatencyModel's online refit (mixin)."""

    def _init_online(self):
        """RLS state and its buffers (allocated once)."""
        # RLS hyper-parameters (in φ units: fractions of the step time)
        # P is in units of the observation noise variance of a relative residual (~(3 %)²), so
        # diag 100 ≈ ±30-40 % prior std per coefficient and 4 ≈ ±6-8 %.
        self._p0_prior = 100.0  # initial diag(P) when θ is the prior (shape largely unknown)
        self._p0_fitted = 4.0  # initial diag(P) when θ comes from a profile / saved model
        self._p_max = 100.0  # anti-windup clamp on diag(P)
        self._p_reset = 100.0  # diag(P) after a regime change
        self._s0 = 0.04  # initial robust residual scale (relative, EWMA of |e|)
        self._s_min = 0.002  # floor: timing jitter below 0.2 % is not trusted
        self._eta = 0.05  # EWMA rate of the residual scale
        # buffers (allocated once)
        self._x = np.zeros(_D)
        self._z = np.zeros(_D)
        self._pz = np.zeros(_D)
        self._outer = np.zeros((_D, _D))
        self._robust = {"draft": _Robust(self.window, self._s0), "verify": _Robust(self.window, self._s0)}
        self._logr = np.zeros(5)  # last log(measured/predicted), for the regime detector
        self.regime_changes = 0
        self._reset_online()

    def _reset_online(self):
        # reference scale of θ for the normalised RLS coordinates (φ = θ / ref); floors keep a
        # coefficient that is 0 now learnable.
        floor = 0.05 * self.prior_coefficients_array(max(self._theta[_A_ATTN], 1e-7))
        self._ref = np.maximum(self._theta, floor)
        self._phi = self._theta / self._ref
        prior_like = self.source in _PRIOR_SOURCES
        self._P = np.eye(_D) * (self._p0_prior if prior_like else self._p0_fitted)
        for r in self._robust.values():
            r.s = self._s0
        self._drift = 0.0
        self._n_ratios = 0

    def observe_draft(
        self,
        n_attn_kept: int,
        n_mlp_kept: int,
        ctx_lens,
        seconds: float,
        num_steps: int = 1,
        num_reqs: int | None = None,
    ) -> float:
        """Feed the measured wall time of `num_steps` consecutive draft steps (1 token per request,
        `ctx_lens` at the first of them).  Returns the prediction made before the update (seconds)."""
        S, R = _ctx_stats(ctx_lens, num_reqs)
        x = self._draft_features(n_attn_kept, n_mlp_kept, S, float(R), self._x)
        if num_steps != 1:
            x[_B_ATTN] += n_attn_kept * R * (num_steps - 1) / 2.0  # contexts grow by 1 per step
            x *= num_steps
        return self._observe("draft", x, float(seconds))

    def observe_verify(self, ctx_lens, num_tokens, seconds: float, num_reqs: int | None = None) -> float:
        """Feed the measured time of one full-model step over `num_tokens` query tokens (total, or a
        per-request sequence); a plain decode step is num_tokens = number of requests.  Returns the
        prediction made before the update (seconds)."""
        S, R = _ctx_stats(ctx_lens, num_reqs)
        T = _tokens(num_tokens, 1 if np.isscalar(num_tokens) else R)  # a number is the total
        x = self._verify_features(S, T, self._x)
        return self._observe("verify", x, float(seconds))

    def _observe(self, kind: str, x: np.ndarray, y: float) -> float:
        yhat = float(x @ self._theta)
        if not (y > 0 and math.isfinite(y)):
            return yhat
        rb = self._robust[kind]
        rb.record(yhat, y)
        if not self.adapt:
            return yhat
        scale = max(yhat, 1e-3 * y, 1e-12)
        e = y / scale - 1.0  # relative residual
        sigma = max(1.25 * rb.s, self._s_min)  # E|e| -> σ for a normal law
        thr = self.huber_k * sigma
        e_used = min(max(e, -thr), thr)  # Huber: bounded influence
        # regime detector: EWMA of the clipped residual in σ units (shared by draft and verify).
        # Isolated spikes add at most α·k; a level shift keeps adding k and crosses h after ~4
        # observations (k=3, α=0.25, h=2).  A burst of spikes can cross h too, so a regime change
        # also needs the last 5 measured/predicted ratios to agree (4 of 5 within ±max(3σ, 10 %)
        # in log space); GC pauses / preemptions give wildly different ratios.
        lr = self._logr
        lr[self._n_ratios % lr.size] = math.log(y / scale)
        self._n_ratios += 1
        self._drift += self.regime_alpha * (e_used / sigma - self._drift)
        if abs(self._drift) > self.regime_threshold and self._n_ratios >= lr.size:
            g_log = float(np.median(lr))
            tol = max(thr, 0.1)
            if g_log * self._drift > 0 and int(np.count_nonzero(np.abs(lr - g_log) <= tol)) >= lr.size - 1:
                self._regime_change(math.exp(g_log))
                return yhat
        # robust scale: an outlier counts as thr and at a quarter of the rate, so a level shift
        # cannot inflate σ faster than the regime detector above can see it
        rb.s += self._eta * ((abs(e) - rb.s) if abs(e) <= thr else 0.25 * (thr - rb.s))
        # RLS on φ with z = x ⊙ ref / scale, so that z·φ = yhat / scale = 1 and the target is y/scale.
        z, pz, P = self._z, self._pz, self._P
        # (1) time update: the overall speed is a random walk.  A uniform change (clocks,
        # contention, another tenant) multiplies θ by (1+δ), i.e. moves φ along φ itself, so the
        # process noise is Q = q·φφᵀ.  Since z·φ = 1, every observation measures δ with unit
        # information, and q = (1-λ)²/λ makes the steady-state gain along φ equal to 1-λ: the
        # scale is tracked like exponential forgetting with λ = `forgetting` (memory ~1/(1-λ)).
        np.outer(self._phi, self._phi, out=self._outer)
        self._outer *= self._q_scale
        P += self._outer
        # (2) measurement update with directional forgetting (Kulhavý) for the SHAPE: information
        # is discounted by λ_shape only along the direction z that this observation re-measures, so
        # directions the traffic does not excite (the attention/MLP split while the skip set is
        # frozen, T vs 1 at a constant batch) neither wind up nor drift with noise.  Information
        # form: R ← R + ε·z zᵀ, ε = λ_s - (1-λ_s)/(zᵀPz).
        np.multiply(x, self._ref, out=z)
        z /= scale
        r = self._constrained_step(z, e_used)
        if r > 1e-12:
            lam = self.shape_forgetting
            coef = (lam - (1.0 - lam) / r) / (lam * (1.0 + r))  # = ε / (1 + ε r)
            np.outer(pz, pz, out=self._outer)
            self._outer *= coef
            P -= self._outer
        self._clamp_P()
        np.multiply(self._phi, self._ref, out=self._theta)
        return yhat

    def _constrained_step(self, z: np.ndarray, e: float) -> float:
        """RLS measurement step for φ ≥ 0: the posterior mean projected onto φ ≥ 0 in the posterior's
        own metric (the mean conditional on the coordinates that would go negative being 0).  Leaves
        P·z in self._pz and returns r = zᵀ·P·z.  Clipping φ at 0 after the unconstrained step is not
        enough: P correlates the coefficients (attention vs MLP trade off when the skip set barely
        changes), so the step that takes one below 0 raises another, and the clip then undoes only the
        first half - this very step's prediction moved AWAY from its measurement (seen live on CPU:
        predictions climbing 2x while every step measured below them).  Conditioning moves the
        correlated coordinates back with it."""
        P, pz, phi = self._P, self._pz, self._phi
        np.dot(P, z, out=pz)
        r = float(z @ pz)
        mu = phi + pz * (e / (1.0 + r))
        fixed = mu < 0.0
        if fixed.any():
            S = P - np.outer(pz, pz) / (1.0 + r)  # posterior covariance
            for _ in range(mu.size):
                free = ~fixed
                S_aa = S[np.ix_(fixed, fixed)] + 1e-12 * np.eye(int(fixed.sum()))
                cond = mu.copy()
                cond[free] -= S[np.ix_(free, fixed)] @ np.linalg.solve(S_aa, mu[fixed])
                cond[fixed] = 0.0
                more = free & (cond < 0.0)
                if not more.any():
                    break
                fixed |= more
            mu = np.maximum(cond, 0.0)
        phi[:] = mu
        return r

    def _clamp_P(self):
        P = self._P
        d = np.diagonal(P)
        if d.max() > self._p_max or d.min() < 0:
            f = np.sqrt(self._p_max / np.maximum(d, self._p_max))  # ≤ 1
            P *= f[:, None]
            P *= f[None, :]
        # keep it symmetric against round-off (in place, O(d²))
        np.add(P, P.T, out=self._outer)
        np.multiply(self._outer, 0.5, out=P)

    def _regime_change(self, g: float):
        self._phi *= g
        np.multiply(self._phi, self._ref, out=self._theta)
        self._P[:] = 0.0
        np.fill_diagonal(self._P, self._p_reset)
        self._drift = 0.0
        self._n_ratios = 0
        self.regime_changes += 1

    def prediction_error(self) -> dict:
        """Median absolute relative error of (prediction before update, measurement) over the last
        `window` observations: {"draft": float, "verify": float} (NaN when none)."""
        return {k: r.mdape() for k, r in self._robust.items()}
