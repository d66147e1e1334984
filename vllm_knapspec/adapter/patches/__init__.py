"""Every change KnapSpec makes to vLLM, grouped by feature, one module each. Every patch names the vLLM
symbols it wraps and the versions it was checked on, and is applied at most once (general plugins load in
every vLLM process, sometimes twice).

config_entry     speculative_config_file, knapspec_as_draft_model
drafting         runner_drafter, draft_length_control, drafter_warmup, lookup_draft_lengths, plain_steps
uniform_graphs   uniform_graphs
runner_v2        v2_admits_knapspec, v2_speculator, v2_decode_graphs, v2_plain_steps
cpu              cpu_sampler_expand, cpu_generator_rewind, ray_cpu
"""

from __future__ import annotations

from vllm_knapspec.adapter.patches import config_entry, cpu, drafting, runner_v2, uniform_graphs
from vllm_knapspec.adapter.patches.base import uses_knapspec

PATCHES = {
    "speculative_config_file": config_entry.patch_speculative_config_file,
    "knapspec_as_draft_model": config_entry.patch_knapspec_as_draft_model,
    "runner_drafter": drafting.patch_runner_drafter,
    "draft_length_control": drafting.patch_draft_length_control,
    "drafter_warmup": drafting.patch_drafter_warmup,
    "lookup_draft_lengths": drafting.patch_lookup_draft_lengths,
    "plain_steps": drafting.patch_plain_steps,
    "uniform_graphs": uniform_graphs.patch_uniform_graphs,
    "v2_admits_knapspec": runner_v2.patch_v2_admits_knapspec,
    "v2_speculator": runner_v2.patch_v2_speculator,
    "v2_decode_graphs": runner_v2.patch_v2_decode_graphs,
    "v2_plain_steps": runner_v2.patch_v2_plain_steps,
    "cpu_sampler_expand": cpu.patch_cpu_sampler_expand,
    "cpu_generator_rewind": cpu.patch_cpu_generator_rewind,
    "ray_cpu": cpu.patch_ray_cpu,
}

__all__ = ["PATCHES", "apply_all", "uses_knapspec"]


def apply_all() -> None:
    for apply in PATCHES.values():
        apply()
