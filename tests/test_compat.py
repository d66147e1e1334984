"""Code paths that differ between vLLM 0.26 (GPU) and 0.32 (CPU), tested on both shapes with stand-ins."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_knapspec import compat, patches
from vllm_knapspec import config as ks

KS_SPEC = SimpleNamespace(model=ks.PROPOSER_PATH, num_speculative_tokens=6)
OTHER_SPEC = SimpleNamespace(model="ngram", num_speculative_tokens=3)


def test_lookahead_property_032_shape_idempotent():
    class Cfg:
        def __init__(self, spec):
            self.speculative_config = spec

        @property
        def num_lookahead_tokens(self):
            return 0
    patches.patch_lookahead_property(Cfg)
    patches.patch_lookahead_property(Cfg)         # plugins load more than once per process
    assert Cfg(KS_SPEC).num_lookahead_tokens == 6
    assert Cfg(OTHER_SPEC).num_lookahead_tokens == 0
    assert Cfg(None).num_lookahead_tokens == 0


def test_scheduler_lookahead_026_shape_idempotent():
    calls = []

    class Scheduler:
        def __init__(self, vllm_config, *a, **kw):
            calls.append(1)
            self.num_lookahead_tokens = 0
    patches.patch_scheduler_lookahead(Scheduler)
    patches.patch_scheduler_lookahead(Scheduler)
    s = Scheduler(SimpleNamespace(speculative_config=KS_SPEC))
    assert s.num_lookahead_tokens == 6 and len(calls) == 1
    assert Scheduler(SimpleNamespace(speculative_config=OTHER_SPEC)).num_lookahead_tokens == 0


def test_real_vllm_has_the_shape_we_patch():
    from vllm.config import VllmConfig
    major, minor = compat.vllm_version()
    is_prop = isinstance(VllmConfig.__dict__.get("num_lookahead_tokens"), property)
    assert is_prop == ((major, minor) >= (0, 27)), "lookahead moved: re-check patches.patch_lookahead"


def test_common_attn_metadata_drops_fields_this_version_lacks():
    from vllm.v1.attention.backend import CommonAttentionMetadata
    t = torch.zeros(2, dtype=torch.int32)
    md = compat._common_attn_metadata(
        query_start_loc=t, query_start_loc_cpu=t, seq_lens=t, num_reqs=1, num_actual_tokens=1, max_query_len=1,
        max_seq_len=1, block_table_tensor=t, slot_mapping=t, field_from_another_version=123)
    assert isinstance(md, CommonAttentionMetadata)
    assert "field_from_another_version" not in {f.name for f in dataclasses.fields(md)}


class _Builder:
    def __init__(self):
        self.seen = []

    def build_for_drafting(self, common_attn_metadata, draft_index):
        self.seen.append(("builder", common_attn_metadata.num_reqs))
        return "md-026"


class _Group026:           # vLLM 0.26: no AttentionGroup.build_metadata_for_drafting
    def __init__(self):
        self.layer_names, self.kv_cache_group_id, self.b = ["l0", "l1"], 0, _Builder()

    def get_metadata_builder(self):
        return self.b


class _Group032(_Group026):  # 0.32: the group maps manager blocks to kernel blocks first
    def build_metadata_for_drafting(self, cad, draft_index):
        return "md-032"


def _builder_with(group):
    bt = SimpleNamespace(block_size=32, max_num_reqs=4, num_blocks_per_row=np.array([2, 1, 0, 0]),
                         get_device_tensor=lambda n: torch.arange(16, dtype=torch.int32).view(4, 4)[:n])
    runner = SimpleNamespace(device=torch.device("cpu"), input_batch=SimpleNamespace(block_table=[bt]))
    b = compat.DraftMetadataBuilder(runner, None, {"l0"})
    b._groups = [group]
    return b


@pytest.mark.parametrize("group,expect", [(_Group026, "md-026"), (_Group032, "md-032")])
def test_metadata_builder_uses_the_versions_api(group, expect):
    b = _builder_with(group())
    md = b.build_decode(torch.tensor([0, 1]), None, np.array([40, 5]), torch.tensor([0, 1]))
    assert md == {"l0": expect, "l1": expect}
    assert list(b.capacity(np.array([0, 1]))) == [64, 32]
    assert b.block_table(torch.tensor([1])).tolist() == [[4, 5, 6, 7]]


def test_find_runner_walks_up_to_the_model_runner():
    class Runner:
        input_batch = attn_groups = None

        def load_model(self):
            return compat.find_runner()
    r = Runner()
    assert r.load_model() is r
    with pytest.raises(RuntimeError, match="model runner"):
        compat.find_runner()


def test_cpu_expand_replacement_matches_vllm_contract():
    x = torch.tensor([0.5, 0.0, 2.0])
    cu = torch.tensor([2, 5, 6])
    out = patches.expand_batch_to_tokens(x, cu, 6, replace_from=0.0, replace_to=1.0)
    assert out.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0] and out.dtype == x.dtype


def test_cpu_expand_patch_is_applied_on_cpu():
    import vllm.v1.sample.rejection_sampler as rs
    patches.patch_cpu_expand()
    patches.patch_cpu_expand()
    assert rs.expand_batch_to_tokens is patches.expand_batch_to_tokens
    temps = rs.expand_batch_to_tokens(torch.tensor([0.8, 0.3]), torch.tensor([3, 5]), 5)
    assert torch.allclose(temps, torch.tensor([0.8, 0.8, 0.8, 0.3, 0.3]))


# patch 5: full CUDA graphs for uniform batches of 1..gamma_max+1 tokens per request ----------------------------
def _dispatcher(knapspec=None, sizes=(6, 12, 18, 24, 30)):
    from vllm.config import CompilationConfig, CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    patches.patch_uniform_graphs()
    patches.patch_uniform_graphs()                       # idempotent
    cc = CompilationConfig(mode=3, cudagraph_mode="NONE", cudagraph_capture_sizes=list(sizes),
                           max_cudagraph_capture_size=max(sizes))
    vc = SimpleNamespace(compilation_config=cc, num_speculative_tokens=5, lora_config=None,
                         scheduler_config=SimpleNamespace(max_num_seqs=16, max_num_batched_tokens=8192),
                         speculative_config=SimpleNamespace(model=ks.PROPOSER_PATH, knapspec=knapspec or {}),
                         parallel_config=SimpleNamespace(data_parallel_size=1))
    d = CudagraphDispatcher(vc)                          # a real vLLM dispatcher, keys as the GPU runner makes them
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 6)
    return d


def test_uniform_graph_sizes_and_padding():
    assert patches.uniform_graph_sizes(1, 16, 8192, 30) == [1, 2, 4, 8, 16]     # plain decoding's own sizes
    assert patches.uniform_graph_sizes(6, 16, 8192, 96) == [6, 12, 24, 48, 96]
    assert patches.uniform_graph_sizes(6, 16, 8192, 30) == [6, 12, 24]          # FA3 graphs stop at max size
    assert patches.pad_uniform(5, 1, [1, 2, 4, 8]) == 8
    assert patches.pad_uniform(7, 2, [2, 4, 8]) is None                        # not q tokens per request
    assert patches.pad_uniform(9, 1, [1, 2, 4, 8]) is None                     # past the largest graph


def test_dispatcher_has_full_graphs_for_every_query_length():
    from vllm.config import CUDAGraphMode
    d = _dispatcher()
    full = {(k.num_tokens, k.num_reqs) for k in d.cudagraph_keys[CUDAGraphMode.FULL]}
    assert {(1, 1), (8, 8), (16, 16), (2, 1), (8, 4), (30, 5), (18, 3)} <= full
    assert d.dispatch(18, True) == (CUDAGraphMode.FULL, d.dispatch(18, True)[1])   # vLLM's own gamma_max+1 graph
    assert d.dispatch(18, True)[1].num_reqs == 3
    d._ks_q = 1                                          # a step without drafts: 5 requests x 1 token
    mode, desc = d.dispatch(5, True)
    assert mode == CUDAGraphMode.FULL and (desc.num_tokens, desc.num_reqs, desc.uniform) == (8, 8, True)
    d._ks_q = 2
    assert d.dispatch(6, True)[0] == CUDAGraphMode.FULL and d.dispatch(6, True)[1].num_reqs == 4
    assert d.dispatch(34, True)[0] == CUDAGraphMode.NONE                         # beyond every graph: eager
    assert d.dispatch(6, True, invalid_modes={CUDAGraphMode.FULL})[0] == CUDAGraphMode.PIECEWISE
    d._ks_q = None
    assert d.dispatch(7, False)[0] == CUDAGraphMode.PIECEWISE                    # mixed batches untouched


def test_uniform_graphs_can_be_turned_off():
    from vllm.config import CUDAGraphMode
    d = _dispatcher({"uniform_graphs": False})
    full = {(k.num_tokens, k.num_reqs) for k in d.cudagraph_keys[CUDAGraphMode.FULL]}
    assert (1, 1) not in full and (18, 3) in full


def test_runner_treats_q_token_batches_as_uniform_while_dispatching():
    seen = []

    def orig(self, num_tokens, num_reqs, sched, max_q, *a, **kw):
        seen.append((self.uniform_decode_query_len, self.cudagraph_dispatcher._ks_q))

    det = patches._make_determine(orig)
    runner = SimpleNamespace(cudagraph_dispatcher=_dispatcher(), uniform_decode_query_len=6)
    det(runner, 4, 4, None, 1, False)                    # 4 requests x 1 token: dispatched as q = 1
    det(runner, 12, 4, None, 3, False)                   # 4 x 3 tokens: q = 3
    det(runner, 7, 4, None, 3, False)                    # mixed lengths: vLLM's way
    det(runner, 12, 2, None, 6, False)                   # gamma_max + 1: vLLM's way
    assert seen == [(1, 1), (3, 3), (6, None), (6, None)]
    assert runner.uniform_decode_query_len == 6 and runner.cudagraph_dispatcher._ks_q is None


# patch 6: steps without drafts take vLLM's plain sampling path ----------------------------------------------
def test_step_without_drafts_takes_the_plain_path():
    seen = []
    prep = patches._make_prepare(lambda self, so: seen.append(self.speculative_config))
    spec = SimpleNamespace(model=ks.PROPOSER_PATH)
    runner = SimpleNamespace(speculative_config=spec)
    prep(runner, SimpleNamespace(scheduled_spec_decode_tokens={}))              # nobody drafted
    prep(runner, SimpleNamespace(scheduled_spec_decode_tokens={"r1": [5, 6]}))  # a verification step
    other = SimpleNamespace(speculative_config=SimpleNamespace(model="ngram"))
    prep(other, SimpleNamespace(scheduled_spec_decode_tokens={}))               # not KnapSpec: untouched
    assert seen == [None, spec, other.speculative_config] and runner.speculative_config is spec


def test_plain_path_patch_matches_this_vllm():
    import inspect
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    patches.patch_plain_steps()
    patches.patch_plain_steps()                                                # idempotent
    fn = GPUModelRunner.__dict__["_prepare_inputs"]
    src = inspect.getsource(getattr(fn, "__wrapped__", fn))
    assert getattr(fn, patches._MARK, False) == (patches._ALWAYS_SPEC in src)


def test_patch7_runs_the_drafter_warmup_after_graph_capture():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm_knapspec import patches
    patches.apply_all()
    assert getattr(GPUModelRunner.__dict__["capture_model"], patches._MARK, False)
    calls = []

    class Drafter:
        def warmup_after_kv_cache(self):
            calls.append("warm")

    class Runner:
        drafter = Drafter()
    capture = patches._make_capture_model(lambda self: calls.append("capture") or 7)
    assert capture(Runner()) == 7 and calls == ["capture", "warm"]
    Runner.drafter = object()                 # another proposer (or none): untouched
    assert capture(Runner()) == 7 and calls == ["capture", "warm", "capture"]


class _QuietProposer:
    """Stands in for KnapSpecProposer's quiet-path hooks: steps 2 and 3 may go quietly."""
    def __init__(self):
        self.step, self.calls, self.went_quiet = 0, [], False
        self.stats = SimpleNamespace(fallback=lambda log: self.calls.append("fallback"))

    def quiet_begin(self, so):
        self.step += 1
        self.went_quiet = False
        if so == "boom":
            raise RuntimeError("injected")
        return self.step in (2, 3)

    def quiet_end(self):
        self.went_quiet = True
        self.calls.append("end")

    def hand_over(self):
        self.calls.append("hand_over")


def test_patch9_runs_quiet_steps_without_the_speculative_config():
    spec, seen = object(), []

    class Runner:                    # execute_model / sample_tokens as vLLM's runner has them (class methods)
        speculative_config = spec

        def execute_model(self, so, intermediate_tensors=None):
            seen.append(("execute", self.speculative_config is spec))

        def sample_tokens(self, grammar_output):
            seen.append(("sample", self.speculative_config is spec))
            return "out"
    runner, prop = Runner(), _QuietProposer()
    assert patches.install_quiet_steps(runner, prop) and patches.install_quiet_steps(runner, prop)  # idempotent
    for _ in range(4):
        runner.execute_model("so")
        assert runner.sample_tokens(None) == "out"
    assert seen == [("execute", True), ("sample", True)] + [("execute", False), ("sample", False)] * 2 + \
        [("execute", True), ("sample", True)]
    assert runner.speculative_config is spec and Runner.speculative_config is spec
    assert prop.calls == ["hand_over", "hand_over", "end", "hand_over", "end", "hand_over"]
    runner.execute_model("boom")               # a quiet-path error: counted, and the step runs as a full one
    assert seen[-1] == ("execute", True) and "fallback" in prop.calls
    assert "execute_model" not in Runner().__dict__          # other runners (plain engines) untouched


def test_patch10_answers_no_drafts_after_a_quiet_step_without_the_rpc():
    rpc = []
    take = patches._make_take(lambda self: rpc.append(1) or "drafts")
    drafter = SimpleNamespace(went_quiet=True)
    executor = SimpleNamespace(driver_worker=SimpleNamespace(worker=SimpleNamespace(
        model_runner=SimpleNamespace(drafter=drafter))))
    assert take(executor) is None and rpc == []
    drafter.went_quiet = False
    assert take(executor) == "drafts" and rpc == [1]
    executor.driver_worker.worker.model_runner.drafter = None           # another method (or none): vLLM's path
    assert take(executor) == "drafts" and rpc == [1, 1]
    from vllm.v1.executor.uniproc_executor import UniProcExecutor
    patches.apply_all()
    assert getattr(UniProcExecutor.__dict__["take_draft_token_ids"], patches._MARK, False)
