"""Config: one pydantic model; every way of passing it selects KnapSpec; bad input fails at startup with one
clear line naming the field and what is allowed, a non-zero exit, and no traceback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_knapspec import config as ks

ROOT = Path(__file__).resolve().parents[1]
VLLM = str(Path(sys.executable).parent / "vllm")


def test_defaults_follow_official_code():
    c = ks.KnapSpecConfig()
    assert (c.reselect_interval, c.sim_threshold, c.confidence_threshold, c.weight_cap) == (64, 0.5, 0.7, 5)


def test_split_turns_knapspec_into_draft_model():
    vllm_part, cfg = ks.split_speculative_config(
        {"method": "knapspec", "num_speculative_tokens": 7, "reselect-interval": 16}
    )
    assert vllm_part == {"method": "draft_model", "num_speculative_tokens": 7}  # model: the target (patches)
    assert cfg.reselect_interval == 16 and cfg.num_speculative_tokens == 7


def test_yaml_file_is_the_documented_config():
    raw = ks.load_speculative_config(str(ks.CONFIG_DIR / "knapspec.yaml"))
    _, cfg = ks.split_speculative_config(raw)
    assert ks.is_knapspec(raw) and cfg.num_speculative_tokens == 5
    assert (ROOT / "configs" / "knapspec.yaml").resolve() == (ks.CONFIG_DIR / "knapspec.yaml").resolve()


def test_shipped_config_and_profiles_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such files here
    shipped = ks.load_speculative_config(str(ks.CONFIG_DIR / "knapspec.yaml"))
    for name in ("knapspec.yaml", "knapspec", "configs/knapspec.yaml"):
        assert ks.load_speculative_config(name) == shipped
    profile = ks.PROFILE_DIR / "SmolLM2-135M-Instruct.cpu.float32.json"
    for name in ("SmolLM2-135M-Instruct.cpu.float32", profile.name, f"configs/profiles/{profile.name}"):
        assert ks.parse_knapspec({"latency_profile": name}).latency_profile == str(profile)
    (tmp_path / "knapspec.yaml").write_text("method: knapspec\nnum_speculative_tokens: 3\n")  # a local file wins
    assert ks.load_speculative_config("knapspec.yaml")["num_speculative_tokens"] == 3
    for missing in ("elsewhere/knapspec.yaml", "nothing.yaml"):
        with pytest.raises(ks.KnapSpecConfigError, match="shipped config"):
            ks.load_speculative_config(missing)
    with pytest.raises(ks.KnapSpecConfigError, match="shipped profiles"):
        ks.parse_knapspec({"latency_profile": "elsewhere/" + profile.name})


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, model_path):
    d = tmp_path_factory.mktemp("gpt2like")
    for f in Path(model_path).iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, d / f.name)
    c = json.loads((d / "config.json").read_text())
    c["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(c))
    return str(d)


BAD = {
    "unknown_key": ({"method": "knapspec", "reselect_intervall": 8}, "reselect_intervall"),
    "negative_gamma": ({"method": "knapspec", "num_speculative_tokens": -1}, "num_speculative_tokens"),
    "zero_interval": ({"method": "knapspec", "reselect_interval": 0}, "reselect_interval"),
    "negative_reference": ({"method": "knapspec", "reference_tokens": -4}, "reference_tokens"),
    "sim_above_1": ({"method": "knapspec", "sim_threshold": 1.5}, "sim_threshold"),
    "conf_below_0": ({"method": "knapspec", "confidence_threshold": -0.1}, "confidence_threshold"),
    "wrong_type": ({"method": "knapspec", "reselect_interval": "often"}, "reselect_interval"),
    "missing_profile": ({"method": "knapspec", "latency_profile": "/nonexistent/profile.json"}, "latency_profile"),
    "bad_skip_set": ({"method": "knapspec", "skip_set": "attn3"}, "skip_set"),
    "bad_kernels": ({"method": "knapspec", "kernels": "cuda"}, "kernels"),
    "foreign_draft_model": ({"method": "knapspec", "model": "some/other-model"}, "model"),
    "budget_zero": ({"method": "knapspec", "budget_fraction": 0}, "budget_fraction"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_unit(case):
    raw, field = BAD[case]
    with pytest.raises(ks.KnapSpecConfigError) as e:
        ks.split_speculative_config(raw)
    assert field in str(e.value)


def run_serve(args, cwd):
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([VLLM, "serve", *args], capture_output=True, text=True, timeout=180, cwd=cwd, env=env)


@pytest.mark.parametrize("case", list(BAD) + ["unsupported_arch", "yaml_file_bad"])
def test_bad_config_cli_exits_cleanly(case, model_path, gpt2_dir, tmp_path):
    if case == "unsupported_arch":
        args, field = [gpt2_dir, "--speculative-config", json.dumps({"method": "knapspec"})], "GPT2LMHeadModel"
    elif case == "yaml_file_bad":
        y = tmp_path / "bad.yaml"
        y.write_text("method: knapspec\nsim_threshold: 2\n")
        args, field = [model_path, "--speculative-config", str(y)], "sim_threshold"
    else:
        raw, field = BAD[case]
        args = [model_path, "--speculative-config", json.dumps(raw)]
    p = run_serve(args, tmp_path)
    err = p.stderr + p.stdout
    assert p.returncode != 0
    assert field in err and "Traceback" not in err, err[-2000:]
    assert "Allowed" in err or "Supported" in err or "allowed" in err


def _engine_config(argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    try:  # 0.32
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # 0.26
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    ns = parser.parse_args(argv)
    if getattr(ns, "model_tag", None):
        ns.model = ns.model_tag
    return AsyncEngineArgs.from_cli_args(ns).create_engine_config()


@pytest.mark.parametrize("form", ["yaml_path", "shipped_name", "inline_json", "serve_config_file"])
def test_every_cli_form_selects_knapspec(form, model_path, tmp_path, monkeypatch):
    import vllm_knapspec.plugin

    vllm_knapspec.plugin.register()
    monkeypatch.chdir(tmp_path)
    if form == "yaml_path":
        argv = ["--model", model_path, "--speculative-config", str(ks.CONFIG_DIR / "knapspec.yaml")]
    elif form == "shipped_name":
        argv = ["--model", model_path, "--speculative-config", "knapspec.yaml"]
    elif form == "inline_json":
        argv = [
            "--model",
            model_path,
            "--speculative-config",
            json.dumps({"method": "knapspec", "num_speculative_tokens": 3, "sim_threshold": 0.6}),
        ]
    else:
        serve = tmp_path / "serve.yaml"
        serve.write_text(
            f"model: {model_path}\nspeculative-config:\n  method: knapspec\n"
            f"  num_speculative_tokens: 4\n  reselect_interval: 32\n"
        )
        argv = ["--config", str(serve)]
    cfg = _engine_config(argv + ["--dtype", "float32", "--max-model-len", "1024"])
    spec = cfg.speculative_config
    assert spec.method == "draft_model" and spec.model == model_path  # the draft is the target itself
    assert spec.knapspec["num_speculative_tokens"] == spec.num_speculative_tokens
    assert cfg.num_lookahead_tokens == spec.num_speculative_tokens  # vLLM reserves the draft's KV slots
    if form == "serve_config_file":
        assert spec.knapspec["reselect_interval"] == 32
