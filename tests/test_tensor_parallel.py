"""Tensor parallel on the CPU backend: SmolLM2 has 9 heads / 3 KV heads, so TP=3 (TP=2 is impossible). Every rank
runs the DP and drafts with the same skip set (rank 0's timing-dependent decisions are broadcast): no deadlock, no
fallback, output equal to plain decoding."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run(mode, out, model):
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.pop("TRITON_INTERPRET", None)          # as deployed on CPU: the DP runs in torch
    subprocess.run([sys.executable, str(HERE / "tp_check.py"), "3", mode, str(out), model], check=True, env=env,
                   timeout=900, capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tp3_selector_lossless_and_consistent(model_path, tmp_path):
    spec = run("knapspec", tmp_path / "k.json", model_path)
    plain = run("plain", tmp_path / "p.json", model_path)
    assert spec["out"] == plain["out"]
    assert spec["m"]["vllm:knapspec_selections"] > 0 and spec["m"]["vllm:knapspec_draft_fallbacks"] == 0
    assert spec["m"]["vllm:spec_decode_num_draft_tokens"] > 0
