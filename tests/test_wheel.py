"""The package as a user gets it: build the wheel, install it into a fresh virtual environment outside the
checkout, and use it from a folder that is not the checkout. The wheel installs one top-level name
(`vllm_knapspec`), ships the default config and the latency profiles (found by name), registers the vLLM plugin
and the console scripts, and serves SmolLM2 with the shipped config (as shipped, and with a fixed skip set so
that it drafts), greedy outputs equal to plain decoding.

The fresh environment gets vLLM, torch and the rest from the running interpreter's site-packages through a
path entry (a `.pth` line, so the checkout's editable install hook there is not run): nothing is reinstalled."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from vllm_knapspec.config import CONFIG_DIR, PROFILE_DIR, load_speculative_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("knapspec-profile", "knapspec-bench", "knapspec-soak")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of what the package declares (pyproject.toml, README.md, vllm_knapspec/), so the
    checkout gets no build/ or egg-info folders."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "vllm_knapspec",
        src / "vllm_knapspec",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        check=True,
        cwd=tmp,
        timeout=300,
    )
    (whl,) = (tmp / "dist").glob("vllm_knapspec-*.whl")
    return whl


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        record = [line.split(",")[0] for line in z.read(f"{info}/RECORD").decode().splitlines() if line]
        top_level = z.read(f"{info}/top_level.txt").decode().split() if f"{info}/top_level.txt" in names else []
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert {p.split("/")[0] for p in record} - {info} == {"vllm_knapspec"}
    assert top_level in ([], ["vllm_knapspec"])
    shipped = {
        f"vllm_knapspec/configs/{p.relative_to(CONFIG_DIR).as_posix()}"
        for p in CONFIG_DIR.rglob("*")
        if p.suffix in (".yaml", ".json")
    }
    assert "vllm_knapspec/configs/knapspec.yaml" in shipped and len(shipped) >= 2
    assert shipped <= set(record)
    assert "vllm_knapspec/core/kernels/dp_step.py" in record and "vllm_knapspec/tools/bench.py" in record
    assert "knapspec = vllm_knapspec.plugin:register" in entry_points
    for script in SCRIPTS:
        assert f"{script} = " in entry_points


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    site = subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    Path(site, "host_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
    )
    return env_dir


def outside_env() -> dict:
    """The environment of a user outside the checkout: no PYTHONPATH; Triton as a CPU deployment resolves it."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}


CHECK = r"""
import importlib.metadata as md, json, sys
from pathlib import Path
import vllm_knapspec
from vllm_knapspec import config as ks
from vllm_knapspec.core.latency import LatencyModel
venv, expected = Path(sys.argv[1]), json.loads(sys.argv[2])
pkg = Path(vllm_knapspec.__file__).resolve()
assert venv.resolve() in pkg.parents, pkg
assert md.distribution("vllm-knapspec").version == vllm_knapspec.__version__
(ep,) = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "knapspec"]
assert ep.value == "vllm_knapspec.plugin:register", ep
assert ks.load_speculative_config("knapspec.yaml") == expected["config"]
assert ks.load_speculative_config("knapspec") == expected["config"]
for stem in expected["profiles"]:
    path = Path(ks.parse_knapspec({"latency_profile": stem}).latency_profile)
    assert venv.resolve() in path.resolve().parents, path
    LatencyModel.load(path)
print("ok")
"""


def test_installed_outside_the_checkout(venv, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    expected = {
        "config": load_speculative_config(str(CONFIG_DIR / "knapspec.yaml")),
        "profiles": sorted(p.stem for p in PROFILE_DIR.glob("*.json")),
    }
    p = subprocess.run(
        [str(venv / "bin" / "python"), "-c", CHECK, str(venv), json.dumps(expected)],
        cwd=elsewhere,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
    for script in SCRIPTS:
        h = subprocess.run(
            [str(venv / "bin" / script), "--help"],
            cwd=elsewhere,
            env=outside_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert h.returncode == 0 and "usage" in h.stdout, (script, h.stderr[-2000:])


SERVE = r"""
import sys
from pathlib import Path
from vllm import LLM, SamplingParams
from vllm_knapspec.config import load_speculative_config
venv, model = Path(sys.argv[1]).resolve(), sys.argv[2]
kw = dict(enforce_eager=True, distributed_executor_backend="uni", max_model_len=1024, dtype="float32",
          gpu_memory_utilization=0.5, seed=0)
prompts = ["def fibonacci(n):\n", "The capital of France is", "Speculative decoding works by"]
sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
llm = LLM(model, speculative_config=load_speculative_config("knapspec.yaml"), **kw)    # the shipped config, by name
drafter = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.drafter
mod = sys.modules[type(drafter).__module__]
assert type(drafter).__name__ == "KnapSpecDrafter" and venv in Path(mod.__file__).resolve().parents, mod.__file__
def generate(llm):
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
got = generate(llm)
del llm
# the shipped config with a fixed skip set: it drafts on every step
fixed = LLM(model, speculative_config={**load_speculative_config("knapspec.yaml"), "skip_set": "a5,m9"},
            disable_log_stats=False, **kw)
drafted = generate(fixed)
drafts = sum(getattr(m, "value", 0) for m in fixed.get_metrics() if m.name == "vllm:spec_decode_num_drafts")
del fixed
plain = generate(LLM(model, **kw))
assert got == plain and drafted == plain, (got, drafted, plain)
assert drafts > 0, drafts
print("served ok", drafts)
"""


def test_serves_smollm2_with_the_shipped_config(venv, tmp_path, model_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        **outside_env(),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
    }
    p = subprocess.run(
        [str(venv / "bin" / "python"), "-c", SERVE, str(venv), model_path],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(p.stdout[-2000:])
    assert p.returncode == 0 and "served ok" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]
