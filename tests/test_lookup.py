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
    c = choose_step(np.array([True, False, True]), np.array([0.95, 0.0, 0.1]), 0.6, 1.0, t_verify, 0.1, 5)
    assert c.use_skip and c.gamma > 0
    assert c.lookup_rows.tolist() == [True, False, False]  # row 2's lookup is worse than the plan's 0.6
    dear = choose_step(np.array([True, False]), np.array([0.95, 0.0]), 0.6, 1.0, t_verify, 2.0, 5)
    assert not dear.use_skip and dear.lookup_rows.tolist() == [True, False]  # draft steps too dear: lookup alone


def test_lookup_acceptance_learns_per_request():
    acc = LookupAcceptance()
    for _ in range(5):
        acc.observe("copy", 5, 5)
        acc.observe("prose", 5, 0)
    assert acc.alpha("copy") > 0.8 > 0.2 > acc.alpha("prose")
    acc.forget({"copy"})
    assert acc.alpha("prose") == acc.prior


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
