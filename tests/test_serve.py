"""The real thing: `vllm serve MODEL --speculative-config <yaml>` (multiprocess engine, CPU) answers OpenAI
requests, streams, and exposes vLLM's spec-decode metrics and KnapSpec's own on /metrics."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from vllm_knapspec.config import CONFIG_DIR

VLLM = str(Path(sys.executable).parent / "vllm")
STALE_STEPS = 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    # The shipped YAML, with selection made cheap enough to happen within a short test on 2 CPU cores and
    # min_speedup 0 so it drafts (on CPU the selector usually, rightly, prefers plain decoding).
    cfg = yaml.safe_load((CONFIG_DIR / "knapspec.yaml").read_text())
    cfg.update(reference_tokens=8, max_selection_overhead=1.0, min_speedup=0.0, reselect_interval=16)
    path = tmp_path_factory.mktemp("serve") / "knapspec.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    # A metrics folder inherited from a parent process (here: a stale one holding a dead worker's snapshot,
    # as after earlier in-process engines in this pytest run) must be ignored by the server's front-end.
    stale = tmp_path_factory.mktemp("stale-metrics")
    (stale / "worker-1.json").write_text(
        json.dumps({"pid": 1, "time": 0, "counters": {"draft_steps": STALE_STEPS}, "gauges": {}})
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_KNAPSPEC_METRICS_DIR": str(stale)}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real multiprocess server
    env.pop("TRITON_INTERPRET", None)  # as deployed on CPU (the suite sets it for the kernel tests): torch DP
    log = open(path.parent / "server.log", "w")
    proc = subprocess.Popen(
        [
            VLLM,
            "serve",
            model_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--speculative-config",
            str(path),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "2048",
            "--served-model-name",
            "smollm2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, (path.parent / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError((path.parent / "server.log").read_text()[-3000:])
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def metric(text: str, name: str) -> float:
    vals = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
    assert vals, f"{name} missing from /metrics"
    return sum(vals)


def test_completion_then_streaming_chat_then_metrics(server):
    r = httpx.post(
        server + "/v1/completions",
        timeout=300,
        json={
            "model": "smollm2",
            "prompt": "def fibonacci(n):\n",
            "max_tokens": 256,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 256 and body["choices"][0]["text"].strip()

    chunks = []
    with httpx.stream(
        "POST",
        server + "/v1/chat/completions",
        timeout=300,
        json={
            "model": "smollm2",
            "stream": True,
            "max_tokens": 48,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Write a haiku about the ocean."}],
        },
    ) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                chunks.append(delta.get("content") or "")
    assert len(chunks) > 3 and "".join(chunks).strip()

    text = httpx.get(server + "/metrics", timeout=30).text
    assert metric(text, "vllm:spec_decode_num_drafts_total") > 0
    assert metric(text, "vllm:spec_decode_num_draft_tokens_total") > 0
    assert 0 < metric(text, "vllm:knapspec_draft_steps_total") < STALE_STEPS
    assert metric(text, "vllm:knapspec_selections_total") >= 1
    assert metric(text, "vllm:knapspec_draft_fallbacks_total") == 0


def test_the_soak_reads_tie_margins_from_a_real_server(server, monkeypatch):
    """The soak's GPU check asks the plain server for its top log-probabilities at a first difference
    (return_tokens_as_token_ids): the runner-up's margin is the leader's lead over it; a token outside the top
    five has none."""
    import asyncio
    from types import SimpleNamespace

    from vllm_knapspec.tools import soak

    monkeypatch.setattr(soak, "SERVED_NAME", "smollm2")
    ids = httpx.post(server + "/tokenize", json={"model": "smollm2", "prompt": "def fibonacci(n):\n"}).json()["tokens"]
    body = dict(soak.request_body(ids, 1, False), logprobs=5, return_tokens_as_token_ids=True)
    top = httpx.post(server + "/v1/completions", json=body, timeout=120).json()["choices"][0]["logprobs"]
    top = sorted(((v, int(k.split(":")[1])) for k, v in top["top_logprobs"][0].items()), reverse=True)
    (lp1, first), (lp2, second) = top[0], top[1]
    outside = next(t for t in range(100, 200) if t not in {i for _, i in top})

    def mism(ks):
        return dict(prompt=0, first_diff=0, common=[], plain_token=first, ks_token=ks)

    found = [mism(second), mism(outside)]

    async def ask():
        async with httpx.AsyncClient(timeout=120) as client:
            await soak.margins(client, SimpleNamespace(url=server), [(ids, 8)], found)

    asyncio.run(ask())
    assert found[0]["margin"] == round(lp1 - lp2, 4) and found[0]["margin"] >= 0
    assert found[1]["margin"] is None and "margin_error" not in found[1]
