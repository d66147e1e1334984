"""vLLM's Ray executor on the CPU backend (the ray_cpu patch, vllm_knapspec/adapter/patches/cpu.py): tensor parallel 3
over a local Ray cluster with KnapSpec, lossless against plain decoding with the same TP, the same plans on every
rank, KnapSpec's worker counters reaching the driver. Needs ray (`bash scripts/test.sh -m slow` installs it)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_tensor_parallel import check_knapspec_tp3, run

pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_cluster():
    """A local head with 3 logical CPUs (the 3 {"CPU": 1} bundles of TP=3; this machine may have 2 cores).
    Ray starts workers at nice 15: next to other load they starve, so niceness 0."""
    ray = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    env = {**os.environ, "RAY_worker_niceness": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "3",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    try:
        yield "auto"  # the cluster this machine's `ray start` recorded (Ray's default temp dir)
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


@pytest.mark.slow
def test_ray_tp3_knapspec_on_cpu(model_path, tmp_path, ray_cluster):
    spec = run(
        "knapspec",
        tmp_path / "k.json",
        model_path,
        executor="ray",
        env={"RAY_ADDRESS": ray_cluster, "RAY_DEDUP_LOGS": "0"},
    )
    plain = run("plain", tmp_path / "p.json", model_path)  # the mp executor, same TP
    assert spec["executor"] == "ray"
    check_knapspec_tp3(spec, plain)
