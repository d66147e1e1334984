"""Latency model for KnapSpec drafts running inside a vLLM decode engine.

The paper (notes §1.2, §2) fits, offline and at batch 1, ``t_attn(n) = c2·n + c3`` and ``t_mlp = c1``
for one decoder layer and charges a draft step ``n_attn·t_attn + n_mlp·t_mlp`` and verification
``L·(t_attn + t_mlp)``.  A vLLM engine runs batches, so this module generalises it to a batch of
requests with context lengths ``ctx_r`` and ``T`` query tokens in the step, and adds the per-step
work that is not in any decoder layer.  No vLLM imports; numpy only.  All times are in **seconds**.

One job per module: `law` (the cost law and its priors), `fit` (offline fits from profiler samples), `online`
(the online refit from live step timings), `profiles` (saving and loading a model for one key); `model` puts them
together in LatencyModel.
"""

from vllm_knapspec.core.latency.law import COEF_NAMES, DEFAULT_PRIOR_UNIT_S, PRIOR_RATIOS
from vllm_knapspec.core.latency.model import LatencyModel
from vllm_knapspec.core.latency.profiles import ProfileKey, profile_path

__all__ = [
    "COEF_NAMES",
    "PRIOR_RATIOS",
    "DEFAULT_PRIOR_UNIT_S",
    "ProfileKey",
    "LatencyModel",
    "profile_path",
]
