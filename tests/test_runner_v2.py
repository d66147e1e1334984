"""The V2-runner adapter's parts that run without a GPU: the patches' decisions, the translation of the V2 runner's
state into what the drafter reads, and the drafter's quiet plain steps. The V2 path itself runs on the GPU
(tools/gpu_bench.py; numbers in docs/gpu.md)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_knapspec.adapter import drafter as drafter_mod
from vllm_knapspec.adapter.metrics import KnapSpecStats
from vllm_knapspec.adapter.patches import runner_v2 as patches_v2
from vllm_knapspec.adapter.runner_v2 import RunnerView, _StepMetadata

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


def test_decode_lengths_schedule_is_a_valid_vllm_schedule():
    from vllm.v1.spec_decode.dynamic.utils import validate_and_normalize_dynamic_sd_schedule

    schedule = patches_v2.decode_lengths_schedule(4)
    assert [g for _, _, g in schedule] == [0, 1, 2, 3, 4]  # verification lengths 1..5
    validate_and_normalize_dynamic_sd_schedule(schedule)  # raises on a malformed schedule


def test_every_decode_batch_replays_a_full_graph():
    """With FULL decode graphs for verification lengths 1..1+k, vLLM's candidate lists hide graphs: 6 requests
    verifying nothing (6 tokens) find only the size-6 graphs of 1 x 6 and 2 x 3 tokens and miss the FULL graph
    of 8 x 1 (eager on vLLM 0.26, PIECEWISE on 0.32). The v2_decode_graphs patch lists, per tokens per request,
    the smallest FULL graph that holds the batch: each uniform decode batch replays the smallest FULL graph that
    fits it, mixed batches keep vLLM's PIECEWISE graph, and the captured graphs are the same."""
    from graph_dispatch import dispatchers  # tools/
    from vllm.config import CUDAGraphMode

    k = 5
    vllm_own, patched = dispatchers(k)
    assert patched._capture_descs == vllm_own._capture_descs  # the same graphs are captured
    assert vllm_own.dispatch(6, 6, 1, 0).cg_mode != CUDAGraphMode.FULL  # what the patch is for
    for q in range(1, k + 2):
        for n in range(1, 17):
            d = patched.dispatch(n, n * q, q, 0)
            assert d.cg_mode == CUDAGraphMode.FULL and d.uniform_token_count == q and d.num_reqs >= n, (n, q, d)
            # the smallest FULL graph for q tokens per request that holds n requests
            best = min(
                g.num_tokens
                for g in patched._capture_descs[CUDAGraphMode.FULL]
                if g.uniform_token_count == q and g.num_reqs >= n
            )
            assert d.num_tokens == best, (n, q, d)
    for tokens in (3, 6, 20, 30):  # a batch with a prefill: vLLM's PIECEWISE graph of the smallest size
        assert patched.dispatch(2, tokens, None, 0) == vllm_own.dispatch(2, tokens, None, 0)


def test_full_graphs_for_any_batch_dispatch_as_vllm_does():
    """cudagraph_mode FULL: one kind of FULL graph serves every batch (no separate decode graphs), so the lists
    give every batch vLLM's own graph."""
    from graph_dispatch import dispatchers  # tools/
    from vllm.config import CUDAGraphMode

    vllm_own, patched = dispatchers(5, mode=CUDAGraphMode.FULL)
    for q in range(1, 7):
        for n in range(1, 17):
            assert patched.dispatch(n, n * q, q, 0) == vllm_own.dispatch(n, n * q, q, 0)
            assert patched.dispatch(n, n * q, None, 0) == vllm_own.dispatch(n, n * q, None, 0)


def test_uniform_graphs_false_leaves_vllms_graphs_and_lists():
    """`uniform_graphs: false`: the v2_decode_graphs patch steps aside (vLLM's own graphs, for 1 + k tokens per
    request only, and vLLM's candidate lists)."""
    from graph_dispatch import graph_manager  # tools/
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

    own, _ = graph_manager(5)
    CudaGraphManager._init_candidates(own)
    off, spec = graph_manager(5)
    spec.knapspec = {"uniform_graphs": False}
    patches_v2._make_init_candidates(CudaGraphManager._init_candidates)(off)
    assert off._candidates == own._candidates and off._capture_descs == own._capture_descs
    assert {d.uniform_token_count for descs in off._capture_descs.values() for d in descs} <= {None, 6}


@pytest.mark.parametrize("cuda", [True, False])
def test_v2_admits_knapspec_on_cuda_only(monkeypatch, cuda):
    monkeypatch.setattr(patches_v2, "_on_cuda", lambda: cuda)
    reasons = ["speculative method 'draft_model'", "prompt embeds"]
    fn = patches_v2._make_unsupported(lambda self: list(reasons))
    ks = SimpleNamespace(speculative_config=SimpleNamespace(method="draft_model", knapspec={"method": "knapspec"}))
    plain_draft = SimpleNamespace(speculative_config=SimpleNamespace(method="draft_model"))
    assert fn(ks) == (["prompt embeds"] if cuda else reasons)
    assert fn(plain_draft) == reasons  # vLLM's own draft_model stays on V1


def _fake_v2_runner():
    tables = SimpleNamespace(
        kernel_block_sizes=[16],
        max_num_reqs=4,
        input_block_tables=[torch.arange(4 * 8, dtype=torch.int32).view(4, 8)],
        num_blocks=SimpleNamespace(np=np.array([[3, 5, 7, 9]], dtype=np.int32)),
    )
    tokens = torch.arange(4 * 32, dtype=torch.int32).view(4, 32)
    return SimpleNamespace(
        device=torch.device("cpu"),
        max_num_reqs=4,
        block_tables=tables,
        req_states=SimpleNamespace(all_token_ids=SimpleNamespace(gpu=tokens)),
        attn_groups=[[]],
        kv_caches=[],
    )


def test_runner_view_reads_rows_in_batch_order():
    view = RunnerView(_fake_v2_runner())
    view.idx_np = np.array([2, 0], dtype=np.int32)  # batch row 0 is request state 2, row 1 is state 0
    bt = view.input_batch.block_table[0]
    assert bt.block_size == 16 and bt.max_num_reqs == 4
    assert bt.num_blocks_per_row.tolist() == [7, 3]
    assert bt.get_device_tensor(2).shape == (2, 8)
    assert view.input_batch.token_ids_cpu[0, 3:6].tolist() == [67, 68, 69]  # state 2's tokens 3..5
    assert view.host_tokens is False  # lookup drafts need the host token table


def test_step_metadata_from_input_batch():
    batch = SimpleNamespace(
        num_reqs=2,
        seq_lens=torch.tensor([10, 20]),
        seq_lens_cpu_upper_bound=torch.tensor([10, 20]),
        query_start_loc_np=np.array([0, 5, 6], dtype=np.int32),
        num_draft_tokens_per_req=np.array([4, 0]),
    )
    md = _StepMetadata(batch)
    assert md.num_reqs == 2 and md.query_start_loc_cpu.tolist() == [0, 5, 6]
    assert md.num_draft_tokens.tolist() == [4, 0]


class _Selector:
    def __init__(self):
        self.plans, self.quiet, self.quiet_ctx = 0, [], []

    def plan(self, rows, ctx):
        self.plans += 1
        return None

    def observe_verify(self, *a, **k):
        pass

    def observe_quiet(self, steps, seconds, ctx=None):
        self.quiet.append(steps)
        self.quiet_ctx.append(ctx)


def _drafter(gamma: int):
    d = drafter_mod.KnapSpecDrafter.__new__(drafter_mod.KnapSpecDrafter)  # host logic only: no engine
    d.k_max, d.stats, d.channel, d._next_gamma = 4, KnapSpecStats.get(), None, gamma
    d.feedback = drafter_mod._Feedback(torch.device("cpu"))
    d._last_call = d._prev_reqs = d._prev_ids = d.runner = None
    d._verified_next, d._quiet, d._quiet_n, d._quiet_s, d._stride = 0, 0, 0, 0.0, drafter_mod.QUIET_STRIDE
    d.graphs = d.lookup = d.device_lookup = d._lookup_prev = d.trace = d.quiet_trace = None
    d._draft_step, d._lookup_warm, d._quiet_mixed = None, 0, False
    d.selector, d._drafts = _Selector(), torch.zeros(4, 4, dtype=torch.int64)
    return d


def _metadata(n: int, drafts=None):
    return SimpleNamespace(
        num_reqs=n,
        seq_lens=torch.full((n,), 100),
        seq_lens_cpu_upper_bound=torch.full((n,), 100),
        query_start_loc_cpu=torch.arange(n + 1, dtype=torch.int32),
        num_draft_tokens=drafts,
    )


# While plain decoding is planned for a batch of one size, the full steps come after strides of 8, 16, 32, 64, 64:
# 5 full steps in 184.
STRIDE_STEPS, STRIDE_FULL = 184, 5


def test_plain_steps_reach_the_selector_one_in_stride():
    d = _drafter(gamma=0)
    before = d.stats.counters["no_spec_steps"]
    for _ in range(STRIDE_STEPS):
        d.propose(4, None, None, None, torch.zeros(2, dtype=torch.int64), None, _metadata(2), None)
    assert d.selector.plans == STRIDE_FULL
    assert d._stride == drafter_mod.QUIET_STRIDE_MAX
    assert sum(d.selector.quiet) + d._quiet_n == STRIDE_STEPS - d.selector.plans  # every quiet step is accounted
    assert d.stats.counters["no_spec_steps"] - before == STRIDE_STEPS  # and counted


def test_a_batch_that_changes_size_is_planned_at_once():
    """A request arriving or leaving makes the next step a full one and the stride short again: a new request
    gets its lookup search and a plan within a step, not within QUIET_STRIDE_MAX."""
    d = _drafter(gamma=0)
    for _ in range(3 * drafter_mod.QUIET_STRIDE + 3):  # 3 quiet steps pending at the resize
        d.propose(4, None, None, None, torch.zeros(2, dtype=torch.int64), None, _metadata(2), None)
    plans, stride = d.selector.plans, d._stride
    assert stride > drafter_mod.QUIET_STRIDE
    d.propose(4, None, None, None, torch.zeros(3, dtype=torch.int64), None, _metadata(3), None)
    assert d.selector.plans == plans + 1 and d._stride == drafter_mod.QUIET_STRIDE
    for _ in range(drafter_mod.QUIET_STRIDE):
        d.propose(4, None, None, None, torch.zeros(3, dtype=torch.int64), None, _metadata(3), None)
    assert d.selector.plans == plans + 2  # the short stride again
    # quiet windows price plain decoding with their batch's context; the one a resize ended does not
    ctxs = d.selector.quiet_ctx
    assert [None if c is None else len(c) for c in ctxs] == [2, 2, None, 3]


class _DeviceLookup:
    """What KnapSpecDrafter asks of lookup_device.DeviceLookup on a plain route (no lookup source)."""

    def __init__(self, kept: int = 0, shadow_hits: int = 0, allowed: bool = True):
        self.costs, self.kept, self.shadow_hits = [], kept, shadow_hits
        self.guard = SimpleNamespace(tick=lambda k: None, allowed=allowed)

    def seen(self, rec):
        pass

    def observe_cost(self, selector, ctx, n, verified, accepted, seconds):
        self.costs.append((n, verified, seconds))
        return False

    def observe(self, rec, req_ids, ver, rej):
        return np.ones(len(req_ids), dtype=bool), 4, self.kept


def test_quiet_windows_price_plain_steps_for_device_lookup_drafts():
    """With device lookup drafts, plain decoding's cost in VerifyJump comes from the quiet windows (their mean
    step), not from the full steps that plan plain decoding, which also pay the search and the choice."""
    d = _drafter(gamma=0)
    d.device_lookup = _DeviceLookup()
    for _ in range(STRIDE_STEPS):
        d.propose(4, None, None, None, torch.zeros(2, dtype=torch.int64), None, _metadata(2), None)
    assert len(d.device_lookup.costs) == STRIDE_FULL  # one per quiet window, at the full step after it
    assert all(n == 2 and v == 0 and sec > 0 for n, v, sec in d.device_lookup.costs)


def test_stride_stays_short_while_lookup_drafts_keep_tokens():
    """A lookup draft that kept tokens keeps the stride at QUIET_STRIDE for LOOKUP_WARM full steps: text that
    copies does so in bursts, and the next burst is matched within QUIET_STRIDE steps, not QUIET_STRIDE_MAX."""
    d = _drafter(gamma=0)
    d.device_lookup = _DeviceLookup(kept=3)
    step = SimpleNamespace(lookup_rec=(object(), False), n=2, verified=np.array([4, 4]), rejected=None)
    step.req_ids = ["a", "b"]
    d._observe_device_lookup(step)
    for _ in range(drafter_mod.LOOKUP_WARM * drafter_mod.QUIET_STRIDE):
        d.propose(4, None, None, None, torch.zeros(2, dtype=torch.int64), None, _metadata(2), None)
    assert d._stride == drafter_mod.QUIET_STRIDE and d.selector.plans == drafter_mod.LOOKUP_WARM
    for _ in range(drafter_mod.QUIET_STRIDE):
        d.propose(4, None, None, None, torch.zeros(2, dtype=torch.int64), None, _metadata(2), None)
    assert d._stride == 2 * drafter_mod.QUIET_STRIDE  # warm spent: doubling again


def test_a_shadow_hit_shortens_the_stride():
    """A request that drafts nothing while its text starts copying: a full step's shadow trial that predicted the
    bonus token makes the stride QUIET_STRIDE again (from QUIET_STRIDE_MAX), so its acceptance gets trials
    every QUIET_STRIDE steps; without a hit, or with the lookup guard holding lookup drafts off, it stays long."""
    for hits, allowed, stride in (
        (1, True, drafter_mod.QUIET_STRIDE),
        (0, True, drafter_mod.QUIET_STRIDE_MAX),
        (1, False, drafter_mod.QUIET_STRIDE_MAX),
    ):
        d = _drafter(gamma=0)
        d.device_lookup = _DeviceLookup(shadow_hits=hits, allowed=allowed)
        for _ in range(STRIDE_STEPS):
            d.propose(4, None, None, None, torch.zeros(2, dtype=torch.int64), None, _metadata(2), None)
        assert d._stride == drafter_mod.QUIET_STRIDE_MAX
        step = SimpleNamespace(lookup_rec=(object(), False), n=2, verified=np.array([0, 0]), rejected=None)
        step.req_ids = ["a", "b"]
        d._observe_device_lookup(step)
        assert d._stride == stride


def test_drafting_steps_are_never_quiet():
    d = _drafter(gamma=3)
    assert d.quiet_step(2, 4) is None and d.quiet_step(2, 4) is None


def test_verified_counts_per_request_where_the_runner_gives_them():
    d = _drafter(gamma=0)
    d._verified_next = 4
    assert d._verified(_metadata(2, np.array([4, 0])), 2).tolist() == [4, 0]
    assert d._verified(_metadata(2, None), 2) == 0  # V2: no drafts scheduled this step
    assert d._verified(SimpleNamespace(num_reqs=2), 2) == 4  # V1: what the last propose() returned


def _v2_batch(states: list[int], seq_len: int, req_ids=None):
    """A decode step's V2 InputBatch: one token per row, no drafts scheduled; row i is request state states[i]."""
    n = len(states)
    return SimpleNamespace(
        num_reqs=n,
        num_tokens=n,
        req_ids=req_ids or [f"r{i}" for i in range(n)],
        idx_mapping_np=np.array(states, dtype=np.int32),
        idx_mapping=torch.tensor(states),
        seq_lens=torch.full((n,), seq_len),
        seq_lens_cpu_upper_bound=torch.full((n,), seq_len),
        query_start_loc_np=np.arange(n + 1, dtype=np.int32),
        num_draft_tokens_per_req=None,
    )


def test_v2_plain_steps_reach_the_selector_one_in_stride():
    """Through the V2 speculator too, while plain decoding is planned the selector sees one step per stride
    (the quiet check runs once per step)."""
    from vllm_knapspec.adapter.runner_v2 import KnapSpecSpeculator

    d = _drafter(gamma=0)
    spec = SimpleNamespace(drafter=d, view=SimpleNamespace(idx_np=None), num_speculative_steps=4)
    spec.draft_tokens = torch.zeros(4, 4, dtype=torch.int64)
    batch = _v2_batch([0, 1], seq_len=100)
    ones, zeros = torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    last = torch.zeros(4, 1, dtype=torch.int64)
    for _ in range(STRIDE_STEPS):
        KnapSpecSpeculator.propose(spec, batch, {}, {}, None, None, ones, zeros, last, zeros, None, None)
    assert d.selector.plans == STRIDE_FULL


def test_v2_plain_steps_sample_without_the_speculator():
    """The v2_plain_steps patch: a step that verified no drafts and that the drafter keeps quiet runs vLLM's
    sample_tokens with no speculator (no propose, no draft-token copies); a full step, a step that verified
    drafts and sync scheduling keep it, and propose() does not ask quiet_step twice for one step."""
    from vllm_knapspec.adapter.runner_v2 import KnapSpecSpeculator

    d = _drafter(gamma=0)
    spec = KnapSpecSpeculator.__new__(KnapSpecSpeculator)
    spec.drafter, spec.num_speculative_steps, spec.decided, spec.async_scheduling = d, 4, False, True
    seen = []
    runner = SimpleNamespace(speculator=spec, num_speculative_steps=4, is_last_pp_rank=True)
    sample = patches_v2._make_sample_tokens(lambda self, g: seen.append(self.speculator) or self.num_speculative_steps)
    batch = SimpleNamespace(num_reqs=2, num_tokens=2, num_draft_tokens=0, has_structured_output_reqs=False)
    runner.execute_model_state = SimpleNamespace(input_batch=batch)
    ks = [sample(runner, None) for _ in range(drafter_mod.QUIET_STRIDE)]
    assert seen.count(None) == drafter_mod.QUIET_STRIDE - 1 and ks.count(0) == drafter_mod.QUIET_STRIDE - 1
    assert seen[-1] is spec and spec.decided  # the full step: propose() runs it without asking again
    assert runner.speculator is spec and runner.num_speculative_steps == 4  # restored
    seen.clear()
    batch.num_draft_tokens = 3
    sample(runner, None)
    spec.async_scheduling, batch.num_draft_tokens = False, 0
    sample(runner, None)
    assert seen == [spec, spec]


def test_v2_lookup_drafts_are_matched_on_the_device_tokens():
    """With `lookup: auto` under async scheduling, a full step of the V2 speculator matches each row's tokens
    in the runner's request states (vLLM's GPU matcher, here on CPU tensors) and returns them as drafts; the
    next full step reads back what was matched."""
    from vllm_knapspec.adapter.lookup_device import DeviceLookup
    from vllm_knapspec.adapter.runner_v2 import KnapSpecSpeculator

    d = _drafter(gamma=0)
    d.device_lookup, d._lookup_prev = DeviceLookup(SimpleNamespace(lookup_min=2, lookup_max=3), 4, "cpu"), None
    runner = _fake_v2_runner()
    runner.req_states.all_token_ids.gpu[1, :8] = torch.tensor([1, 2, 3, 4, 5, 6, 1, 2], dtype=torch.int32)
    runner.req_states.all_token_ids.gpu[0, 8] = 9  # the runner writes each sampled token (post_update) before
    # propose(): state 0's last one, as in `last`
    runner.req_states.total_len = SimpleNamespace(gpu=torch.tensor([9, 8, 9, 9], dtype=torch.int32))
    spec = SimpleNamespace(drafter=d, view=SimpleNamespace(idx_np=None, runner=runner), num_speculative_steps=4)
    spec._lookup_source = lambda b, n: KnapSpecSpeculator._lookup_source(spec, b, n)
    batch = _v2_batch([1, 0], seq_len=8, req_ids=["a", "b"])
    ones, zeros = torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    last = torch.tensor([[9], [2], [0], [0]])
    outs = [
        KnapSpecSpeculator.propose(spec, batch, {}, {}, None, None, ones, zeros, last, zeros, None, None).clone()
        for _ in range(3 * drafter_mod.QUIET_STRIDE)  # full steps: the 8th and, the stride doubled, the 24th
    ]
    full = outs[drafter_mod.QUIET_STRIDE - 1]  # the first step the selector sees
    assert full.tolist() == [[3, 4, 5, 6], [9, 9, 9, 9]]  # row a copies after "1 2"; row b (state 0) has no match
    assert d.device_lookup.match_len == {"a": 4, "b": 0}  # read back by the next full step


def test_a_step_gap_reaches_the_selector_less_the_draft_loop_it_held():
    """Steps are timed propose() to propose(), so the gap after a drafting step holds that step's draft loop: the
    selector gets the gap less the loop (else the verification is priced with a draft in it and the guard
    charges each draft twice). A quiet step takes the loop into its own gap."""
    d = _drafter(gamma=3)
    d._draft = lambda *a: None  # the loop's host logic only: no draft model here
    seen = []
    d.selector.observe_verify = lambda ctx, p, a, seconds, steady, verified=None: seen.append(seconds)
    d.selector.observe_draft = lambda *a: None
    first = d._begin(_metadata(2), 2, None)
    d._timed_draft(first, None, 3, None, None, None, 2, "skip")
    first.draft_s = 0.006  # what the loop took (host time on a CPU, device time on a GPU)
    second = d._begin(_metadata(2), 2, None)
    assert second.held is first and d._draft_step is None
    second.gap = 0.010
    d._report(first)
    d._report(second)
    assert seen[0] is None and abs(seen[1] - 0.004) < 1e-12
    assert second.held is None  # read once: a run of drafting steps is not a chain of live records
    third = d._begin(_metadata(2), 2, None)
    d._timed_draft(third, None, 3, None, None, None, 2, "skip")
    d._next_gamma = 0
    for _ in range(drafter_mod.QUIET_STRIDE - 1):
        assert d.quiet_step(2, 4) is not None
    assert d._begin(_metadata(2), 2, None).held is None


def test_a_step_that_held_a_prompt_is_not_a_decode_steps_cost():
    """A step whose batch held prompt tokens (a row scheduled more than 1 + k_max tokens) is not steady: its gap
    prices neither plain decoding nor a draft's verification (drafter.holds_prompt)."""
    d = _drafter(gamma=0)
    d._begin(_metadata(2), 2, None)
    assert d._begin(_metadata(2), 2, None).steady  # two decode rows, the same batch
    md = _metadata(2)
    md.query_start_loc_cpu = torch.tensor([0, 1, 513], dtype=torch.int32)  # row 1: a 512-token prompt chunk
    assert not d._begin(md, 2, None).steady
    md.query_start_loc_cpu = torch.tensor([0, 1, 6], dtype=torch.int32)  # row 1 verifies 4 drafts: decoding
    assert d._begin(md, 2, None).steady


def test_a_step_of_other_requests_is_not_a_decode_steps_cost():
    """As many requests as the step before, but others (one batch ended, the next began): the gap may hold the
    engine's idle time between them, so the step is not steady; the next step of the same requests is."""
    d = _drafter(gamma=0)
    d.runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["a", "b"]))
    d._begin(_metadata(2), 2, None)
    assert d._begin(_metadata(2), 2, None).steady
    d.runner.input_batch.req_ids = ["c", "d"]
    assert not d._begin(_metadata(2), 2, None).steady
    assert d._begin(_metadata(2), 2, None).steady
