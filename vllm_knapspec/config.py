"""KnapSpec configuration: one pydantic model, loaded from YAML/JSON/dict, validated at startup.

A speculative config for KnapSpec looks like (flat, next to vLLM's own keys):

    method: knapspec
    num_speculative_tokens: 5      # vLLM's key: the maximum draft length (gamma_max)
    reselect_interval: 64          # KnapSpec keys (see KnapSpecConfig)
    ...

`split_speculative_config` separates the two and turns it into vLLM's `draft_model` method (the runner then
drafts with KnapSpecDrafter, the target's own modules).

The default config and the latency profiles ship inside the package (`vllm_knapspec/configs/`): a config or
profile named by its file name (`knapspec.yaml`, `SmolLM2-135M-Instruct.cpu.float32`) or by its path in a source
checkout (`configs/knapspec.yaml`, `configs/profiles/<name>.json`) that is not a file here is the shipped one.
No vLLM imports here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

METHOD = "knapspec"
# vLLM SpeculativeConfig keys that make sense with KnapSpec (the draft is the target itself).
VLLM_KEYS = {
    "method",
    "model",
    "num_speculative_tokens",
    "max_model_len",
    "disable_by_batch_size",
    "draft_tensor_parallel_size",
    "rejection_sample_method",
    "disable_log_stats",
}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped: knapspec.yaml
PROFILE_DIR = CONFIG_DIR / "profiles"  # shipped latency profiles (knapspec-profile)
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def shipped_file(name: str, folder: Path = CONFIG_DIR, suffixes=_CONFIG_SUFFIXES) -> Optional[Path]:
    """The shipped file in `folder` that `name` stands for: its file name with or without the suffix
    ('knapspec.yaml', 'knapspec'), or its path relative to a source checkout ('configs/knapspec.yaml',
    'configs/profiles/<name>.json', also 'profiles/<name>.json'); None when it names no shipped file."""
    p = PurePosixPath(str(name).strip())
    rel = folder.relative_to(CONFIG_DIR.parent).as_posix()  # "configs" or "configs/profiles"
    if str(p.parent) not in {".", rel, rel.partition("/")[2] or "."}:
        return None
    for cand in (p.name, *(p.name + s for s in suffixes)):
        f = folder / cand
        if f.suffix in suffixes and f.is_file():
            return f
    return None


def shipped_names(folder: Path = CONFIG_DIR, suffixes=_CONFIG_SUFFIXES) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if f.suffix in suffixes) if folder.is_dir() else []


def resolve_profile(path: str) -> str:
    """A latency profile path as given when it is a file, else the shipped profile it names."""
    if Path(os.path.expanduser(path)).is_file():
        return path
    f = shipped_file(path, PROFILE_DIR, (".json",))
    if f is None:
        raise ValueError(
            f"file not found: {path} (shipped profiles: {', '.join(shipped_names(PROFILE_DIR, ('.json',)))})"
        )
    return str(f)


class KnapSpecConfigError(ValueError):
    """A bad KnapSpec config: the message names the field and what is allowed."""


class KnapSpecConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_speculative_tokens: int = Field(5, ge=1, le=32, description="maximum draft length gamma_max")
    reselect_interval: int = Field(
        64, ge=1, le=1_000_000, description="re-run the DP every N decode steps (official code: 64)"
    )
    reference_tokens: int = Field(32, ge=1, le=512, description="r: reference tokens the DP compares on")
    sim_threshold: float = Field(0.5, ge=0.0, le=1.0, description="DP pruning: drop branches below this cosine")
    confidence_threshold: float = Field(
        0.7, ge=0.0, le=1.0, description="stop drafting a request when top-1 prob falls below this"
    )
    weight_cap: int = Field(5, ge=1, le=100, description="cap on the larger integer item weight")
    budget_fraction: float = Field(0.5, gt=0.0, le=1.0, description="at most this share of weight is skipped")
    min_speedup: float = Field(
        1.02,
        ge=0.0,
        le=10.0,
        description="speculate only if predicted TPT beats plain decoding by this factor "
        "(0: always draft with the best candidate); a plan measured at or "
        "below min(1, this) x plain over 16 steps is stopped",
    )
    context_change: float = Field(
        0.5, gt=0.0, le=100.0, description="re-select early when mean context grew by this fraction"
    )
    acceptance_change: float = Field(
        0.2, gt=0.0, le=1.0, description="re-select early when realised acceptance moves this far"
    )
    latency_profile: Optional[str] = Field(
        None, description="path of a latency profile JSON (knapspec-profile), or the name of a shipped one"
    )
    profile_dir: Optional[str] = Field(None, description="folder searched for a matching profile")
    online_refit: bool = Field(True, description="refit the latency model from live step timings")
    skip_set: Optional[str] = Field(
        None,
        description="fixed skip set for debugging, e.g. 'a3,a5,m7'; "
        "'' = draft with the full model; disables the selector",
    )
    kernels: Literal["auto", "triton", "torch"] = Field("auto", description="DP / TPT kernels")
    # 1 %: on a model where no draft pays, selections are what KnapSpec costs over plain decoding (its other
    # per-step host cost measured ~0 on CPU and H200), so this share bounds that cost.
    max_selection_overhead: float = Field(
        0.01,
        gt=0.0,
        le=1.0,
        description="re-select only while selection time stays under this share of decode wall time",
    )
    selector: Literal["knapspec", "clasp"] = Field(
        "knapspec",
        description="knapspec: latency-weighted DP over 2L sublayers + TPT; clasp: baseline, "
        "whole layers, cosine DP, fixed budget clasp_skip_layers, fixed gamma",
    )
    clasp_skip_layers: int = Field(8, ge=1, le=1024, description="CLaSp baseline: whole layers skipped")
    draft_graphs: Literal["auto", "off"] = Field(
        "auto",
        description="auto: replay draft steps from CUDA graphs on a CUDA device unless the target runs "
        "eagerly (enforce_eager); off: always eager",
    )
    uniform_graphs: bool = Field(
        True,
        description="GPU: also capture full CUDA graphs for decode batches of "
        "1..gamma_max tokens per request (vLLM captures only "
        "gamma_max+1), so steps without or with shorter drafts replay "
        "full graphs instead of piecewise ones",
    )

    lookup: Literal["auto", "off"] = Field(
        "auto",
        description="auto: prompt-lookup drafts (vLLM's n-gram matcher) compete with the layer-skip draft per "
        "step and request by predicted tokens per time (sync scheduling: matched on the host; the V2 runner's "
        "async scheduling: matched on the device by a search compiled at start-up, one draft length per step); off: "
        "never",
    )
    lookup_min: int = Field(2, ge=1, le=64, description="shortest n-gram a lookup draft matches")
    lookup_max: int = Field(5, ge=1, le=64, description="longest n-gram a lookup draft matches (>= lookup_min)")

    @field_validator("lookup_max")
    @classmethod
    def _lookup_lengths(cls, v, info):
        low = info.data.get("lookup_min", 1)
        if v < low:
            raise ValueError(f"must be >= lookup_min ({low})")
        return v

    @field_validator("latency_profile")
    @classmethod
    def _profile_exists(cls, v):
        return v if v is None else resolve_profile(v)

    @field_validator("skip_set")
    @classmethod
    def _skip_set_syntax(cls, v):
        if v is None:
            return v
        import re

        for tok in filter(None, (t.strip() for t in v.split(","))):
            if not re.fullmatch(r"[am]\d+", tok):
                raise ValueError(f"bad item {tok!r}: use a<layer> (attention) or m<layer> (MLP), e.g. 'a3,m7'")
        return v


_OPS = {"Ge": ">=", "Gt": ">", "Le": "<=", "Lt": "<"}


def describe(field: str) -> str:
    """'int, >= 1, <= 32: maximum draft length gamma_max' (used in errors and the README table)."""
    f = KnapSpecConfig.model_fields.get(field)
    if f is None:
        return ""
    ann = str(f.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    ann = ann.replace("Optional[str]", "a path/string or null").replace("Literal", "one of ")

    def bound(m):
        return next(iter(vars(m).values())) if hasattr(m, "__dict__") else getattr(m, type(m).__name__.lower())

    bounds = [f"{_OPS[type(m).__name__]} {bound(m)}" for m in f.metadata if type(m).__name__ in _OPS]
    return ", ".join([ann, *bounds]) + f": {f.description}"


def _format_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(set(KnapSpecConfig.model_fields) | VLLM_KEYS))
            lines.append(f"unknown key '{field}'. Allowed keys: {allowed}")
        else:
            lines.append(f"'{field}' = {err.get('input')!r}: {err['msg']}. Allowed: {describe(field)}")
    return "invalid KnapSpec speculative config: " + "; ".join(lines)


def parse_knapspec(raw: dict[str, Any]) -> KnapSpecConfig:
    try:
        return KnapSpecConfig(**raw)
    except ValidationError as e:
        raise KnapSpecConfigError(_format_error(e)) from None
    except TypeError as e:  # e.g. non-string keys
        raise KnapSpecConfigError(f"invalid KnapSpec speculative config: {e}") from None


def is_knapspec(spec: dict[str, Any] | None) -> bool:
    if not isinstance(spec, dict):
        return False
    return spec.get("method") == METHOD


def split_speculative_config(spec: dict[str, Any]) -> tuple[dict[str, Any], KnapSpecConfig]:
    """{"method": "knapspec", ...} -> (vLLM SpeculativeConfig kwargs, KnapSpecConfig)."""
    spec = {str(k).replace("-", "_"): v for k, v in spec.items()}
    vllm_part = {k: v for k, v in spec.items() if k in VLLM_KEYS and k != "num_speculative_tokens"}
    ks_part = {k: v for k, v in spec.items() if k not in VLLM_KEYS or k == "num_speculative_tokens"}
    if vllm_part.pop("model", None) is not None:
        raise KnapSpecConfigError(
            f"invalid KnapSpec speculative config: 'model' = {spec['model']!r}: KnapSpec drafts with the "
            "target model itself. Allowed: leave 'model' out"
        )
    cfg = parse_knapspec(ks_part)
    vllm_part.update(method="draft_model", num_speculative_tokens=cfg.num_speculative_tokens)
    return vllm_part, cfg


def config_path(path: str) -> Path:
    """The config file a `--speculative-config` value names: the path when it is a file, else the shipped config
    of that name."""
    p = Path(os.path.expanduser(path.strip()))
    if p.is_file():
        return p
    f = shipped_file(path)
    if f is None:
        raise KnapSpecConfigError(
            f"--speculative-config: {path.strip()!r} is neither JSON nor an existing "
            f".yaml/.json file nor a shipped config ({', '.join(shipped_names())})"
        )
    return f


def load_speculative_config(text_or_path: str) -> dict[str, Any]:
    """`--speculative-config` value: inline JSON, a path to a .yaml/.yml/.json file, or the name of a shipped
    config ('knapspec.yaml') when no such file exists here."""
    s = text_or_path.strip()
    if s.startswith("{"):
        return json.loads(s)
    p = config_path(s)
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(p.read_text())
    else:
        data = json.loads(p.read_text())
    if isinstance(data, dict) and "speculative_config" in data and len(data) == 1:
        data = data["speculative_config"]
    if not isinstance(data, dict):
        raise KnapSpecConfigError(
            f"--speculative-config file {s}: expected a mapping of keys, got {type(data).__name__}"
        )
    return data


def check_architecture(architectures: list[str] | None) -> None:
    archs = list(architectures or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise KnapSpecConfigError(
            f"KnapSpec does not support architecture {archs or 'unknown'}: the layer-skipping draft needs a dense "
            f"decoder with input_layernorm/self_attn/post_attention_layernorm/mlp sublayers. "
            f"Supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
