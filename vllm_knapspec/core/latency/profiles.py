"""Latency profiles: a LatencyModel saved as JSON for one (model, device, dtype, tensor_parallel_size), and the
file name a profile of that key gets in a profile folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm_knapspec.core.latency.law import _PRIOR_SOURCES, COEF_NAMES

if TYPE_CHECKING:
    from vllm_knapspec.core.latency.model import LatencyModel

_FORMAT_VERSION = 1


def _dtype_str(dtype) -> str:
    s = str(dtype)
    return s[len("torch.") :] if s.startswith("torch.") else s


@dataclass(frozen=True)
class ProfileKey:
    """What a latency profile is valid for."""

    model: str
    device: str
    dtype: str
    tensor_parallel_size: int = 1

    @classmethod
    def make(cls, model, device, dtype, tp=1) -> "ProfileKey":
        return cls(str(model), str(device), _dtype_str(dtype), int(tp))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
        }


def _safe(part: str, maxlen: int = 60) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", part).strip("._-") or "x"
    return s[:maxlen]


def profile_path(directory, model, device, dtype, tp=1) -> str:
    """Filesystem-safe JSON path for the profile of (model, device, dtype, tensor_parallel_size).

    Readable parts are sanitised to [A-Za-z0-9._-] and truncated; a short hash of the exact key keeps
    keys that sanitise alike ("org/m" vs "org_m") apart.
    """
    key = ProfileKey.make(model, device, dtype, tp)
    digest = hashlib.sha1(json.dumps(key.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    name = (
        f"latency__{_safe(key.model)}__{_safe(key.device, 40)}__{_safe(key.dtype, 16)}"
        f"__tp{key.tensor_parallel_size}__{digest}.json"
    )
    return os.path.join(os.fspath(directory), name)


class Profiles:
    """LatencyModel's persistence (mixin)."""

    def to_dict(self) -> dict:
        return {
            "format": "knapspec-latency",
            "version": _FORMAT_VERSION,
            "key": self.key.to_dict() if self.key else None,
            "num_layers": self.num_layers,
            "coefficients": {n: float(v) for n, v in zip(COEF_NAMES, self._theta)},
            "source": (
                "online"
                if self.source in _PRIOR_SOURCES and self._robust["draft"].n + self._robust["verify"].n >= 200
                else self.source
            ),
            "saved_at": time.time(),
            "stats": {k: v for k, v in self.coefficients().items() if k not in COEF_NAMES},
        }

    def save(self, path) -> None:
        """Write the profile as JSON (atomically: temp file + rename)."""
        path = os.fspath(path)
        d = os.path.dirname(path) or "."
        os.makedirs(d, exist_ok=True)
        data = json.dumps(self.to_dict(), indent=1, allow_nan=True)
        fd, tmp = tempfile.mkstemp(prefix=".latency.", suffix=".json", dir=d)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path, expect_key: ProfileKey | None = None, **kw) -> "LatencyModel":
        """Read a profile written by :meth:`save`.  With expect_key, a profile for another
        (model, device, dtype, tp) raises ValueError.  kw: constructor options (forgetting, ...)."""
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != "knapspec-latency":
            raise ValueError(f"{path}: not a knapspec latency profile")
        key = ProfileKey(**data["key"]) if data.get("key") else None
        if expect_key is not None and key != expect_key:
            raise ValueError(f"{path}: profile is for {key}, expected {expect_key}")
        return cls(int(data["num_layers"]), data["coefficients"], key=key, source=data.get("source", "profile"), **kw)

    @classmethod
    def load_or_prior(cls, directory, model, device, dtype, tp, num_layers: int, **kw) -> "LatencyModel":
        """The saved profile for this key if one exists (and has num_layers), else the prior."""
        key = ProfileKey.make(model, device, dtype, tp)
        path = profile_path(directory, model, device, dtype, tp)
        if os.path.exists(path):
            m = cls.load(path, expect_key=key, **kw)
            if m.num_layers == num_layers:
                return m
        return cls(num_layers, key=key, **kw)
