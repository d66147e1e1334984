"""vLLM-CPU defects that KnapSpec's CPU patches (vllm_knapspec/adapter/patches/cpu.py) repair, on the real model."""

from vllm import SamplingParams

from conftest import make_llm

PROMPTS = [{"prompt_token_ids": [(i * 7 + j) % 3000 + 100 for j in range(600)]} for i in range(3)]
SEEDED = [SamplingParams(max_tokens=8, temperature=0.8, seed=i, ignore_eos=True) for i in range(3)]


def _sample(model_path, **kw) -> list[list[int]]:
    llm = make_llm(model_path, **kw)
    try:
        return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, SEEDED, use_tqdm=False)]
    finally:
        del llm


def test_seeded_sampling_survives_chunked_prefill(model_path):
    """A seeded sampled request in chunked prefill throws its first samples away, and vLLM rewinds its generator
    by an offset that CPU generators do not have: without the cpu_generator_rewind patch the engine dies ("CPU
    Generator does not use offset"), speculation or not. With it the rewind is exact: the same seeds give the
    same tokens whether the 600-token prompts go through in one step or in chunks of 128 tokens."""
    whole = _sample(model_path, max_num_batched_tokens=4096)
    chunked = _sample(model_path, max_num_batched_tokens=128, enable_chunked_prefill=True)
    assert chunked == whole and all(len(t) == 8 for t in whole)
    assert len({tuple(t) for t in whole}) == 3  # three seeds, three samples: not a degenerate comparison
