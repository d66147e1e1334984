"""Full CUDA graphs for uniform decode batches of every query length q in 1..gamma_max+1.

- uniform_graphs   CudagraphDispatcher.initialize_cudagraph_keys, CudagraphDispatcher.dispatch,
                   GPUModelRunner._determine_batch_execution_and_padding, GPUModelRunner._warmup_and_capture
                   (0.26.0 GPU; the same symbols exist in 0.32.0, inert on CPU where there are no graphs)

With speculation on, vLLM captures FULL decode graphs only for q = gamma_max+1 tokens per request. A KnapSpec
step without drafts (q = 1) or with a shorter draft would then run PIECEWISE graphs (3x slower per step on an
H100 for SmolLM2) or, past max_cudagraph_capture_size, eagerly. These patches add FULL keys (q*b tokens, b
requests) for vLLM's default batch sizes b, dispatch to them (vLLM's own graph first where it has one), and
treat a batch of q tokens per request as uniform while dispatching / capturing it: a q = 1 step replays the
same kind of graph plain decoding replays, padded to the same sizes. Config `uniform_graphs: false` turns it
off. Raise compilation_config.max_cudagraph_capture_size to (gamma_max+1) * max_num_seqs to graph
full-length drafts of full batches.
"""

from __future__ import annotations

import functools

from vllm_knapspec.adapter.patches.base import uses_knapspec, wrap


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
        d._ks_q, d._ks_found = self.q, self.desc  # the key the runner already looked up, for dispatch

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
    sp = getattr(pc, "enable_sp", getattr(pc, "enable_sequence_parallelism", False))  # 0.26 / 0.32 names
    if vllm_config.parallel_config.data_parallel_size > 1 or sp:
        return False  # DP ranks agree on modes and SP pads: not covered, leave vLLM's
    return bool((getattr(spec, "knapspec", None) or {}).get("uniform_graphs", True))


def _make_init(orig):
    @functools.wraps(orig)
    def initialize_cudagraph_keys(self, cudagraph_mode, uniform_decode_query_len=1):
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import BatchDescriptor

        orig(self, cudagraph_mode, uniform_decode_query_len)
        self._ks_q = self._ks_found = None
        self._ks_sizes, self._ks_index, self.cudagraph_keys_full_ks = {}, {}, set()
        if not (
            _uniform_graphs_wanted(self.vllm_config)
            and cudagraph_mode.decode_mode() == CUDAGraphMode.FULL
            and cudagraph_mode.separate_routine()
        ):
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
    def dispatch(
        self, num_tokens, uniform_decode=False, has_lora=False, num_active_loras=0, valid_modes=None, invalid_modes=None
    ):
        from vllm.config import CUDAGraphMode

        args = (has_lora, num_active_loras, valid_modes, invalid_modes)
        if not getattr(self, "_ks_sizes", None) or not uniform_decode or has_lora:
            return orig(self, num_tokens, uniform_decode, *args)
        allowed = set(valid_modes or CUDAGraphMode.valid_runtime_modes()) - set(invalid_modes or ())
        native = self._ks_q in (None, self.uniform_decode_query_len)
        if native:  # vLLM's own graph for gamma_max+1 first (its padding is tighter)
            mode, desc = orig(self, num_tokens, uniform_decode, *args)
            if mode == CUDAGraphMode.FULL or CUDAGraphMode.FULL not in allowed:
                return mode, desc
        q = self._ks_q or self.uniform_decode_query_len
        ks = None
        if CUDAGraphMode.FULL in allowed:
            ks = (
                self._ks_found
                if self._ks_found is not None and self._ks_found.num_tokens >= num_tokens
                else _ks_desc(self, q, num_tokens)
            )
        if ks is not None:
            return CUDAGraphMode.FULL, ks
        return (mode, desc) if native else orig(self, num_tokens, False, *args)

    return dispatch


def _make_determine(orig):
    @functools.wraps(orig)
    def _determine_batch_execution_and_padding(
        self, num_tokens, num_reqs, num_scheduled_tokens_np, max_num_scheduled_tokens, *a, **kw
    ):
        d, q = self.cudagraph_dispatcher, int(max_num_scheduled_tokens)
        desc = None
        if (
            getattr(d, "_ks_sizes", None)
            and kw.get("force_uniform_decode") is None
            and q != self.uniform_decode_query_len
            and num_tokens == q * num_reqs
        ):
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

    wrap(CudagraphDispatcher, "initialize_cudagraph_keys", _make_init)
    wrap(CudagraphDispatcher, "dispatch", _make_dispatch)
    wrap(GPUModelRunner, "_determine_batch_execution_and_padding", _make_determine)
    wrap(GPUModelRunner, "_warmup_and_capture", _make_capture)
