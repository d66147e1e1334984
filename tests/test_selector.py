"""The selector on the real model: it chooses sets on the fly and stays lossless; it skips more attention as
the context grows (attention cost grows with context, MLP cost does not)."""

import inspect
import json

import numpy as np
import pytest
import torch
from vllm import SamplingParams

from conftest import drafter_of, make_llm, spec_counters
from prompts import CODE, PROSE
from vllm_knapspec.adapter.selection import make_selector
from vllm_knapspec.config import PROFILE_DIR, KnapSpecConfig, parse_knapspec
from vllm_knapspec.core.latency import LatencyModel
from vllm_knapspec.core.selector import KnapSpecSelector

# Selection is costly on 2 CPU cores (a DP pass ~ a prefill of (K+1)*r tokens): small r, no overhead cap,
# and min_speedup 0 so the chosen sets really draft (on CPU plain decoding often wins, which is the point
# of the selector; here we test that what it chooses is lossless). kernels "torch": what "auto" is on a CPU
# deployment; under the suite's TRITON_INTERPRET=1 "auto" would run the DP in Triton's interpreter
# (Triton == torch is tested in test_kernels.py and test_dp.py).
SELECTOR = {
    "method": "knapspec",
    "num_speculative_tokens": 4,
    "reference_tokens": 8,
    "reselect_interval": 12,
    "max_selection_overhead": 1.0,
    "min_speedup": 0.0,
    "confidence_threshold": 0.0,
    "kernels": "torch",
    "lookup": "off",  # these tests are about the layer-skip selector (tests/test_lookup.py: both sources)
}
GREEDY = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
PROMPTS = PROSE[:4] + CODE[:4]


def fresh_selector(llm, first_now: bool = True) -> KnapSpecSelector:
    d = drafter_of(llm)
    d.selector = make_selector(d.cfg, d.draft, d.vllm_config)
    if first_now:  # don't wait for plain decoding to pay for the first DP
        d.selector.selection_s = 1e-9
    return d.selector


@pytest.fixture(scope="module")
def baseline(model_path):
    llm = make_llm(model_path)
    out = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    del llm
    return out


@pytest.fixture(scope="module")
def spec_llm(model_path, baseline):
    llm = make_llm(model_path, SELECTOR)
    yield llm
    del llm


def test_selector_on_the_fly_is_lossless(spec_llm, baseline):
    sel = fresh_selector(spec_llm)
    plan = sel.plan

    def plan_without_overhead_budget(rows, ctx):  # re-select on the step schedule, whatever a DP costs here
        sel.selection_s, sel._cost_scale = 1e-9, 0.0
        return plan(rows, ctx)

    sel.plan = plan_without_overhead_budget
    before = spec_counters(spec_llm)
    got = [list(o.outputs[0].token_ids) for o in spec_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    after = spec_counters(spec_llm)
    print("selections:", [(h["ctx"], h["skip"], h["gamma"], round(h["alpha"], 3)) for h in sel.history])
    assert got == baseline
    assert len(sel.history) >= 2  # re-selected while decoding
    assert any(h["attn"] + h["mlp"] > 0 for h in sel.history)
    drafted = after["vllm:spec_decode_num_draft_tokens"] - before.get("vllm:spec_decode_num_draft_tokens", 0)
    assert drafted > 0
    assert after["vllm:knapspec_selections"] > before.get("vllm:knapspec_selections", 0)


def test_min_speedup_zero_drafts_from_the_start(spec_llm):
    """`min_speedup: 0` is the documented way to always draft: the first selection runs at once instead of
    waiting until plain decoding has paid for it (a 14 x 96-token batch never got there at the default
    reference_tokens). A selector with the other keys at their defaults (kernels "torch", lookup off: see
    SELECTOR)."""
    d = drafter_of(spec_llm)
    defaults = KnapSpecConfig()
    cfg = d.cfg.model_copy(
        update={k: getattr(defaults, k) for k in ("reference_tokens", "reselect_interval", "confidence_threshold")}
        | {"min_speedup": 0.0, "max_selection_overhead": 1.0}
    )
    d.selector = make_selector(cfg, d.draft, d.vllm_config)
    before = spec_counters(spec_llm)
    spec_llm.generate((PROMPTS * 2)[:14], GREEDY, use_tqdm=False)
    after = spec_counters(spec_llm)
    assert d.selector.history and d.selector.history[0]["speculate"]
    assert after["vllm:spec_decode_num_draft_tokens"] > before.get("vllm:spec_decode_num_draft_tokens", 0)


def long_prompt(tokenizer, n_tokens: int) -> str:
    text = "\n".join(inspect.getsource(m) for m in (json.decoder, json.encoder, inspect))
    return tokenizer.decode(tokenizer(text)["input_ids"][:n_tokens])


def attn_share(skip: str) -> float:
    items = [x for x in skip.split(",") if x]
    return sum(x.startswith("a") for x in items) / max(len(items), 1)


def test_attention_weight_grows_with_context(spec_llm, model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    first = {}
    # same kind of text (Python source), same number of reference tokens; only the context length differs
    for name, n in (("short", 160), ("long", 3500)):
        sel = fresh_selector(spec_llm)
        spec_llm.generate(
            [long_prompt(tok, n)], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False
        )
        assert sel.history, f"no selection for the {name} prompt"
        first[name] = sel.history[0]
    share = {k: sum(attn_share(t["skip"]) for t in v["top"]) / len(v["top"]) for k, v in first.items()}
    print({k: (v["ctx"], v["w_attn"], v["w_mlp"], v["skip"], round(share[k], 3)) for k, v in first.items()})
    s, l = first["short"], first["long"]
    assert l["ctx"] > 10 * s["ctx"]
    # attention's latency weight relative to MLP's grows with context: the DP prices attention skips higher
    assert l["w_attn"] / l["w_mlp"] > s["w_attn"] / s["w_mlp"]
    # The composition of the chosen set (printed above) is not asserted: on SmolLM2 / 2 CPU cores it is
    # dominated by the acceptance estimates, and the attention share moved 0.43-1.0 without a trend over
    # contexts 160..7000 (acceptance differs between prompts). The next test holds everything but the pricing
    # fixed and asserts the composition.


class PricedAt:
    """A latency model seen at a fixed context length: same reference states and acceptance estimates, only
    the pricing of the sublayers moves."""

    def __init__(self, model, ctx: int):
        self.model, self.ctx = model, ctx

    def _at(self, ctx):
        return np.full(max(len(np.atleast_1d(ctx)), 1), self.ctx)

    def sublayer_times(self, ctx, *a):
        return self.model.sublayer_times(self._at(ctx), *a)

    def draft_step_time(self, skip, ctx):
        return self.model.draft_step_time(skip, self._at(ctx))

    def verify_step_time(self, ctx, *a):
        return self.model.verify_step_time(self._at(ctx), *a)

    def plain_step_time(self, ctx):
        return self.model.plain_step_time(self._at(ctx))

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_selector_skips_more_attention_when_context_prices_it_higher(spec_llm, model_path):
    """One selection on a real 2000-token prompt, run twice in the same engine step (identical reference states
    and acceptance estimates; the shipped reference_tokens 32) with the CPU latency profile evaluated at 256 and
    at 8000 tokens of context. At 8000 an attention sublayer costs twice an MLP (integer weights 2:1, 1:1 at 256),
    so skipping attention saves more time per similarity lost and the chosen set skips more attention."""
    from transformers import AutoTokenizer

    d = drafter_of(spec_llm)
    cfg = parse_knapspec({**d.cfg.model_dump(), "reference_tokens": 32})
    sel = d.selector = make_selector(cfg, d.draft, d.vllm_config)
    sel.selection_s = 1e-9
    profile = LatencyModel.load(PROFILE_DIR / "SmolLM2-135M-Instruct.cpu.float32.json")
    runs, select = {}, sel.select

    def select_twice(rows, ctx):
        if not runs:
            for name, n in (("short", 256), ("long", 8000)):
                sel.latency = sel.target = PricedAt(profile, n)
                select(rows, ctx)
                runs[name] = sel.history[-1]
        return select(rows, ctx)

    sel.select = select_twice
    tok = AutoTokenizer.from_pretrained(model_path)
    spec_llm.generate(
        [long_prompt(tok, 2000)], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    s, l = runs["short"], runs["long"]
    print(
        {k: (v["w_attn"], v["w_mlp"], v["attn"], v["mlp"], v["gamma"], round(v["speedup"], 3)) for k, v in runs.items()}
    )
    assert l["w_attn"] / l["w_mlp"] > s["w_attn"] / s["w_mlp"]  # attention got dearer relative to MLP
    assert l["attn"] > s["attn"]  # ... so more of it is skipped
    # Not asserted: the attention share of the two sets. Each is the TPT argmax over candidates of every size, priced
    # with acceptance held out from the DP, so the two may differ in size (6 of 8 against 13 of 23 sublayers once).


def test_dp_prefix_branches_equal_live_branches_on_the_real_model(spec_llm, monkeypatch):
    """The GPU's DP mode ("prefix": the first reachable states rounded up to a power of two, no host sync per
    item) and the CPU's ("live": exactly the valid states) on the same real reference states: the paged
    attention of the extra (dead, all-zero) branches must not leak into the live ones."""
    from vllm_knapspec.core import dp

    runs, orig = [], dp.knapsack_dp

    def both(*a, **kw):
        runs.append({b: orig(*a, **kw, branches=b) for b in ("live", "prefix")})
        return runs[-1]["live"]

    monkeypatch.setattr(dp, "knapsack_dp", both)
    fresh_selector(spec_llm)
    spec_llm.generate([PROSE[0]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert runs, "no selection ran"
    live, pre = runs[0]["live"], runs[0]["prefix"]
    print(
        f"{len(live)} candidates; differing sets:",
        [(str(a.skipset), str(b.skipset)) for a, b in zip(live, pre) if a.skipset != b.skipset],
    )
    assert len(live) > 3 and [c.weight for c in live] == [c.weight for c in pre]
    for a, b in zip(live, pre):
        assert a.cos == pytest.approx(b.cos, abs=1e-4)
    same = sum(a.skipset == b.skipset for a, b in zip(live, pre))
    assert same >= 0.9 * len(live)  # fp32 GEMMs of another row count may flip a near-tie, rarely


def test_acceptance_is_measured_on_tokens_the_dp_did_not_score(spec_llm, monkeypatch):
    """The DP scores one half of each request's reference tokens; acceptance is measured on the other half, so
    the sets it picked for agreeing with the full model on its tokens are not also judged on them."""
    from vllm_knapspec.core import dp

    seen, split, run, est = [], dp.holdout_split, dp.knapsack_dp, dp.estimate_acceptance

    def spy_split(groups, r):
        tw, held = split(groups, r)
        seen.append({"groups": [np.asarray(g) for g in groups], "tw": tw, "held": held, "dp": None, "alpha": []})
        return tw, held

    def spy_dp(*a, **kw):
        seen[-1]["dp"] = kw["token_weights"].cpu()
        return run(*a, **kw)

    def spy_est(cand_hidden, full_hidden, logits_fn, chunk=8):
        seen[-1]["alpha"].append(full_hidden.shape[0])
        return est(cand_hidden, full_hidden, logits_fn, chunk)

    for name, fn in (("holdout_split", spy_split), ("knapsack_dp", spy_dp), ("estimate_acceptance", spy_est)):
        monkeypatch.setattr(dp, name, fn)
    fresh_selector(spec_llm)
    spec_llm.generate(PROSE[:2], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert seen, "no selection ran"
    s = seen[0]
    assert torch.equal(s["dp"], s["tw"])
    assert s["alpha"] == [len(h) for h in s["held"]]  # one estimate per request, on its held-out tokens
    for g, h in zip(s["groups"], s["held"]):
        if len(g) > 1:
            assert len(h) == len(g) // 2 and (s["tw"][torch.from_numpy(h)] == 0).all()
            assert (s["tw"][torch.from_numpy(np.setdiff1d(g, h))] > 0).all()


def test_reference_reads_the_tokens_the_model_generated(spec_llm):
    """The selection's reference (the last committed tokens, run through the full model against the cached KV)
    predicts its own next tokens where a greedy run of the same model wrote them: `ref_self` in the selection
    history. A reference that read other tokens, positions or KV would agree far less, while its candidate
    sets could still agree with the full model on it."""
    from vllm.inputs import TokensPrompt

    gen = spec_llm.generate(PROSE[:1], SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True), use_tqdm=False)
    ids = list(gen[0].prompt_token_ids) + list(gen[0].outputs[0].token_ids)  # the prompt, then 48 greedy tokens
    sel = fresh_selector(spec_llm)
    spec_llm.generate(
        [TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False
    )
    assert sel.history, "no selection ran"
    assert sel.history[0]["ref_self"] >= 0.9, sel.history[0]


def test_the_acceptance_estimate_predicts_what_an_exact_draft_step_predicts(spec_llm, baseline):
    """A selection prices a skip set by its agreement with the full model on reference tokens, reading the KV the
    full model wrote at each token; a real draft writes its own KV there. `tools/cpu_alpha_check.py` runs both
    on the same tokens while the engine decodes (the exact steps write KV and restore the cache): the two
    predictions of the set agree token by token, and the outputs stay those of plain decoding."""
    import sys

    from conftest import ROOT
    from vllm_knapspec.core.selector import FixedSelector
    from vllm_knapspec.core.skipset import SkipSet

    sys.path.insert(0, str(ROOT / "tools"))
    import cpu_alpha_check

    d = drafter_of(spec_llm)
    saved = d.selector
    skip = SkipSet.parse(d.draft.num_layers, "a8,a9,a10,a11,m12,m13")
    probe = d.selector = cpu_alpha_check.Probe(FixedSelector(skip, 4), d, every=4, r=8)
    try:
        out = spec_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        d.selector = saved
    print(f"reference {probe.ref_hits}/{probe.n}, exact {probe.exact_hits}/{probe.n}, same {probe.same}/{probe.n}")
    assert probe.n >= 64
    assert probe.same >= 0.85 * probe.n
    assert [list(o.outputs[0].token_ids) for o in out] == baseline


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def test_latency_model_follows_an_injected_slowdown(spec_llm):
    """Online refit in the live engine: from the middle of a run every draft loop takes 2x as long (a sleep
    equal to its own duration); the draft-time model must follow within 30 drafts.

    Control: a copy of the model taken at the switch is fed the same draft steps with the injected sleep
    taken out. The live stream also has the machine's own speed changes (on a shared 2-core machine,
    1.5-3x bursts that the model follows too; one right at the switch can hide the injected one from a
    plain before/after comparison); against the control they cancel, so what is asserted is what the
    injected slowdown alone did to the model."""
    import copy
    import time

    sel = fresh_selector(spec_llm)
    d = drafter_of(spec_llm)
    lat, slow = sel.latency, {"on": False, "slept": 0.0}
    seen = []  # (slowed, predicted, measured, injected sleep, observe_draft arguments)
    orig_observe, orig_draft = lat.observe_draft, d._draft

    def observe(n_attn, n_mlp, ctx, seconds, **kw):
        pred = orig_observe(n_attn, n_mlp, ctx, seconds, **kw)
        seen.append((slow["on"], pred, seconds, slow["slept"], (n_attn, n_mlp, np.array(ctx, copy=True)), kw))
        slow["slept"] = 0.0
        return pred

    def draft(*a, **kw):
        slow["slept"] = 0.0
        t0 = time.perf_counter()
        out = orig_draft(*a, **kw)
        if slow["on"]:
            t1 = time.perf_counter()
            time.sleep(t1 - t0)
            slow["slept"] = time.perf_counter() - t1
        return out

    lat.observe_draft, d._draft = observe, draft
    try:
        prompts = PROMPTS * 3  # 16 slowed requests in two batches: >= 40 slowed drafts with plain phases between
        spec_llm.generate(prompts[:8], GREEDY, use_tqdm=False)
        control = copy.deepcopy(lat)
        del control.observe_draft  # the copy took the wrapper below along; the control is unobserved
        slow["on"] = True
        for i in (8, 16):  # two batches: twice the engine steps of one
            spec_llm.generate(prompts[i : i + 8], GREEDY, use_tqdm=False)
    finally:
        lat.observe_draft, d._draft = orig_observe, orig_draft
    live = [x for x in seen if x[0]]
    print(
        "live (slowed, predicted ms, measured ms):",
        [(on, round(p * 1e3, 1), round(s * 1e3, 1)) for on, p, s, *_ in seen],
    )
    assert len(seen) - len(live) >= 20 and len(live) >= 40, (len(seen) - len(live), len(live))
    ctrl = [(control.observe_draft(*args, s - slept, **kw), s - slept) for _, _, s, slept, args, kw in live]

    def err(rows):
        return [abs(p - s) / s for p, s in rows]

    live_ps = [(p, s) for _, p, s, *_ in live]
    jump = _median([s / p for p, s in live_ps[:3]]) / _median([s / p for p, s in ctrl[:3]])
    settled, settled_ctrl = _median(err(live_ps)[30:]), _median(err(ctrl)[30:])
    level = _median([p / pc for (p, _), (pc, _) in zip(live_ps[30:], ctrl[30:])])
    print("control (predicted ms, measured ms):", [(round(p * 1e3, 1), round(s * 1e3, 1)) for p, s in ctrl])
    print(
        f"measured/predicted x{jump:.2f} of the control's right after the slowdown; median error after 30 "
        f"drafts {settled:.3f} (control {settled_ctrl:.3f}); predictions x{level:.2f} of the control's; "
        f"regime changes {lat.regime_changes} (control {control.regime_changes})"
    )
    assert jump > 1.5  # the slowdown was real and unpredicted ...
    assert settled < max(0.25, 1.5 * settled_ctrl)  # ... followed within 30 drafts as well as no change is
    assert 1.5 < level < 2.7  # ... by doubling the model's predictions


def test_calibration_runs_a_selection_pass_on_the_real_model(spec_llm, baseline):
    """The start-up calibration (GPU: the drafter_warmup patch) on the real model and KV cache: a reference, DP and
    acceptance pass on synthetic inputs that writes no KV, makes no selection, and sets the scale that prices
    the first selection; the outputs stay those of plain decoding."""
    import torch

    sel = fresh_selector(spec_llm, first_now=False)
    caches = [t for t in drafter_of(spec_llm).runner.kv_caches if isinstance(t, torch.Tensor)]
    before = [float(t.double().sum()) for t in caches]
    cost = sel.calibrate()
    r = sel.cfg.reference_tokens
    assert cost > 0 and sel._cost_scale == pytest.approx(cost / sel._estimated_selection_s(np.array([2 * r])))
    assert [float(t.double().sum()) for t in caches] == before and not sel.history and sel.current is None
    ref = sel.adapter.synthetic(r)  # its branches see the same prefix: a copy runs like the reference
    h = ref.refs[:-1].unsqueeze(1).expand(-1, 2, -1, -1)
    for item in (0, 1, 2 * sel.L - 2):
        assert torch.allclose(ref.run_item(item, h[item].contiguous())[1], ref.refs[item + 1], atol=1e-4)
    out = [list(o.outputs[0].token_ids) for o in spec_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert out == baseline
