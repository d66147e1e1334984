"""Latency model for KnapSpec drafts running inside a vLLM decode engine.

The paper (notes §1.2, §2) fits, offline and at batch 1, ``t_attn(n) = c2·n + c3`` and ``t_mlp = c1``
for one decoder layer and charges a draft step ``n_attn·t_attn + n_mlp·t_mlp`` and verification
``L·(t_attn + t_mlp)``.  A vLLM engine runs batches, so this module generalises it to a batch of
requests with context lengths ``ctx_r`` and ``T`` query tokens in the step, and adds the per-step
work that is not in any decoder layer.  No vLLM imports; numpy only.  All times are in **seconds**.

Cost law (per decoder layer, one forward step over the whole batch)::

    t_attn(S, T) = a_attn + b_attn·S + c_attn·T        S = Σ_r ctx_r  (tokens of KV read)
    t_mlp(T)     = a_mlp  + b_mlp·T                     T = query tokens in the step

Why this form.  Decode is memory-bound.  An attention sublayer reads its projection weights once
(constant ``a_attn``, which also carries the norm/RoPE/KV-write kernel launches) and then reads the
KV cache of every request: that traffic is proportional to the total context ``S``, the only term
that grows during a long generation (the paper's ``c2·n``).  ``c_attn·T`` covers per-query work
(projections' activations, KV writes, the Q·K compute of multi-token verify) and absorbs the ±T
ambiguity of whether ``ctx_r`` counts the tokens written in the step, since ``b·(S+T) = b·S + b·T``.
An MLP sublayer reads its weights once per step whatever the batch (``a_mlp``, the paper's ``c1``)
and its FLOPs grow with tokens, which only shows as a weak slope ``b_mlp·T`` until the batch gets
compute-bound.  A per-request term for attention (e.g. ``·R``) would be collinear with ``T`` for
draft steps (1 token per request), so it is left out.

Step law::

    draft  = n_attn_kept·t_attn(S, T) + n_mlp_kept·t_mlp(T) + od0 + od1·T       (T = #requests)
    verify = L·t_attn(S, T) + L·t_mlp(T) + ov0 + ov1·T                         (T = Σ (1+γ_r))
    plain  = verify with one token per request

With tensor parallelism the per-layer all-reduces are part of a_attn / a_mlp.
``od*``/``ov*`` are the fixed per-step overheads (embedding, final norm, lm_head, sampling /
rejection sampling, Python and kernel-launch time); the verify one also carries what the engine
does around a target step.  The nine coefficients form one vector θ; a step time is a dot product
``x·θ`` of a step feature vector with θ, so both the offline fit and the online refit are linear.

Offline: :meth:`LatencyModel.fit_sublayers` fits the sublayer coefficients from profiler samples
with a robust (Huber-IRLS on relative residuals), non-negative least-squares fit.

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
  Plain exponential forgetting at 0.97 on all of θ was tried: it fits the live stream but lets
  those weak directions wander by 10-25 % within a few hundred steps (worst-case predictions off by
  that much under a slow drift).  P's diagonal is clamped as a safety net (a diagonal congruence
  keeps P positive definite).  θ ≥ 0: a step whose posterior mean leaves the orthant takes the
  mean conditioned on those coordinates being 0, so correlated coordinates move back with them.
* O(d²) per update with d = 9, into preallocated buffers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .skipset import SkipSet

__all__ = [
    "COEF_NAMES",
    "PRIOR_RATIOS",
    "DEFAULT_PRIOR_UNIT_S",
    "ProfileKey",
    "LatencyModel",
    "profile_path",
]

# Order of θ.  Units: *_s = seconds; *_per_ctx_token = s per token of KV read (summed over the batch);
# *_per_token = s per query token in the step.
COEF_NAMES = (
    "attn_base_s",  # a_attn   (per layer)
    "attn_per_ctx_token_s",  # b_attn   (per layer, per token of Σ ctx)
    "attn_per_query_token_s",  # c_attn   (per layer, per query token)
    "mlp_base_s",  # a_mlp    (per layer)
    "mlp_per_token_s",  # b_mlp    (per layer, per query token)
    "draft_overhead_s",  # od0      (per draft step)
    "draft_overhead_per_token_s",  # od1      (per draft step, per query token)
    "verify_overhead_s",  # ov0      (per verify / plain step)
    "verify_overhead_per_token_s",  # ov1     (per verify / plain step, per query token)
)
_A_ATTN, _B_ATTN, _C_ATTN, _A_MLP, _B_MLP, _OD0, _OD1, _OV0, _OV1 = range(9)
_D = len(COEF_NAMES)

# Scale-free prior: every coefficient as a multiple of a_attn.  Rationale (8B-class GQA model, fp16,
# H100-class memory bandwidth): an attention sublayer ~ its q/k/v/o weights + ~6 small kernels;
# the MLP reads ~2-4x the bytes of the attention weights -> MLP ≈ 2x attention at short context;
# KV of one token of one layer is ~4 KB -> ~1.6 ns -> attention doubles at Σctx ≈ 25k tokens;
# per-token compute is tiny while memory-bound; lm_head + sampling + launch ≈ a few layers.
PRIOR_RATIOS = {
    "attn_base_s": 1.0,
    "attn_per_ctx_token_s": 4.0e-5,
    "attn_per_query_token_s": 2.0e-3,
    "mlp_base_s": 2.0,
    "mlp_per_token_s": 5.0e-3,
    "draft_overhead_s": 12.0,
    "draft_overhead_per_token_s": 3.0e-2,
    "verify_overhead_s": 24.0,
    "verify_overhead_per_token_s": 3.0e-2,
}
DEFAULT_PRIOR_UNIT_S = 40e-6  # a_attn of the default prior, seconds

_FORMAT_VERSION = 1
_PRIOR_SOURCES = ("prior", "roofline")  # θ whose shape is a guess, not a measurement


# ----------------------------------------------------------------------------------------------------
# profiles
# ----------------------------------------------------------------------------------------------------
def _dtype_str(dtype) -> str:
    s = str(dtype)
    return s[len("torch.") :] if s.startswith("torch.") else s


@dataclass(frozen=True)
class ProfileKey:
    """What a latency profile is valid for."""

    model: str
    device: str
    dtype: str
    tensor_parallel_size: int = 1

    @classmethod
    def make(cls, model, device, dtype, tp=1) -> "ProfileKey":
        return cls(str(model), str(device), _dtype_str(dtype), int(tp))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
        }


def _safe(part: str, maxlen: int = 60) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", part).strip("._-") or "x"
    return s[:maxlen]


def profile_path(directory, model, device, dtype, tp=1) -> str:
    """Filesystem-safe JSON path for the profile of (model, device, dtype, tensor_parallel_size).

    Readable parts are sanitised to [A-Za-z0-9._-] and truncated; a short hash of the exact key keeps
    keys that sanitise alike ("org/m" vs "org_m") apart.
    """
    key = ProfileKey.make(model, device, dtype, tp)
    digest = hashlib.sha1(json.dumps(key.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    name = (
        f"latency__{_safe(key.model)}__{_safe(key.device, 40)}__{_safe(key.dtype, 16)}"
        f"__tp{key.tensor_parallel_size}__{digest}.json"
    )
    return os.path.join(os.fspath(directory), name)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def _ctx_stats(ctx_lens, num_reqs=None) -> tuple[float, int]:
    """(Σ ctx, number of requests).  ctx_lens: per-request lengths, or a number = the total."""
    if isinstance(ctx_lens, (int, float, np.integer, np.floating)):
        return float(ctx_lens), int(num_reqs if num_reqs is not None else 1)
    if isinstance(ctx_lens, np.ndarray):
        return float(ctx_lens.sum()), int(ctx_lens.size if num_reqs is None else num_reqs)
    lens = list(ctx_lens)
    return float(sum(lens)), int(len(lens) if num_reqs is None else num_reqs)


def _tokens(tokens, num_reqs: int) -> float:
    """Query tokens of a step: an int per request (broadcast), or a per-request sequence (summed)."""
    if isinstance(tokens, (int, float, np.integer, np.floating)):
        return float(tokens) * num_reqs
    return float(np.sum(np.asarray(tokens, dtype=np.float64)))


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


# ----------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------
class LatencyModel:
    """Predicts decode-step times (seconds) of a layer-skipping draft and of the full model.

    Args:
        num_layers: L, decoder layers of the target model.
        coefficients: dict over :data:`COEF_NAMES` (seconds); missing names come from the prior.
        key: the (model, device, dtype, tp) this profile belongs to; saved with it.
        prior_unit_s: a_attn of the scale-free prior (:data:`PRIOR_RATIOS`) when no coefficients.
        forgetting: RLS forgetting factor λ for the overall speed (the scale of θ): memory
            ≈ 1/(1-λ) observations, so uniform slowdowns/speedups are tracked at that rate.
        shape_forgetting: directional forgetting factor for the ratios between coefficients (slower:
            they are a property of model + hardware and are poorly excited by live traffic).
        huber_k: residuals beyond huber_k·σ are clipped (σ: robust running relative-residual scale).
        regime_threshold, regime_alpha: a regime change is declared when the EWMA (rate alpha) of
            the clipped residuals, in σ units, exceeds the threshold (default: ~4 consecutive
            saturated residuals of one sign; isolated spikes never get there).
        window: size of the (predicted, measured) windows behind :meth:`prediction_error`.
        adapt: if False, observations only feed the error windows, θ stays fixed.
    """

    def __init__(
        self,
        num_layers: int,
        coefficients: Mapping[str, float] | None = None,
        *,
        key: ProfileKey | None = None,
        prior_unit_s: float = DEFAULT_PRIOR_UNIT_S,
        forgetting: float = 0.97,
        shape_forgetting: float = 0.995,
        huber_k: float = 3.0,
        regime_threshold: float = 2.0,
        regime_alpha: float = 0.25,
        window: int = 256,
        adapt: bool = True,
        source: str | None = None,
    ):
        if num_layers <= 0:
            raise ValueError("num_layers must be positive")
        if not (0.0 < forgetting <= 1.0 and 0.0 < shape_forgetting <= 1.0):
            raise ValueError("forgetting factors must be in (0, 1]")
        self.num_layers = int(num_layers)
        self.key = key
        self.forgetting = float(forgetting)
        self.shape_forgetting = float(shape_forgetting)
        self._q_scale = (1.0 - self.forgetting) ** 2 / self.forgetting
        self.huber_k = float(huber_k)
        self.regime_threshold = float(regime_threshold)
        self.regime_alpha = float(regime_alpha)
        self.window = int(window)
        self.adapt = bool(adapt)
        self._prior_unit_s = float(prior_unit_s)
        self._theta = self.prior_coefficients_array(prior_unit_s)
        if coefficients:
            unknown = set(coefficients) - set(COEF_NAMES)
            if unknown:
                raise ValueError(f"unknown latency coefficients {sorted(unknown)}")
            for j, name in enumerate(COEF_NAMES):
                if name in coefficients:
                    self._theta[j] = max(0.0, float(coefficients[name]))
        self.source = source or ("given" if coefficients else "prior")
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

    # -- construction ------------------------------------------------------------------------------
    @staticmethod
    def prior_coefficients_array(unit_s: float = DEFAULT_PRIOR_UNIT_S) -> np.ndarray:
        return np.array([PRIOR_RATIOS[n] * unit_s for n in COEF_NAMES], dtype=np.float64)

    @classmethod
    def prior(cls, num_layers: int, unit_s: float = DEFAULT_PRIOR_UNIT_S, **kw) -> "LatencyModel":
        """The scale-free prior (MLP ≈ 2× attention at short context), a_attn = unit_s seconds."""
        return cls(num_layers, prior_unit_s=unit_s, **kw)

    @classmethod
    def from_model_shape(
        cls,
        num_layers: int,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int | None = None,
        vocab_size: int = 128_000,
        dtype_bytes: int = 2,
        tp: int = 1,
        mem_bw_bytes_per_s: float = 2.0e12,
        flops_per_s: float = 4.0e14,
        launch_s: float = 3e-6,
        **kw,
    ) -> "LatencyModel":
        """Roofline prior from the model's shapes (no profile needed); bandwidth is an effective one."""
        hd = head_dim or hidden_size // num_heads
        q, kv = num_heads * hd, num_kv_heads * hd
        attn_w = (hidden_size * (q + 2 * kv) + q * hidden_size) * dtype_bytes / tp
        mlp_w = 3 * hidden_size * intermediate_size * dtype_bytes / tp
        kv_tok = 2 * kv * dtype_bytes / tp
        coef = {
            "attn_base_s": attn_w / mem_bw_bytes_per_s + 6 * launch_s,
            "attn_per_ctx_token_s": kv_tok / mem_bw_bytes_per_s,
            "attn_per_query_token_s": 2 * attn_w / dtype_bytes / flops_per_s,
            "mlp_base_s": mlp_w / mem_bw_bytes_per_s + 3 * launch_s,
            "mlp_per_token_s": 2 * mlp_w / dtype_bytes / flops_per_s,
            "draft_overhead_s": vocab_size * hidden_size * dtype_bytes / tp / mem_bw_bytes_per_s + 30 * launch_s + 2e-4,
            "draft_overhead_per_token_s": 2 * vocab_size * hidden_size / tp / flops_per_s + 1e-6,
            "verify_overhead_s": vocab_size * hidden_size * dtype_bytes / tp / mem_bw_bytes_per_s
            + 30 * launch_s
            + 1e-3,
            "verify_overhead_per_token_s": 2 * vocab_size * hidden_size / tp / flops_per_s + 2e-6,
        }
        return cls(num_layers, coef, source="roofline", **kw)

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

    # -- prediction ---------------------------------------------------------------------------------
    def sublayer_times(self, ctx_lens, num_tokens=None) -> tuple[float, float]:
        """(t_attn, t_mlp) of ONE decoder layer for one step, seconds.

        ctx_lens: per-request context lengths (KV tokens), or their total as a number.
        num_tokens: query tokens in the step (default: one per request).
        """
        S, R = _ctx_stats(ctx_lens)
        T = float(R if num_tokens is None else num_tokens)
        th = self._theta
        return (float(th[_A_ATTN] + th[_B_ATTN] * S + th[_C_ATTN] * T), float(th[_A_MLP] + th[_B_MLP] * T))

    def _draft_features(self, n_attn, n_mlp, S, T, out):
        out[:] = 0.0
        out[_A_ATTN], out[_B_ATTN], out[_C_ATTN] = n_attn, n_attn * S, n_attn * T
        out[_A_MLP], out[_B_MLP] = n_mlp, n_mlp * T
        out[_OD0], out[_OD1] = 1.0, T
        return out

    def _verify_features(self, S, T, out):
        L = self.num_layers
        out[:] = 0.0
        out[_A_ATTN], out[_B_ATTN], out[_C_ATTN] = L, L * S, L * T
        out[_A_MLP], out[_B_MLP] = L, L * T
        out[_OV0], out[_OV1] = 1.0, T
        return out

    def _kept(self, skipset_or_counts) -> tuple[int, int]:
        if isinstance(skipset_or_counts, SkipSet):
            if skipset_or_counts.num_layers != self.num_layers:
                raise ValueError(f"skip set has {skipset_or_counts.num_layers} layers, latency model {self.num_layers}")
            return skipset_or_counts.n_attn_kept, skipset_or_counts.n_mlp_kept
        n_attn, n_mlp = skipset_or_counts
        return int(n_attn), int(n_mlp)

    def draft_step_time(self, skipset_or_counts, ctx_lens, num_reqs: int | None = None) -> float:
        """Seconds of one draft step (1 token per request).

        skipset_or_counts: a :class:`SkipSet` or (n_attn_kept, n_mlp_kept).
        ctx_lens: per-request context lengths, or their total (then pass num_reqs).
        """
        n_attn, n_mlp = self._kept(skipset_or_counts)
        S, R = _ctx_stats(ctx_lens, num_reqs)
        return float(self._draft_features(n_attn, n_mlp, S, float(R), np.empty(_D)) @ self._theta)

    def verify_step_time(self, ctx_lens, tokens_per_req=1, num_reqs: int | None = None) -> float:
        """Seconds of one full-model step over tokens_per_req (= 1+γ; int or per-request list)."""
        S, R = _ctx_stats(ctx_lens, num_reqs)
        T = _tokens(tokens_per_req, R)
        return float(self._verify_features(S, T, np.empty(_D)) @ self._theta)

    def plain_step_time(self, ctx_lens, num_reqs: int | None = None) -> float:
        """Seconds of one non-speculative decode step (full model, 1 token per request)."""
        return self.verify_step_time(ctx_lens, 1, num_reqs)

    # -- offline fit --------------------------------------------------------------------------------
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
        measure clearly (the per-context-token attention cost) was once fitted to 0 in CI.
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

    # -- online refit -------------------------------------------------------------------------------
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

    # -- reporting ----------------------------------------------------------------------------------
    def prediction_error(self) -> dict:
        """Median absolute relative error of (prediction before update, measurement) over the last
        `window` observations: {"draft": float, "verify": float} (NaN when none)."""
        return {k: r.mdape() for k, r in self._robust.items()}

    def coefficients(self) -> dict:
        """Current coefficients (seconds; see COEF_NAMES) plus online statistics, for metrics."""
        out = {name: float(v) for name, v in zip(COEF_NAMES, self._theta)}
        err = self.prediction_error()
        out.update(
            num_layers=self.num_layers,
            draft_observations=self._robust["draft"].n,
            verify_observations=self._robust["verify"].n,
            draft_pred_mdape=err["draft"],
            verify_pred_mdape=err["verify"],
            regime_changes=self.regime_changes,
        )
        return out

    # -- persistence --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "knapspec-latency",
            "version": _FORMAT_VERSION,
            "key": self.key.to_dict() if self.key else None,
            "num_layers": self.num_layers,
            "coefficients": {n: float(v) for n, v in zip(COEF_NAMES, self._theta)},
            "source": (
                "online"
                if self.source in _PRIOR_SOURCES and self._robust["draft"].n + self._robust["verify"].n >= 200
                else self.source
            ),
            "saved_at": time.time(),
            "stats": {k: v for k, v in self.coefficients().items() if k not in COEF_NAMES},
        }

    def save(self, path) -> None:
        """Write the profile as JSON (atomically: temp file + rename)."""
        path = os.fspath(path)
        d = os.path.dirname(path) or "."
        os.makedirs(d, exist_ok=True)
        data = json.dumps(self.to_dict(), indent=1, allow_nan=True)
        fd, tmp = tempfile.mkstemp(prefix=".latency.", suffix=".json", dir=d)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path, expect_key: ProfileKey | None = None, **kw) -> "LatencyModel":
        """Read a profile written by :meth:`save`.  With expect_key, a profile for another
        (model, device, dtype, tp) raises ValueError.  kw: constructor options (forgetting, ...)."""
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != "knapspec-latency":
            raise ValueError(f"{path}: not a knapspec latency profile")
        key = ProfileKey(**data["key"]) if data.get("key") else None
        if expect_key is not None and key != expect_key:
            raise ValueError(f"{path}: profile is for {key}, expected {expect_key}")
        return cls(int(data["num_layers"]), data["coefficients"], key=key, source=data.get("source", "profile"), **kw)

    @classmethod
    def load_or_prior(cls, directory, model, device, dtype, tp, num_layers: int, **kw) -> "LatencyModel":
        """The saved profile for this key if one exists (and has num_layers), else the prior."""
        key = ProfileKey.make(model, device, dtype, tp)
        path = profile_path(directory, model, device, dtype, tp)
        if os.path.exists(path):
            m = cls.load(path, expect_key=key, **kw)
            if m.num_layers == num_layers:
                return m
        return cls(num_layers, key=key, **kw)

    def __repr__(self) -> str:
        ta, tm = self.sublayer_times([1024])
        return (
            f"LatencyModel(L={self.num_layers}, source={self.source}, "
            f"t_attn@1k={ta * 1e6:.1f}us, t_mlp={tm * 1e6:.1f}us)"
        )
