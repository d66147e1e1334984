"""Lossless on Qwen2.5-Coder-1.5B-Instruct (scripts/get_model.py qwen2.5-coder-1.5b), float32 on CPU: greedy
KnapSpec with fixed skip sets == greedy plain decoding, with drafts happening. Slow (1.5 B parameters on the CPU):
`bash scripts/test.sh -m slow -k real_model`."""
import subprocess
import sys

import pytest
from vllm import SamplingParams

from conftest import ROOT, drafter_of, make_llm, spec_counters
from vllm_knapspec.selector import FixedSelector
from vllm_knapspec.skipset import SkipSet

pytestmark = pytest.mark.slow
PROMPTS = ["def quicksort(items):\n", "import json\n\n\ndef load_config(path):\n",
           "The three laws of thermodynamics say that", "A short story about a lighthouse keeper:\n"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
# the attention of layers 2..15 (25 % of the 56 sublayers; acceptance ~0.45 on the H200) and two MLPs
SKIP_SETS = {"attn_low": ",".join(f"a{i}" for i in range(2, 16)), "mlp2": "m14,m15"}


@pytest.fixture(scope="module")
def qwen_path():
    out = subprocess.check_output([sys.executable, str(ROOT / "scripts" / "get_model.py"), "qwen2.5-coder-1.5b"],
                                  text=True)
    return out.strip().splitlines()[-1]


def _generate(llm):
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def plain_out(qwen_path):
    llm = make_llm(qwen_path, max_model_len=512)
    out = _generate(llm)
    del llm
    return out


@pytest.mark.parametrize("name", list(SKIP_SETS))
def test_real_model_greedy_equal(qwen_path, plain_out, name):
    llm = make_llm(qwen_path, {"method": "knapspec", "num_speculative_tokens": 4, "skip_set": SKIP_SETS[name]},
                   max_model_len=512)
    d = drafter_of(llm)
    d.selector = FixedSelector(SkipSet.parse(d.draft.num_layers, SKIP_SETS[name]), 4)
    before = spec_counters(llm)
    got = _generate(llm)
    after = spec_counters(llm)
    drafted = after["vllm:spec_decode_num_draft_tokens"] - before.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = after["vllm:spec_decode_num_accepted_tokens"] - before.get("vllm:spec_decode_num_accepted_tokens", 0)
    print(f"{name}: acceptance {accepted / max(drafted, 1):.2f} over {drafted} drafted tokens")
    assert drafted > 0
    assert got == plain_out
    del llm
