"""The cost law: what a draft, verify or plain step costs, from nine coefficients θ.

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vllm_knapspec.core.skipset import SkipSet

if TYPE_CHECKING:
    from vllm_knapspec.core.latency.model import LatencyModel

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
_PRIOR_SOURCES = ("prior", "roofline")  # θ whose shape is a guess, not a measurement


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


class CostLaw:
    """LatencyModel's cost law: the prior, the roofline prior from a model's shapes, and step-time predictions
    (mixin; θ is `self._theta`)."""

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

    def coefficient_bytes(self) -> bytes:
        """θ as bytes: equal while no refit changed the model (callers keep predictions while it is)."""
        return self._theta.tobytes()

    def plain_step_times(self, ctx_sums, num_reqs) -> np.ndarray:
        """plain_step_time of many steps at once, from each step's Σ ctx [m] and requests [m]: the law is linear
        in both, so three feature rows price them all (the selector reprices its last plain steps at each new
        one: 32 calls of plain_step_time were a tenth of `propose()` under the profiler on a 2-core EPYC).

        >>> from vllm_knapspec.core.latency import LatencyModel
        >>> m = LatencyModel(4)
        >>> t = m.plain_step_times(np.array([100.0, 4000.0]), np.array([1, 4]))
        >>> bool(np.allclose(t, [m.plain_step_time(100.0, 1), m.plain_step_time(4000.0, 4)]))
        True
        """
        f, th = np.empty(_D), self._theta
        base = float(self._verify_features(0.0, 0.0, f) @ th)
        per_ctx = float(self._verify_features(1.0, 0.0, f) @ th) - base
        per_req = float(self._verify_features(0.0, 1.0, f) @ th) - base
        sums, reqs = np.asarray(ctx_sums, dtype=np.float64), np.asarray(num_reqs, dtype=np.float64)
        return base + per_ctx * sums + per_req * reqs
