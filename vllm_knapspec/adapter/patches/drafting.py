"""Where KnapSpec drafts inside vLLM's draft-model path.

- runner_drafter          GPUModelRunner.__init__                 (0.26.0, 0.32.0; CPUModelRunner inherits it)
  The runner drafts with KnapSpecDrafter where it would build vLLM's DraftModelProposer: same interface, the
  target's own modules behind a skip set instead of a second model.
- draft_length_control    Scheduler.__init__                      (0.26.0, 0.32.0)
  The scheduler's dynamic-speculation lookup (`Scheduler.dynamic_sd_lookup[batch_size]`) becomes
  control.DraftLengthControl: the selector's gamma, 0 while it chooses plain decoding (a plain step).
- drafter_warmup          GPUModelRunner.capture_model            (0.26.0 GPU; same symbol in 0.32.0)
  Once the target's graphs are captured (the KV cache exists by then), the drafter captures its own graphs
  and calibrates the selector (KnapSpecDrafter.warmup_after_kv_cache), so no first-call cost lands in decode.
- lookup_draft_lengths    GPUModelRunner.take_draft_token_ids     (0.26.0, 0.32.0; CPUModelRunner inherits it)
  Under sync scheduling with lookup drafts, each row's drafts are cut to its own lookup draft before the
  scheduler schedules them (LookupDrafts.cut), as vLLM's ngram method does: a row without a draft verifies none.
- plain_steps             GPUModelRunner._prepare_inputs          (0.32.0 only; 0.26.0 already does this)
  0.32 takes the spec-decode input path whenever a speculative config exists, so a step in which no request
  has drafts still builds spec-decode metadata and runs the rejection sampler. For KnapSpec such a step takes
  the plain path, as on 0.26: the same logits, vLLM's plain sampler, ~1 ms less per step on 2 CPU cores.
"""

from __future__ import annotations

import functools
import inspect

from vllm_knapspec.adapter.patches.base import is_patched, uses_knapspec, wrap


def patch_runner_drafter() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    wrap(GPUModelRunner, "__init__", _make_runner_init)


def _make_runner_init(orig):
    @functools.wraps(orig)
    def __init__(self, vllm_config, device, *a, **kw):
        orig(self, vllm_config, device, *a, **kw)
        if uses_knapspec(self.speculative_config) and hasattr(self, "drafter"):
            from vllm_knapspec.adapter.drafter import KnapSpecDrafter

            self.drafter = KnapSpecDrafter(self.vllm_config, self.device, runner=self)

    return __init__


def patch_draft_length_control() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    wrap(Scheduler, "__init__", make_control_init)


def make_control_init(orig):
    @functools.wraps(orig)
    def __init__(self, vllm_config, *a, **kw):
        orig(self, vllm_config, *a, **kw)
        spec = vllm_config.speculative_config
        if uses_knapspec(spec):
            from vllm_knapspec.adapter.control import DraftLengthControl

            self.dynamic_sd_lookup = DraftLengthControl(
                spec.num_speculative_tokens, getattr(vllm_config, "instance_id", "")
            )

    return __init__


def patch_drafter_warmup() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if "capture_model" in GPUModelRunner.__dict__:
        wrap(GPUModelRunner, "capture_model", make_capture_model)


def make_capture_model(orig):
    @functools.wraps(orig)
    def capture_model(self, *a, **kw):
        out = orig(self, *a, **kw)
        warm = getattr(getattr(self, "drafter", None), "warmup_after_kv_cache", None)
        if warm is not None:
            warm()
        return out

    return capture_model


def patch_lookup_draft_lengths() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    wrap(GPUModelRunner, "take_draft_token_ids", make_take_draft_token_ids)


def make_take_draft_token_ids(orig):
    @functools.wraps(orig)
    def take_draft_token_ids(self, *a, **kw):
        out = orig(self, *a, **kw)
        lookup = getattr(getattr(self, "drafter", None), "lookup", None)
        return out if lookup is None else lookup.cut(out)

    return take_draft_token_ids


ALWAYS_SPEC = "use_spec_decode = self.speculative_config is not None"


def patch_plain_steps() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    fn = GPUModelRunner.__dict__["_prepare_inputs"]
    if is_patched(fn):
        return
    src = inspect.getsource(fn)
    if ALWAYS_SPEC in src and src.count("self.speculative_config") == 1:  # exactly the 0.32 shape
        wrap(GPUModelRunner, "_prepare_inputs", make_prepare)


def make_prepare(orig):
    @functools.wraps(orig)
    def _prepare_inputs(self, scheduler_output, *a, **kw):
        spec = self.speculative_config
        if scheduler_output.scheduled_spec_decode_tokens or not uses_knapspec(spec):
            return orig(self, scheduler_output, *a, **kw)
        self.speculative_config = None  # read once there, to pick the spec-decode branch
        try:
            return orig(self, scheduler_output, *a, **kw)
        finally:
            self.speculative_config = spec

    return _prepare_inputs
