"""Code paths that differ between vLLM 0.26 (GPU) and 0.32 (CPU), tested on both shapes with stand-ins."""

from types import SimpleNamespace

from vllm_knapspec.adapter import patches
from vllm_knapspec.adapter.patches import base, drafting, uniform_graphs

KS_SPEC = SimpleNamespace(knapspec={}, num_speculative_tokens=6)
OTHER_SPEC = SimpleNamespace(model="ngram", num_speculative_tokens=3)


def test_draft_length_control_feeds_the_scheduler_lookup():
    """The scheduler schedules what the drafter plans (0: a plain step); gamma_max without a drafter."""
    from vllm_knapspec.adapter.control import DraftLengthControl

    class Scheduler:
        def __init__(self, vllm_config):
            self.dynamic_sd_lookup = None

    base.wrap(Scheduler, "__init__", lambda orig: drafting.make_control_init(orig))
    base.wrap(Scheduler, "__init__", lambda orig: drafting.make_control_init(orig))  # idempotent
    s = Scheduler(SimpleNamespace(speculative_config=KS_SPEC, instance_id="t1"))
    assert Scheduler(SimpleNamespace(speculative_config=OTHER_SPEC, instance_id="t2")).dynamic_sd_lookup is None
    try:
        assert s.dynamic_sd_lookup[3] == 6
        DraftLengthControl.drafters["t1"] = SimpleNamespace(next_gamma=0)
        assert s.dynamic_sd_lookup[3] == 0
        DraftLengthControl.drafters["t1"].next_gamma = 4
        assert s.dynamic_sd_lookup[16] == 4
    finally:
        DraftLengthControl.drafters.pop("t1", None)


def _drafter_process(folder, gamma):
    from vllm_knapspec.adapter.control import GammaChannel

    GammaChannel.open("engine-a", folder).write(gamma)


def test_draft_length_crosses_processes(tmp_path):
    """A scheduler in another process than the drafter (multiprocess executor) reads the plan through the
    engine's channel; engines do not read each other's."""
    import multiprocessing

    from vllm_knapspec.adapter.control import DraftLengthControl, GammaChannel

    assert GammaChannel.open("engine-a", str(tmp_path / "missing")) is None  # no folder: no channel

    control = DraftLengthControl(5, "engine-a")
    control.channel = GammaChannel.open("engine-a", str(tmp_path))
    other = DraftLengthControl(5, "engine-b")
    other.channel = GammaChannel.open("engine-b", str(tmp_path))
    assert control[1] == 5  # nothing planned yet: gamma_max
    for gamma in (0, 3):
        p = multiprocessing.get_context("spawn").Process(target=_drafter_process, args=(str(tmp_path), gamma))
        p.start()
        p.join()
        assert control[8] == gamma
    assert other[8] == 5


# uniform_graphs: full CUDA graphs for uniform batches of 1..gamma_max+1 tokens per request ----------------------------
def _dispatcher(knapspec=None, sizes=(6, 12, 18, 24, 30)):
    from vllm.config import CompilationConfig, CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    uniform_graphs.patch_uniform_graphs()
    uniform_graphs.patch_uniform_graphs()  # idempotent
    cc = CompilationConfig(
        mode=3, cudagraph_mode="NONE", cudagraph_capture_sizes=list(sizes), max_cudagraph_capture_size=max(sizes)
    )
    vc = SimpleNamespace(
        compilation_config=cc,
        num_speculative_tokens=5,
        lora_config=None,
        scheduler_config=SimpleNamespace(max_num_seqs=16, max_num_batched_tokens=8192),
        speculative_config=SimpleNamespace(knapspec=knapspec or {}),
        parallel_config=SimpleNamespace(data_parallel_size=1),
    )
    d = CudagraphDispatcher(vc)  # a real vLLM dispatcher, keys as the GPU runner makes them
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 6)
    return d


def test_uniform_graph_sizes_and_padding():
    assert uniform_graphs.uniform_graph_sizes(1, 16, 8192, 30) == [1, 2, 4, 8, 16]  # plain decoding's own sizes
    assert uniform_graphs.uniform_graph_sizes(6, 16, 8192, 96) == [6, 12, 24, 48, 96]
    assert uniform_graphs.uniform_graph_sizes(6, 16, 8192, 30) == [6, 12, 24]  # FA3 graphs stop at max size
    assert uniform_graphs.pad_uniform(5, 1, [1, 2, 4, 8]) == 8
    assert uniform_graphs.pad_uniform(7, 2, [2, 4, 8]) is None  # not q tokens per request
    assert uniform_graphs.pad_uniform(9, 1, [1, 2, 4, 8]) is None  # past the largest graph


def test_dispatcher_has_full_graphs_for_every_query_length():
    from vllm.config import CUDAGraphMode

    d = _dispatcher()
    full = {(k.num_tokens, k.num_reqs) for k in d.cudagraph_keys[CUDAGraphMode.FULL]}
    assert {(1, 1), (8, 8), (16, 16), (2, 1), (8, 4), (30, 5), (18, 3)} <= full
    assert d.dispatch(18, True) == (CUDAGraphMode.FULL, d.dispatch(18, True)[1])  # vLLM's own gamma_max+1 graph
    assert d.dispatch(18, True)[1].num_reqs == 3
    d._ks_q = 1  # a step without drafts: 5 requests x 1 token
    mode, desc = d.dispatch(5, True)
    assert mode == CUDAGraphMode.FULL and (desc.num_tokens, desc.num_reqs, desc.uniform) == (8, 8, True)
    d._ks_q = 2
    assert d.dispatch(6, True)[0] == CUDAGraphMode.FULL and d.dispatch(6, True)[1].num_reqs == 4
    assert d.dispatch(34, True)[0] == CUDAGraphMode.NONE  # beyond every graph: eager
    assert d.dispatch(6, True, invalid_modes={CUDAGraphMode.FULL})[0] == CUDAGraphMode.PIECEWISE
    d._ks_q = None
    assert d.dispatch(7, False)[0] == CUDAGraphMode.PIECEWISE  # mixed batches untouched


def test_uniform_graphs_can_be_turned_off():
    from vllm.config import CUDAGraphMode

    d = _dispatcher({"uniform_graphs": False})
    full = {(k.num_tokens, k.num_reqs) for k in d.cudagraph_keys[CUDAGraphMode.FULL]}
    assert (1, 1) not in full and (18, 3) in full


def test_runner_treats_q_token_batches_as_uniform_while_dispatching():
    seen = []

    def orig(self, num_tokens, num_reqs, sched, max_q, *a, **kw):
        seen.append((self.uniform_decode_query_len, self.cudagraph_dispatcher._ks_q))

    det = uniform_graphs._make_determine(orig)
    runner = SimpleNamespace(cudagraph_dispatcher=_dispatcher(), uniform_decode_query_len=6)
    det(runner, 4, 4, None, 1, False)  # 4 requests x 1 token: dispatched as q = 1
    det(runner, 12, 4, None, 3, False)  # 4 x 3 tokens: q = 3
    det(runner, 7, 4, None, 3, False)  # mixed lengths: vLLM's way
    det(runner, 12, 2, None, 6, False)  # gamma_max + 1: vLLM's way
    assert seen == [(1, 1), (3, 3), (6, None), (6, None)]
    assert runner.uniform_decode_query_len == 6 and runner.cudagraph_dispatcher._ks_q is None


# plain_steps: steps without drafts take vLLM's plain sampling path ----------------------------------------------
def test_step_without_drafts_takes_the_plain_path():
    seen = []
    prep = drafting.make_prepare(lambda self, so: seen.append(self.speculative_config))
    spec = SimpleNamespace(knapspec={})
    runner = SimpleNamespace(speculative_config=spec)
    prep(runner, SimpleNamespace(scheduled_spec_decode_tokens={}))  # nobody drafted
    prep(runner, SimpleNamespace(scheduled_spec_decode_tokens={"r1": [5, 6]}))  # a verification step
    other = SimpleNamespace(speculative_config=SimpleNamespace(model="ngram"))
    prep(other, SimpleNamespace(scheduled_spec_decode_tokens={}))  # not KnapSpec: untouched
    assert seen == [None, spec, other.speculative_config] and runner.speculative_config is spec


def test_plain_path_patch_matches_this_vllm():
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    drafting.patch_plain_steps()
    drafting.patch_plain_steps()  # idempotent
    fn = GPUModelRunner.__dict__["_prepare_inputs"]
    src = inspect.getsource(getattr(fn, "__wrapped__", fn))
    assert getattr(fn, base.MARK, False) == (drafting.ALWAYS_SPEC in src)


def test_drafter_warmup_runs_after_graph_capture():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    patches.apply_all()
    assert getattr(GPUModelRunner.__dict__["capture_model"], base.MARK, False)
    calls = []

    class Drafter:
        def warmup_after_kv_cache(self):
            calls.append("warm")

    class Runner:
        drafter = Drafter()

    capture = drafting.make_capture_model(lambda self: calls.append("capture") or 7)
    assert capture(Runner()) == 7 and calls == ["capture", "warm"]
    Runner.drafter = object()  # another proposer (or none): untouched
    assert capture(Runner()) == 7 and calls == ["capture", "warm", "capture"]
