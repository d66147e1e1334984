"""Tensor parallel on the CPU backend: SmolLM2 has 9 heads / 3 KV heads, so TP=3 (TP=2 is impossible). Every rank
runs the DP and drafts with the same skip set (rank 0's timing-dependent decisions are broadcast): no deadlock, no
fallback, output equal to plain decoding, and the same KnapSpec counters on every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run(mode, out, model, executor="mp", env=None):
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.pop("TRITON_INTERPRET", None)  # as deployed on CPU: the DP runs in torch
    p = subprocess.run(
        [sys.executable, str(HERE / "tp_check.py"), "3", mode, str(out), model, executor],
        env=env,
        timeout=1200,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return json.loads(out.read_text())


def check_knapspec_tp3(spec, plain):
    assert spec["out"] == plain["out"]
    assert spec["m"]["vllm:knapspec_selections"] > 0 and spec["m"]["vllm:knapspec_draft_fallbacks"] == 0
    assert spec["m"]["vllm:spec_decode_num_draft_tokens"] > 0
    ranks = spec["ranks"]  # one KnapSpec snapshot per worker: the same plans on every rank
    assert len(ranks) == 3, ranks
    for key in ("selections", "draft_steps", "no_spec_steps", "draft_fallbacks"):
        assert len({r[key] for r in ranks}) == 1, (key, ranks)


@pytest.mark.slow
def test_tp3_selector_lossless_and_consistent(model_path, tmp_path):
    spec = run("knapspec", tmp_path / "k.json", model_path)
    plain = run("plain", tmp_path / "p.json", model_path)
    check_knapspec_tp3(spec, plain)
