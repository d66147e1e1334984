"""What every patch shares: one way to wrap a vLLM symbol, refusing double application (general plugins load
in every vLLM process, sometimes twice), and the test for "this engine runs KnapSpec"."""

from __future__ import annotations

MARK = "__knapspec_patched__"


def wrap(owner, name: str, make) -> bool:
    """Replace owner.name by make(original) once; False if it was already replaced."""
    orig = owner.__dict__[name]
    if is_patched(orig):
        return False
    new = make(orig)
    setattr(new, MARK, True)
    setattr(owner, name, new)
    return True


def is_patched(fn) -> bool:
    return getattr(fn, MARK, False)


def uses_knapspec(speculative_config) -> bool:
    """A SpeculativeConfig made from a KnapSpec config (config_entry attached its keys)."""
    return speculative_config is not None and getattr(speculative_config, "knapspec", None) is not None
