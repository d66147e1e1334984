"""Prompt-lookup drafts as a KnapSpec candidate (lookup.py, lookup_drafts.py): the per-step choice, and on the
real model greedy output equal to plain decoding with lookup drafts, layer-skip drafts and both in one batch."""

import inspect
import json

import numpy as np
import pytest
from vllm import SamplingParams

from conftest import make_llm, spec_counters
from vllm_knapspec.core.lookup import LookupAcceptance, choose_step

GREEDY = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)


def t_verify(g):
    return 1.0 + 0.1 * g


def test_no_match_or_low_acceptance_decodes_plainly():
    none = choose_step(np.array([False, False]), np.array([0.9, 0.9]), None, 1.0, t_verify, None, 5)
    assert none.gamma == 0 and not none.lookup_rows.any()
    low = choose_step(np.array([True, True]), np.array([0.05, 0.05]), None, 1.0, t_verify, None, 5)
    assert low.gamma == 0


def test_lookup_rows_join_a_layer_skip_plan_where_they_do_better():
    c = choose_step(np.array([True, False, True]), np.array([0.95, 0.0, 0.1]), 0.9, 1.0, t_verify, 0.01, 5)
    assert c.use_skip and c.gamma > 0
    assert c.lookup_rows.tolist() == [True, False, False]  # row 2's lookup is worse than the plan's 0.9
    dear = choose_step(np.array([True, False]), np.array([0.95, 0.0]), 0.6, 1.0, t_verify, 2.0, 5)
    assert not dear.use_skip and dear.lookup_rows.tolist() == [True, False]  # draft steps too dear: lookup alone


def test_lookup_acceptance_learns_per_request():
    acc = LookupAcceptance()
    for _ in range(10):
        acc.observe("copy", 5, 5)
        acc.observe("prose", 5, 0)
    copy, prose = acc.alpha("copy"), acc.alpha("prose")
    assert copy[0] > 0.8 and copy[1] > 0.9 and prose[0] < 0.2
    acc.forget({"copy"})
    assert acc.alpha("prose") == pytest.approx(acc.pooled())  # a new request starts from the pooled rate


def test_new_requests_start_from_the_servers_rate():
    """Where requests rarely copy, a new request's first lookup drafts are priced low; where they copy, high."""
    prose, copy = LookupAcceptance(), LookupAcceptance()
    for i in range(20):
        prose.observe(f"p{i}", 4, 0)
        copy.observe(f"c{i}", 4, 4)
    assert prose.alpha("new")[0] < 0.1 and copy.alpha("new")[0] > 0.9


def test_lookup_acceptance_separates_the_first_token():
    """Half the drafts copied right for all 5 tokens, half wrong at their first: the first token is right half
    the time and every later token after a right one is right, so a 5-token draft brings 1 + 0.5 * 5 = 3.5
    tokens; one per-token rate (5/6 here) would price it at 1 + .83 + .69 + .58 + .48 + .40 = 3.99, and
    accepted / proposed (1/2) at 1.97."""
    from vllm_knapspec.core.lookup import lookup_tokens

    acc = LookupAcceptance(weight=1e-9)
    for _ in range(20):
        acc.observe("r", 5, 5)
        acc.observe("r", 5, 0)
    assert acc.alpha("r") == pytest.approx((0.5, 1.0))
    assert lookup_tokens(acc.alpha("r"), 5) == pytest.approx(3.5)
    acc.observe("r", 0, 0)  # nothing verified: no evidence
    assert acc.alpha("r") == pytest.approx((0.5, 1.0))


class _Batch:
    def __init__(self, ids):
        self.req_ids = ids


class _Runner:
    def __init__(self, ids):
        self.input_batch = _Batch(ids)


def _lookup_drafts(ids):
    from vllm_knapspec.adapter.lookup_drafts import LookupDrafts

    ld = object.__new__(LookupDrafts)  # no n-gram matcher needed: fill/observe only
    ld.runner, ld.acceptance, ld.pending, ld.pending_skip = _Runner(ids), LookupAcceptance(), {}, False
    ld.match_len, ld.ngram_len, ld.lengths = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), None
    ld.pos, ld.shadow = np.zeros(0, dtype=np.int64), {}
    return ld


def test_lookup_drafts_are_cut_per_row_and_accounted_as_verified():
    """Each row verifies its own draft only: a lookup row its lookup draft (cut to the match), any other row
    the layer-skip draft's steps (none without it); a lookup draft's acceptance counts the tokens it verified."""
    import torch

    ld = _lookup_drafts(["a", "b", "c"])
    ld.match_len = np.array([5, 0, 3])
    drafts = np.array([[1, 2, 3, 4, 5], [9, 9, 9, 9, 9], [6, 7, 8, 8, 8]])
    out = torch.zeros(3, 5, dtype=torch.int64)
    assert ld.fill(out, drafts, np.array([True, False, True]), 0) == 8
    assert out[[0, 2]].tolist() == drafts[[0, 2]].tolist() and ld.pending == {"a": (5, None), "c": (3, None)}
    assert ld.lengths == [5, 0, 3]
    not_skip, kept = ld.observe(3, np.array([0, 0, 1]))  # row a: all 5 accepted; row c: 2, then wrong
    assert kept == 7 and not_skip.all()
    # [first right, first trials, next right, next trials]: row c's 2nd token was right, its 3rd wrong
    assert ld.acceptance.counts == {"a": [1.0, 1.0, 4.0, 4.0], "c": [1.0, 1.0, 1.0, 2.0]}
    ld.fill(torch.zeros(3, 5, dtype=torch.int64), drafts, np.array([True, False, False]), 0)
    assert ld.lengths == [5, 0, 0] and ld.pending == {"a": (5, None)}  # row c has a match but was not chosen
    out = torch.zeros(3, 5, dtype=torch.int64)  # with a 3-step layer-skip draft: only the lookup rows are written
    ld.fill(out, drafts, np.array([True, False, False]), 3)
    assert out[1:].eq(0).all() and ld.pending == {"a": (5, None)} and ld.lengths == [5, 3, 3]
    assert ld.observe(3, np.array([1, 0, 0]))[0].tolist() == [True, False, False]
    ld.fill(torch.zeros(3, 0, dtype=torch.int64), drafts, np.array([True, False, True]), 0)
    assert ld.pending == {}  # nothing scheduled this step: nothing verified next


def test_rows_that_draft_nothing_still_teach_the_first_token_rate():
    """A row with a match that verifies nothing is a free trial of its match's first token: the token it emits
    next either is that token or is not. Rows that verify drafts (lookup or layer-skip) are not."""
    import torch

    ld = _lookup_drafts(["a", "b", "c"])
    ld.match_len, ld.ngram_len, ld.pos = np.array([5, 3, 0]), np.array([3, 2, 0]), np.array([100, 200, 300])
    drafts = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 8, 8], [9, 9, 9, 9, 9]])
    ld.fill(torch.zeros(3, 5, dtype=torch.int64), drafts, np.array([True, False, False]), 0)
    assert ld.shadow == {"b": (6, 2, 200)}  # a drafts, c has no match
    ld.observe_shadow(3, np.array([0, 6, 0]), np.array([105, 201, 301]))  # b emitted its match's first token
    ld.fill(torch.zeros(3, 5, dtype=torch.int64), drafts, np.array([False, False, False]), 0)
    assert set(ld.shadow) == {"a", "b"}
    ld.observe_shadow(3, np.array([4, 0, 0]), np.array([101, 203, 301]))  # a missed; b's position moved by 3
    assert ld.acceptance.counts == {"b": [1.0, 1.0, 0.0, 0.0], "a": [0.0, 1.0, 0.0, 0.0]}
    assert ld.shadow == {}
    ld.fill(torch.zeros(3, 5, dtype=torch.int64), drafts, np.array([False, False, False]), 2)
    assert ld.shadow == {}  # every row verifies the 2-step layer-skip draft


def test_runner_hands_the_scheduler_drafts_cut_per_row():
    class Out:
        def __init__(self):
            self.req_ids, self.draft_token_ids = ["a", "b"], [[1, 2, 3], [4, 5, 6]]

    ld = _lookup_drafts(["a", "b"])
    assert ld.cut(Out()).draft_token_ids == [[1, 2, 3], [4, 5, 6]]  # no fill: as drafted
    ld.lengths = [2, 0]
    assert ld.cut(Out()).draft_token_ids == [[1, 2], []]
    assert ld.lengths is None  # once per step


def test_lookup_only_steps_take_the_rows_that_pay():
    """Rows without a lookup draft verify nothing in a lookup-only step: a good row drafts alone, and a row
    whose drafts cost more than they bring is left out even when it has a match."""
    c = choose_step(np.array([True, True, False]), np.array([0.95, 0.05, 0.0]), None, 1.0, t_verify, None, 5)
    assert c.gamma == 5 and c.lookup_rows.tolist() == [True, False, False]
    # a row without a match now drafts nothing this step, whatever its acceptance
    c = choose_step(np.array([False]), np.array([0.9]), None, 1.0, t_verify, None, 5)
    assert c.gamma == 0


def test_each_lookup_row_drafts_its_own_length():
    """A row that copies drafts its whole match; a weak row drafts the tokens that still pay, not the copying
    row's gamma; the drafts are cut per row to what was chosen."""
    import torch

    c = choose_step(np.array([True, True]), np.array([0.95, 0.3]), None, 1.0, lambda x: 1 + 0.05 * x, None, 5)
    assert c.lengths.tolist() == [5, 1] and c.gamma == 5 and c.lookup_rows.tolist() == [True, True]
    ld = _lookup_drafts(["a", "b"])
    ld.match_len = np.array([5, 5])
    out = torch.zeros(2, 5, dtype=torch.int64)
    assert ld.fill(out, np.arange(10).reshape(2, 5), c.lookup_rows, 0, c.gamma, c.lengths) == 6
    assert ld.lengths == [5, 1] and ld.pending == {"a": (5, None), "b": (1, None)}


@pytest.mark.parametrize("seed", range(30))
def test_lookup_lengths_are_the_best_of_every_length_per_row(seed):
    """The per-row lengths of a lookup-only step are the best of all length vectors (exhaustive search),
    with a jump for the first verified token as a CPU's attention has."""
    import itertools

    from vllm_knapspec.core.lookup import lookup_tokens

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5))
    has, cap = rng.random(n) < 0.8, rng.integers(1, 6, n)
    alpha = rng.random((n, 2)) if seed % 2 else rng.random(n)
    jump, slope = float(rng.uniform(0, 0.5)), float(rng.uniform(0.005, 0.2))

    def t_verify(x):
        return 1.0 + np.where(np.asarray(x) > 0, jump, 0.0) + slope * x

    best = n / t_verify(0)
    for lens in itertools.product(*[range(int(c) + 1) if h else [0] for c, h in zip(cap, has)]):
        tokens = sum(lookup_tokens(a, m) for a, m in zip(alpha, lens))
        best = max(best, tokens / t_verify(sum(lens)))
    c = choose_step(has, alpha, None, 1.0, t_verify, None, 5, bar=1.0, lookup_len=cap)
    assert c.tpt == pytest.approx(best, rel=1e-9)
    if c.gamma:
        tokens = sum(lookup_tokens(a, int(m)) for a, m in zip(alpha, c.lengths))
        assert tokens / t_verify(int(c.lengths.sum())) == pytest.approx(best, rel=1e-9)


def test_a_short_match_is_priced_at_its_length():
    """A row whose match has 1 token brings at most 1 + alpha tokens for one verified token, whatever gamma."""
    c = choose_step(np.array([True]), np.array([0.9]), None, 1.0, t_verify, None, 5, lookup_len=np.array([1]))
    assert c.gamma == 1 and c.tpt == pytest.approx(1.9 / t_verify(1))
    c5 = choose_step(np.array([True]), np.array([0.9]), None, 1.0, t_verify, None, 5)  # a 5-token match
    assert c5.gamma == 5 and c5.tpt > c.tpt


def test_fill_caps_lookup_drafts_at_the_chosen_gamma():
    import torch

    ld = _lookup_drafts(["a", "b"])
    ld.match_len = np.array([5, 2])
    drafts = np.array([[1, 2, 3, 4, 5], [6, 7, 7, 7, 7]])
    out = torch.zeros(2, 5, dtype=torch.int64)
    assert ld.fill(out, drafts, np.array([True, True]), 0, gamma=2) == 4
    assert ld.lengths == [2, 2] and ld.pending == {"a": (2, None), "b": (2, None)}
    assert out[:, :2].tolist() == [[1, 2], [6, 7]]
    acc = LookupAcceptance()
    acc.observe("a", 2, 2)
    acc.forget(set())
    assert acc.counts == {}


@pytest.fixture(scope="module")
def prompts():
    src = inspect.getsource(json.decoder)[:1500]
    return [
        src + "\n\n# The same module again, verbatim:\n" + src[:200],
        "Repeat this list exactly: " + ", ".join(f"item {i}" for i in range(40)) + "\nRepeated: item 0, item 1,",
        "The history of the printing press",
        "Explain why the sky is blue.",
    ]


@pytest.fixture(scope="module")
def baseline(model_path, prompts):
    llm = make_llm(model_path)
    out = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    del llm
    return out


def _run(llm, prompts, sp=GREEDY):
    before = spec_counters(llm)
    out = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
    after = spec_counters(llm)
    return out, {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}


@pytest.mark.parametrize(
    "extra",
    [{}, {"skip_set": "a5,a6,a8,a29", "confidence_threshold": 0.0}],
    ids=["selector", "mixed_with_fixed_skip_set"],
)
def test_lookup_drafts_are_lossless(model_path, prompts, baseline, extra):
    llm = make_llm(model_path, {"method": "knapspec", "num_speculative_tokens": 5, "kernels": "torch", **extra})
    got, d = _run(llm, prompts)
    print(d)
    assert got == baseline
    assert d["vllm:knapspec_lookup_draft_tokens"] > 0 and d["vllm:knapspec_lookup_accepted_tokens"] > 0
    if extra:  # one batch drafted from both sources
        assert d["vllm:knapspec_layer_skip_draft_tokens"] > 0
    sampled, _ = _run(llm, prompts, SamplingParams(max_tokens=32, temperature=0.8, seed=0))
    assert all(len(x) == 32 for x in sampled)  # vLLM's rejection sampler on lookup drafts, no error
    del llm


def test_lookup_off(model_path, prompts, baseline):
    llm = make_llm(model_path, {"method": "knapspec", "num_speculative_tokens": 5, "kernels": "torch", "lookup": "off"})
    got, d = _run(llm, prompts)
    assert got == baseline and d.get("vllm:knapspec_lookup_draft_tokens", 0) == 0
    del llm


def test_verify_jump_fits_what_drafting_steps_cost_beyond_the_line():
    """Steps that verify x tokens measured 4 ms + 1 ms per token over the model's line (t_plain 40 ms), plain
    steps on it: the extra share is fitted as a level and a slope; plain steps get none; a prefill-sized gap is
    left out."""
    from vllm_knapspec.core.lookup import VerifyJump

    j = VerifyJump(decay=1.0)
    for x in (2, 5, 10, 20, 2, 5, 10, 20):
        j.observe(x, 0.040 + 0.001 * x + 0.004 + 0.001 * x, 0.040, 0.040 + 0.001 * x)
        j.observe(0, 0.040, 0.040)
    j.observe(5, 1.0, 0.040, 0.045)  # not a step's cost
    assert j.extra(0) == 0.0
    assert j.extra(10) == pytest.approx((0.004 + 0.010) / 0.040, rel=0.05)
    assert j.extra(20) > j.extra(2) > 0.0


class _Line33:
    """A selector whose line says a plain step takes 33 ms and each verified token 3.3 ms more."""

    target = True
    cfg = type("Cfg", (), {"min_speedup": 1.25})
    predicted_alpha = None

    def verify_line(self, ctx):
        return 0.033, 0.0033 * len(ctx)  # the slope of one more token per request


def test_drafting_steps_cheaper_than_the_line_are_priced_as_measured():
    """The latency model's slope per verified token is a prior that lookup steps do not refit: where drafting
    steps cost less than its line, the jump takes the difference off (so drafts that pay are taken), and the
    price of a drafting step never falls below a plain step's."""
    from vllm_knapspec.adapter.lookup_drafts import choose_with_models
    from vllm_knapspec.core.lookup import VerifyJump

    j = VerifyJump(decay=1.0)
    for _ in range(8):  # line: 33 ms + 3.3 ms per token; measured: 33 ms + 1.6 ms per token
        j.observe(10, 0.033 + 0.016, 0.033, 0.033 + 0.033)
        j.observe(0, 0.033, 0.033)
    assert j.extra(10) == pytest.approx(-0.017 / 0.033, rel=0.05)
    # two rows with lookup drafts (first token right 0.3, next 0.8): on the line no gamma reaches the bar of
    # 1.25x plain (at best 1.10x, gamma 2); priced as measured they do
    rates, has, m, ctx = np.array([[0.3, 0.8]] * 2), np.array([True, True]), np.array([5, 5]), np.array([900, 900])
    args = (_Line33(), None, has, rates, m, ctx, 2, 5)
    assert choose_with_models(*args, VerifyJump(decay=1.0)).gamma == 0
    assert choose_with_models(*args, j).gamma > 0
    low = VerifyJump(decay=1.0)
    low.observe(10, 0.020, 0.033, 0.066)  # a drafting step measured below a plain step: priced as a plain step
    c = choose_with_models(*args, low)
    tokens = 2 * (1 + 0.3 * (1 - 0.8**5) / 0.2)  # 2 rows, 5 lookup tokens each
    assert c.gamma == 5 and c.tpt == pytest.approx(tokens / 0.033)


def test_uniform_steps_pay_for_every_row():
    """Async scheduling verifies gamma tokens in every row: with 1 row of 4 matching, lookup drafts pay only
    where verification is cheap, and every matching row then takes its (free) draft."""
    has, alpha = np.array([True, False, False, False]), np.array([0.9, 0.0, 0.0, 0.0])
    cheap = choose_step(has, alpha, None, 1.0, lambda x: 1.0 + 0.01 * x, None, 5, uniform=True)
    assert cheap.gamma > 0 and cheap.lookup_rows.tolist() == [True, False, False, False]
    dear = choose_step(has, alpha, None, 1.0, lambda x: 1.0 + 0.3 * x, None, 5, uniform=True)
    assert dear.gamma == 0  # 4 x gamma tokens verified for one row's draft
    both = choose_step(np.array([True, True]), np.array([0.9, 0.2]), None, 1.0, t_verify, None, 5, uniform=True)
    assert both.lookup_rows.tolist() == [True, True]


def _uniform_reference(has, alpha, alpha_skip, t_plain, t_verify, t_draft, gamma_max, bar, lookup_len):
    """choose_step's uniform case written one gamma at a time, as the objective reads."""
    from vllm_knapspec.core.lookup import lookup_tokens
    from vllm_knapspec.core.tpt import expected_tokens

    n = len(has)
    best = (0, False, [False] * n, n / t_plain)
    for g in range(1, gamma_max + 1):
        glen = np.minimum(lookup_len, g)
        e_look = np.array([lookup_tokens(tuple(a) if np.ndim(a) else a, int(m)) for a, m in zip(alpha, glen)])
        cands = []
        rows = has & (glen > 0)
        if rows.any():
            cands.append((False, rows, (n + (e_look[rows] - 1.0).sum()) / t_verify(n * g)))
        if alpha_skip is not None:
            e_skip = expected_tokens(alpha_skip, g)
            rows = has & (e_look > e_skip)
            cands.append((True, rows, np.where(rows, e_look, e_skip).sum() / (t_verify(n * g) + g * t_draft)))
        for use_skip, rows, r in cands:
            if r > best[3] and r > bar * n / t_plain:
                best = (g, use_skip, rows.tolist(), float(r))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_uniform_choice_is_the_objective_read_one_gamma_at_a_time(seed):
    """The uniform choice (every gamma at once, numpy) picks what the objective picks gamma by gamma."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 17))
    has = rng.random(n) < 0.6
    alpha = rng.random((n, 2)) if seed % 2 else rng.random(n)
    lookup_len = rng.integers(0, 6, n)
    alpha_skip = float(rng.random()) if seed % 3 == 0 else None
    slope, t_draft = float(rng.uniform(0.001, 0.1)), float(rng.uniform(0.1, 0.6))

    def t_verify(x):
        return 1.0 + slope * x

    c = choose_step(has, alpha, alpha_skip, 1.0, t_verify, t_draft, 5, bar=1.02, lookup_len=lookup_len, uniform=True)
    want = _uniform_reference(has, alpha, alpha_skip, 1.0, t_verify, t_draft, 5, 1.02, lookup_len)
    assert (c.gamma, c.use_skip) == want[:2] and c.tpt == pytest.approx(want[3], rel=1e-9)
    if c.gamma:
        assert c.lookup_rows.tolist() == want[2]


def _src(rows, lens):
    import torch

    from vllm_knapspec.adapter.lookup_device import LookupSource

    tokens = torch.tensor(rows, dtype=torch.int32)
    return LookupSource(tokens, torch.tensor(lens), torch.arange(len(rows)), [f"r{i}" for i in range(len(rows))], 8)


def test_device_lookup_drafts_and_learns_from_what_the_next_step_kept():
    """Drafts matched by vLLM's GPU matcher (here on CPU tensors) go to the rows with a match, except rows the
    layer-skip draft was chosen for; the next step's rejected counts become acceptance per request, the matches
    the host has seen feed the next choice."""
    import torch

    from vllm_knapspec.adapter.lookup_device import DeviceLookup

    cfg = type("Cfg", (), {"lookup_min": 2, "lookup_max": 3})
    dl = DeviceLookup(cfg, 3, torch.device("cpu"))
    src = _src([[1, 2, 3, 4, 1, 2, 0, 0], [5, 6, 7, 8, 0, 0, 0, 0], [7, 8, 9, 7, 8, 0, 0, 0]], [6, 4, 5])
    drafts = torch.full((3, 3), -5, dtype=torch.int64)  # the layer-skip draft's tokens
    rec = dl.propose(src, np.array([False, False, True]), drafts)
    # row 0 copies 3 4 1; row 1 has no match (keeps the layer-skip draft); row 2 was given the layer-skip draft
    assert drafts.tolist() == [[3, 4, 1], [-5, -5, -5], [-5, -5, -5]]
    lookup, drafted, kept = dl.observe(rec, ["r0", "r1", "r2"], np.array([3, 3, 3]), np.array([1, 3, 0]))
    assert lookup.tolist() == [True, False, False] and (drafted, kept) == (3, 2)
    assert dl.match_len == {"r0": 3, "r1": 0, "r2": 3} and dl.acceptance.counts["r0"] == [1.0, 1.0, 1.0, 2.0]
    out = torch.zeros(3, 3, dtype=torch.int64)
    rec = dl.propose(src, None, out)  # no layer-skip draft: fillers (the bonus token) elsewhere
    assert out.tolist() == [[3, 4, 1], [8, 8, 8], [9, 7, 8]]
    lookup, _, _ = dl.observe(rec, ["r2"], np.array([2]), np.array([0]))  # rows matched by request
    assert lookup.tolist() == [True] and dl.match_len == {"r2": 3} and list(dl.acceptance.counts) == ["r2"]


class _Line:
    """A selector whose latency model says a plain step takes 2 ms and each verified token 0.01 ms more."""

    class target:
        @staticmethod
        def plain_step_time(ctx):
            return 0.002

        @staticmethod
        def verify_step_time(ctx, k):
            return 0.002 + 0.00001 * k

        @staticmethod
        def coefficient_bytes():
            return b""

    cfg = type("Cfg", (), {"min_speedup": 1.02})
    predicted_alpha, _plain_scale, _plain_steps, _line_memo = None, 1.0, (), None

    def _t_plain(self, ctx):
        return 0.002

    from vllm_knapspec.core.selector.timing import TimingFeed

    verify_line = TimingFeed.verify_line  # the selector's own line over this latency model


def test_device_lookup_stops_drafting_when_its_steps_measure_dear():
    """On the model's line a lookup draft with acceptance 0.5 pays; once steps that verify 5 tokens per row are
    measured at 4x a plain step (the host work of a drafting step, which the line does not know), it does not."""
    import torch

    from vllm_knapspec.adapter.lookup_device import DeviceLookup

    dl = DeviceLookup(type("Cfg", (), {"lookup_min": 2, "lookup_max": 3}), 5, torch.device("cpu"))
    dl.match_len = {"a": 5}
    dl.acceptance.alpha = lambda r: 0.5
    ctx, sel = np.array([1000]), _Line()
    assert dl.choose(sel, None, ctx, ["a"]).gamma > 0
    for _ in range(8):
        dl.observe_cost(sel, ctx, 1, 5, 2, 0.008)  # a step that verified 5 tokens, kept 2: 8 ms
        dl.observe_cost(sel, ctx, 1, 0, 0, 0.002)  # a plain step: 2 ms
    assert dl.choose(sel, None, ctx, ["a"]).gamma == 0


def test_lookup_guard_stops_drafts_the_models_overrate_and_retries_them_later():
    """The models say a lookup draft pays (acceptance 0.9, a step 1.25x a plain one); the steps that drafted kept
    nothing. After GUARD_STEPS such steps lookup drafts are off for the backoff, then the choice's again."""
    import torch

    from vllm_knapspec.adapter.lookup_device import DeviceLookup

    dl = DeviceLookup(type("Cfg", (), {"lookup_min": 2, "lookup_max": 3}), 5, torch.device("cpu"))
    dl.match_len = {"a": 5}
    dl.acceptance.alpha = lambda r: 0.9
    ctx, sel = np.array([1000]), _Line()
    for _ in range(dl.guard.steps - 1):
        dl.observe_cost(sel, ctx, 1, 5, 0, 0.0025)
    assert dl.choose(sel, None, ctx, ["a"]).gamma > 0
    dl.observe_cost(sel, ctx, 1, 5, 0, 0.0025)
    assert dl.choose(sel, None, ctx, ["a"]).gamma == 0 and dl.guard.stops == 1
    dl.guard.tick(dl.guard.base)
    assert dl.choose(sel, None, ctx, ["a"]).gamma > 0


def test_a_shapes_first_step_does_not_price_lookup_drafts_out():
    """A fresh engine's first drafting step of a shape can hold one-off costs (on an H100 one measured 4x a plain
    step). Priced from it, no lookup draft would pay again, and with no drafting step nothing would correct the
    price: a first step over ONE_OFF_X times the line is left out, and the next step of that shape is measured.
    A first step near the line counts (at batch 16 per-row lengths make dozens of shapes)."""
    import torch

    from vllm_knapspec.adapter.lookup_device import DeviceLookup

    dl = DeviceLookup(type("Cfg", (), {"lookup_min": 2, "lookup_max": 3}), 5, torch.device("cpu"))
    dl.match_len = {"a": 5}
    dl.acceptance.alpha = lambda r: 0.9
    ctx, sel = np.array([1000]), _Line()
    plain = sel.verify_line(ctx)[0]
    dl.observe_cost(sel, ctx, 1, 5, 5, 6.0 * plain)
    assert dl.choose(sel, None, ctx, ["a"]).gamma > 0
    dl.observe_cost(sel, ctx, 1, 5, 5, 6.0 * plain)  # the same cost again: that is what the shape costs
    assert dl.choose(sel, None, ctx, ["a"]).gamma == 0
    fresh = DeviceLookup(type("Cfg", (), {"lookup_min": 2, "lookup_max": 3}), 5, torch.device("cpu"))
    fresh.match_len, fresh.acceptance.alpha = {"a": 5}, lambda r: 0.9
    fresh.observe_cost(sel, ctx, 1, 5, 5, 1.9 * plain)  # a first step within ONE_OFF_X of the line: a cost
    assert fresh.jump.extra(5) > 0.8


def test_lookup_guard_stops_for_a_loss_beyond_its_windows_noise():
    """Steps that keep 0 to 5 tokens per row measure from ~0.5x to ~2x plain one by one: a window a little under
    plain by its total is noise and keeps drafting; a window clearly under plain, as spread, stops it."""
    from vllm_knapspec.core.lookup import LookupGuard

    rng = np.random.default_rng(0)

    def window(guard, level):  # 16 steps of 4 rows, 10 ms plain steps; each step's ratio level x (0.5 .. 1.5)
        return [guard.observe(4 * r * level, 0.01, 4, 0.01, 1.02) for r in rng.uniform(0.5, 1.5, guard.steps)]

    noisy = LookupGuard()
    assert not any(window(noisy, 0.95)) and noisy.realised < 1.0 and noisy.allowed
    losing = LookupGuard()
    assert window(losing, 0.6)[-1] and not losing.allowed and losing.stops == 1


def test_device_lookup_learns_from_shadow_trials_in_rows_that_verify_no_lookup_draft():
    """Each search also matches one token back: whether that match's first token is the token the target then
    emitted is a trial of the row's first-token rate, for rows that verified no lookup draft."""
    import torch

    from vllm_knapspec.adapter.lookup_device import DeviceLookup

    dl = DeviceLookup(type("Cfg", (), {"lookup_min": 2, "lookup_max": 3}), 3, torch.device("cpu"))
    # r0: "1 2" one token back was followed by 3, and 3 came (right); r1: "7 8" was followed by 9, 5 came
    # (wrong); r2: nothing one token back matches
    src = _src([[1, 2, 3, 4, 1, 2, 3, 0], [7, 8, 9, 7, 8, 5, 0, 0], [1, 2, 3, 4, 5, 6, 0, 0]], [7, 6, 6])
    rec = dl.propose(src, None, torch.zeros(3, 3, dtype=torch.int64))
    assert rec.shadow.tolist() == [1, 0, -1]
    dl.observe(rec, ["r0", "r1", "r2"], np.array([0, 0, 0]), None)  # a plain step verified nothing
    assert dl.acceptance.counts["r0"][:2] == [1.0, 1.0] and dl.acceptance.counts["r1"][:2] == [0.0, 1.0]
    assert "r2" not in dl.acceptance.counts


def test_device_lookup_search_stays_eager_when_compiling_fails(monkeypatch):
    """compile() runs at start-up; a failure there leaves the eager search (the warm-up logs it)."""
    import torch

    from vllm_knapspec.adapter.lookup_device import DeviceLookup

    dl = DeviceLookup(type("Cfg", (), {"lookup_min": 2, "lookup_max": 3}), 3, torch.device("cpu"))
    eager = dl.step

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError):
        dl.compile()
    assert dl.step is eager
    drafts = torch.zeros(1, 3, dtype=torch.int64)
    dl.propose(_src([[1, 2, 3, 4, 1, 2, 0, 0]], [6]), None, drafts)
    assert drafts.tolist() == [[3, 4, 1]]


def test_compiled_device_search_serves_every_batch_without_compiling_again():
    """compile() at start-up covers the shapes propose() passes (batch 1 and more, any width, with and without a
    layer-skip draft in the batch): a request never waits for a compile (a recompile cost ~2.5 s on the H200 at
    the first lookup draft), and the drafts are the eager step's."""
    import torch
    import torch._dynamo.utils as dynamo_utils

    from vllm_knapspec.adapter.lookup_device import DeviceLookup, LookupSource

    dl = DeviceLookup(type("Cfg", (), {"lookup_min": 2, "lookup_max": 5}), 5, torch.device("cpu"))
    eager = dl.step
    dl.compile()
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (16, 512), dtype=torch.int32, generator=gen)
    for n, width, skip in ((1, 301, False), (1, 302, True), (3, 303, False), (16, 500, True), (2, 120, False)):
        idx = torch.arange(16, dtype=torch.int32)[:n]  # a view: propose() gives the step a tensor of its own
        src = LookupSource(tokens, torch.full((16,), 300, dtype=torch.int32), idx, [f"r{i}" for i in range(n)], width)
        rows = np.arange(n) % 2 == 0 if skip else None
        start = torch.randint(0, 6, (n, 5), generator=gen)  # the layer-skip draft's tokens
        got, want = start.clone(), start.clone()
        dl.propose(src, rows, got)
        dl.step, compiled = eager, dl.step
        dl.propose(src, rows, want)
        dl.step = compiled
        assert torch.equal(got, want)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs


def test_narrow_steps_use_the_compiled_graph():
    """A short prompt's steps have fewer columns than compile() compiled with (the graph guards on the width
    against lookup_max): they are searched over the compiled width, in the same graph, with the eager step's
    drafts. Seen on an H100: a first step 8 columns wide turned the lookup step eager for the engine's life."""
    import torch
    import torch._dynamo.utils as dynamo_utils

    from vllm_knapspec.adapter.lookup_device import DeviceLookup, LookupSource

    dl = DeviceLookup(type("Cfg", (), {"lookup_min": 2, "lookup_max": 5}), 5, torch.device("cpu"), max_len=512)
    eager = dl.step
    dl.compile()
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    tokens = torch.randint(0, 4, (4, 512), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    for n, width in ((1, 3), (2, 6), (1, 8), (3, 9), (1, dl.min_width - 1)):
        idx = torch.arange(4, dtype=torch.int32)[:n]
        src = LookupSource(tokens, torch.full((4,), width, dtype=torch.int32), idx, [f"r{i}" for i in range(n)], width)
        got, want = torch.zeros(n, 5, dtype=torch.int64), torch.zeros(n, 5, dtype=torch.int64)
        dl.propose(src, None, got)
        assert dl.step is not eager, width
        dl.step, compiled = eager, dl.step
        dl.propose(src, None, want)
        dl.step = compiled
        assert torch.equal(got, want)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs


def test_a_step_the_compiled_graph_does_not_take_runs_eagerly_without_compiling(caplog):
    """A decode step never compiles: inputs the start-up graph does not take (here int64 rows where it compiled
    int32) run the eager step, the same drafts, logged once; later steps stay eager."""
    import torch
    import torch._dynamo.utils as dynamo_utils

    from vllm_knapspec.adapter.lookup_device import DeviceLookup

    dl = DeviceLookup(type("Cfg", (), {"lookup_min": 2, "lookup_max": 3}), 3, torch.device("cpu"))
    dl.compile()
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    rows2 = torch.tensor([[1, 2, 3, 4, 1, 2, 0, 0]] * 2)  # int64
    with caplog.at_level("WARNING", logger="vllm.knapspec"):
        out, info = dl._run(rows2, torch.tensor([6, 6]), dl._back(1), 2, 3, 3)
    assert out[0].tolist() == [3, 4, 1] and info[0, 0] == 3  # "1 2" at 0: 3 4 1 follow
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    assert dl.step is dl.eager and "eager from now on" in caplog.text


def test_sampled_requests_do_not_inherit_greedy_acceptance():
    """A server's greedy requests copying well say little about its sampled ones: priors are pooled per group."""
    acc = LookupAcceptance(prior=0.5, weight=4.0, decay=1.0)
    for i in range(20):
        acc.observe(f"g{i}", 5, 5, ngram=3, group="greedy")
    acc.observe("s0", 5, 0, ngram=3, group="sampled")
    assert acc.alpha("new", 3, "greedy")[0] > 0.9
    assert acc.alpha("new", 3, "sampled")[0] < 0.5  # the sampled pool: one rejected draft, from the 0.5 prior


def test_requests_that_copy_or_not_are_told_apart_in_one_or_two_drafts():
    """Where the server's requests either copy (drafts right) or do not (drafts wrong), a request's own first
    trials decide at once: the request weight falls to what the spread of finished requests says. Where every
    request copies about as well, the pooled rate keeps its full weight."""
    split, alike = LookupAcceptance(decay=1.0), LookupAcceptance(decay=1.0)
    for i in range(8):
        for _ in range(4):
            split.observe(f"r{i}", 5, 5 if i % 2 else 0)
            alike.observe(f"r{i}", 5, 3 if _ % 2 else 0)
    split.forget(set())
    alike.forget(set())
    assert split.request_weight()[0] == pytest.approx(0.5)
    assert alike.request_weight()[0] == pytest.approx(4.0)
    for acc in (split, alike):
        acc.observe("new", 5, 0)
    assert split.alpha("new")[0] < 0.2 < alike.alpha("new")[0]  # one rejected draft: stop, or not yet
    split.observe("copy", 5, 5)
    assert split.alpha("copy")[0] > 0.8


def test_a_step_with_neither_a_plan_nor_a_match_is_plain_unpriced():
    """Nothing to choose from (no layer-skip plan, no row with a match, or the guard holds lookup drafts off): a
    plain step, without reading the rows' acceptance or the latency model."""
    from vllm_knapspec.adapter.lookup_drafts import choose_with_models
    from vllm_knapspec.core.lookup import LookupGuard, VerifyJump

    def unread():
        raise AssertionError("priced a step with nothing to choose")

    class Unpriced:
        target, cfg = None, type("Cfg", (), {"min_speedup": 1.0})

        def verify_line(self, ctx):
            raise AssertionError("priced a step with nothing to choose")

    ctx, m = np.array([900, 900]), np.array([0, 0])
    c = choose_with_models(Unpriced(), None, np.array([False, False]), unread, m, ctx, 2, 5, VerifyJump())
    assert c.gamma == 0 and not c.use_skip and not c.lookup_rows.any()
    off = LookupGuard()
    off.off = 8  # lookup drafts held off: the match does not count
    c = choose_with_models(
        Unpriced(), None, np.array([True, False]), unread, np.array([5, 0]), ctx, 2, 5, VerifyJump(), off
    )
    assert c.gamma == 0
    # a match: priced (alphas read, the line asked)
    line = _Line33()
    c = choose_with_models(
        line, None, np.array([True, False]), lambda: np.array([0.9, 0.0]), np.array([5, 0]), ctx, 2, 5, VerifyJump()
    )
    assert c.gamma > 0 and c.lookup_rows.tolist() == [True, False]


def test_a_graphs_padded_columns_find_what_the_steps_own_width_finds():
    """A lookup graph searches the step's width rounded up to a power of two, with each row's length clamped to
    the step's width first: the drafts, match lengths and shadow trials are those of the step's own columns,
    a row in chunked prefill (its whole prompt staged, longer than the width) included."""
    import torch

    from vllm_knapspec.adapter.lookup_device import lookup_step, vllm_matcher
    from vllm_knapspec.adapter.lookup_graphs import bucket, gather

    rng = np.random.default_rng(0)
    match, matched = vllm_matcher(), 0
    for _ in range(40):
        rows, n = 6, int(rng.integers(1, 5))
        tokens = torch.from_numpy(rng.integers(0, 6, size=(rows, 300))).to(torch.int32)  # 6 ids: many matches
        total = torch.from_numpy(rng.integers(3, 300, size=rows)).to(torch.int32)
        idx = torch.from_numpy(rng.choice(rows, n, replace=False)).to(torch.int32)
        width = int(total[idx].min()) + int(rng.integers(0, 40))  # some rows longer than the width: prefill
        width = min(width, 300)
        back = (torch.arange(2 * n) >= n).to(torch.int64)
        got = {}
        for cols in (width, bucket(width, 20, 300)):
            rows2, seq2 = gather(tokens, total, idx, torch.tensor(width, dtype=torch.int32), cols)
            d, info = lookup_step(match, rows2, seq2, back, 2, 3, 4)
            got[cols] = (d[:n].tolist(), info[0, :n].tolist(), info[1, n:].tolist())
        idx2 = torch.cat([idx, idx])  # the step as it is without graphs: exact width, lengths clamped inside
        d, info = lookup_step(match, tokens[idx2, :width], total[idx2], back, 2, 3, 4)
        assert got[width] == got[bucket(width, 20, 300)] == (d[:n].tolist(), info[0, :n].tolist(), info[1, n:].tolist())
        matched += int((info[0, :n] > 0).sum())
    assert matched > 40  # the cases drafted
