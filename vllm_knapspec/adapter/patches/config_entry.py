"""How a KnapSpec config enters vLLM: `--speculative-config knapspec.yaml` on the command line, and
{"method": "knapspec", ...} becoming vLLM's own draft-model method with the target as its draft.

- speculative_config_file   FlexibleArgumentParser.parse_args        (0.26.0, 0.32.0)
  --speculative-config accepts a YAML/JSON file; a bad KnapSpec config exits with one clear line.
- knapspec_as_draft_model   EngineArgs.create_speculative_config     (0.26.0, 0.32.0)
  {"method": "knapspec", ...} -> method "draft_model" with model = the target; the KnapSpec keys travel on
  the SpeculativeConfig as `knapspec` (a dict: pickled to EngineCore and workers). On 0.26, which turns async
  scheduling on by default for EAGLE-type methods only, async scheduling is asked for where the user left it
  unset (0.27+ does that for draft_model itself).
"""

from __future__ import annotations

import functools
import json
import os
import sys

from vllm_knapspec import config as ks
from vllm_knapspec.adapter.patches.base import wrap


def patch_knapspec_as_draft_model() -> None:
    from vllm.engine.arg_utils import EngineArgs

    wrap(EngineArgs, "create_speculative_config", _make_create)


def _make_create(orig):
    @functools.wraps(orig)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        raw = self.speculative_config
        if not ks.is_knapspec(raw):
            return orig(self, target_model_config, target_parallel_config)
        vllm_part, cfg = ks.split_speculative_config(raw)
        ks.check_architecture(getattr(target_model_config.hf_config, "architectures", None))
        vllm_part["model"] = target_model_config.model  # the draft is the target itself
        if getattr(self, "async_scheduling", False) is None and _async_needs_asking():
            self.async_scheduling = True
        self.speculative_config = vllm_part
        try:
            spec = orig(self, target_model_config, target_parallel_config)
        finally:
            self.speculative_config = raw
        object.__setattr__(spec, "knapspec", cfg.model_dump())
        return spec

    return create_speculative_config


def _async_needs_asking() -> bool:
    from vllm_knapspec.adapter.compat import vllm_version

    return vllm_version() < (0, 27)


_SC_FLAGS = ("--speculative-config", "-sc")


def inline_spec_files(args: list[str]) -> list[str]:
    """Turn `--speculative-config knapspec.yaml` into the JSON vLLM's argument type expects.

    ["serve", "m", "-sc", "ks.yaml"] -> ["serve", "m", "-sc", '{"method": "knapspec", ...}']
    """
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


def patch_speculative_config_file() -> None:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    wrap(FlexibleArgumentParser, "parse_args", _make_parse_args)


def _make_parse_args(orig):
    @functools.wraps(orig)
    def parse_args(self, args=None, namespace=None):
        try:
            args = inline_spec_files(list(sys.argv[1:] if args is None else args))
            ns = orig(self, args, namespace)
            validate_namespace(ns)
        except ks.KnapSpecConfigError as e:
            self.exit(2, f"error: {e}\n")  # one clear line, no traceback, non-zero exit
        return ns

    return parse_args
