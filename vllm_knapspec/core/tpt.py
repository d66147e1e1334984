"""Tokens-per-Time (TPT), the KnapSpec objective (paper §1.2 of the notes; official `Knapspec.TPT`).

    E[tokens | alpha, gamma] = (1 - alpha^(gamma+1)) / (1 - alpha)     (gamma + 1 at alpha = 1)
    TPT(S, gamma)            = E[tokens] / (gamma * t_draft(S) + t_target)

One speculation round drafts gamma tokens with the skip-set model (gamma * t_draft) and verifies them with one
full-model pass (t_target, the memory-bound assumption of the paper). In a batch the step shares one skip set
and one gamma, so the expected tokens of the R requests add while the time is paid once: `batch_tpt`.
`plain_tpt` is decoding without speculation (B tokens per t_plain) so a caller can decide not to speculate.

Works on Python floats, numpy arrays and torch tensors. No vLLM imports.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch


def expected_tokens(alpha, gamma):
    """Expected tokens per round, sum_{k=0..gamma} alpha^k (accepted prefix plus the bonus token).

    Computed as expm1((gamma+1) log a) / expm1(log a): the closed form (1 - a^(g+1)) / (1 - a) loses all its
    digits near a = 1 (0/0), this ratio keeps full relative precision there and is exactly gamma+1 at a = 1
    and 1 at a = 0. alpha is clamped to [0, 1].
    """
    if isinstance(alpha, np.ndarray) or isinstance(gamma, np.ndarray):  # numpy in, numpy out: no torch op per call
        a = np.clip(alpha, 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            la = np.log(a)
            ratio = np.expm1((gamma + 1) * la) / np.expm1(la)
        return np.where(la == 0, gamma + 1.0, ratio)
    if isinstance(alpha, torch.Tensor) or isinstance(gamma, torch.Tensor):
        a = torch.as_tensor(alpha)
        if not a.is_floating_point():
            a = a.float()
        a = a.clamp(0.0, 1.0)
        g1 = torch.as_tensor(gamma, device=a.device) + 1
        la = torch.log(a)  # -inf at a = 0 gives expm1(-inf) = -1 -> ratio 1
        ratio = torch.expm1(g1 * la) / torch.expm1(la)
        return torch.where(la == 0, g1.to(ratio.dtype), ratio)
    a = min(max(float(alpha), 0.0), 1.0)
    if a == 1.0:
        return float(gamma + 1)
    if a == 0.0:
        return 1.0
    la = math.log(a)
    return math.expm1((gamma + 1) * la) / math.expm1(la)


def tpt(alpha, gamma, t_draft, t_target):
    """Tokens per unit time of one request: E[tokens](alpha, gamma) / (gamma * t_draft + t_target)."""
    return expected_tokens(alpha, gamma) / (gamma * t_draft + t_target)


def batch_tpt(alphas, gamma, t_draft, t_target):
    """Batch step sharing one skip set: sum_r E[tokens](alpha_r, gamma) / (gamma * t_draft + t_target).

    alphas: a sequence of floats or a tensor [..., R] (summed over the last dim)."""
    if isinstance(alphas, torch.Tensor):
        tokens = expected_tokens(alphas, gamma).sum(-1)
    else:
        tokens = sum(expected_tokens(a, gamma) for a in alphas)
    return tokens / (gamma * t_draft + t_target)


def plain_tpt(batch: int, t_plain: float) -> float:
    """Tokens per unit time without speculation: every request gets one token per full-model step."""
    return batch / t_plain


def draft_time(skipset, t_attn: float, t_mlp: float) -> float:
    """Time of one draft step with a SkipSet: the kept sublayers' latencies (official `loaded_time`)."""
    return skipset.n_attn_kept * t_attn + skipset.n_mlp_kept * t_mlp


def target_time(num_layers: int, t_attn: float, t_mlp: float) -> float:
    """Time of one full-model (verification) step under the same latency model."""
    return num_layers * (t_attn + t_mlp)


def speculation_worthwhile(best_tpt: float, batch: int, t_plain: float, margin: float = 0.05) -> bool:
    """True if speculating at best_tpt beats plain decoding by more than `margin` (relative). The latency
    model is approximate, so a small predicted gain is not worth the drafting risk: require a margin."""
    return best_tpt > (1.0 + margin) * plain_tpt(batch, t_plain)


class TPTChoice(NamedTuple):
    speculate: bool  # False: decode plainly (no candidate beats plain decoding by the margin)
    index: int  # best candidate (row of alpha) even when speculate is False
    gamma: int  # best draft length for it (>= 1)
    tpt: float  # its TPT
    plain: float  # plain_tpt(batch, t_plain)


def choose(
    alpha,
    t_draft,
    t_target: float,
    gamma_max: int,
    t_plain: Optional[float] = None,
    margin: float = 0.05,
    impl: str = "auto",
) -> TPTChoice:
    """argmax over (candidate, gamma) of the batch TPT, then the speculate-or-not decision.

    alpha [C, R] (candidates x requests in the batch), t_draft [C]; t_plain defaults to t_target."""
    from vllm_knapspec.core.kernels.tpt_argmax import tpt_argmax  # kernels import torch/triton only

    a = torch.as_tensor(alpha)
    res = tpt_argmax(a, t_draft, t_target, gamma_max, impl=impl)
    batch = 1 if a.dim() == 1 else a.shape[1]
    t_plain = t_target if t_plain is None else t_plain
    ok = speculation_worthwhile(res.best_tpt, batch, t_plain, margin)
    return TPTChoice(ok, res.best_c, res.best_gamma, res.best_tpt, plain_tpt(batch, t_plain))


__all__ = [
    "expected_tokens",
    "tpt",
    "batch_tpt",
    "plain_tpt",
    "draft_time",
    "target_time",
    "speculation_worthwhile",
    "TPTChoice",
    "choose",
]
