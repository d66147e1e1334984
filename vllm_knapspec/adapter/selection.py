"""The selector for a vLLM engine: its latency model (a profile, else a roofline prior from the model's shapes),
its reference builder over the engine's own modules, the metrics writer as its stats sink, and tensor-parallel
agreement through vLLM's TP group."""

from __future__ import annotations

import os

import torch

from vllm_knapspec.adapter.draft import ReferenceBuilder
from vllm_knapspec.adapter.metrics import KnapSpecStats
from vllm_knapspec.core.latency import LatencyModel, profile_path
from vllm_knapspec.core.selector import ClaspSelector, FixedSelector, KnapSpecSelector
from vllm_knapspec.core.skipset import SkipSet


def make_latency_model(cfg, vllm_config, num_layers: int) -> LatencyModel:
    """A profile when one matches (explicit path or profile_dir), else a roofline prior from the shapes."""
    if cfg.latency_profile:
        return LatencyModel.load(cfg.latency_profile)
    mc = vllm_config.model_config
    hf = mc.hf_config
    tp = vllm_config.parallel_config.tensor_parallel_size
    if cfg.profile_dir:
        p = profile_path(os.path.expanduser(cfg.profile_dir), mc.model, device_name(), str(mc.dtype), tp)
        if os.path.isfile(p):
            return LatencyModel.load(p)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return LatencyModel.from_model_shape(
        num_layers,
        hf.hidden_size,
        hf.intermediate_size,
        hf.num_attention_heads,
        getattr(hf, "num_key_value_heads", hf.num_attention_heads),
        head_dim,
        vocab_size=hf.vocab_size,
        dtype_bytes=torch.tensor([], dtype=mc.dtype).element_size(),
        tp=tp,
        **_device_roofline(),
    )


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return "cpu"


def _device_roofline() -> dict:
    if torch.cuda.is_available():
        return {}
    # A 2-core CPU: ~10 GB/s effective, ~50 GFLOP/s, ~20 us per eager op (the draft is eager Python).
    return dict(mem_bw_bytes_per_s=1.0e10, flops_per_s=5.0e10, launch_s=2e-5)


def make_selector(cfg, draft, vllm_config):
    if cfg.skip_set is not None:
        return FixedSelector(SkipSet.parse(draft.num_layers, cfg.skip_set), cfg.num_speculative_tokens)
    latency = make_latency_model(cfg, vllm_config, draft.num_layers)
    cls = ClaspSelector if cfg.selector == "clasp" else KnapSpecSelector
    return cls(cfg, ReferenceBuilder(draft), latency, draft.num_layers, tp_sync(), stats=KnapSpecStats.get())


def tp_sync():
    """Broadcast from tensor-parallel rank 0 (vLLM's TP group); None with one rank."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return None
    return lambda obj: group.broadcast_object(obj, src=0)
