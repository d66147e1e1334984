"""The worked examples in docstrings are run: a docstring that shows a result shows the code's."""

import doctest
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "vllm_knapspec"
MODULES = sorted(
    ".".join(p.relative_to(PKG.parent).with_suffix("").parts) for p in PKG.rglob("*.py") if ">>> " in p.read_text()
)


def test_examples_are_found():
    assert "vllm_knapspec.core.lookup" in MODULES, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


TOOLS = PKG.parent / "tools"
TOOL_MODULES = sorted(p.stem for p in TOOLS.glob("*.py") if ">>> " in p.read_text())


@pytest.mark.parametrize("name", TOOL_MODULES)
def test_tool_docstring_examples(name, monkeypatch):
    """The measuring tools' worked examples too (tools/ is not a package: imported from its folder; a tool's
    environment defaults are undone after)."""
    import os

    monkeypatch.syspath_prepend(str(TOOLS))
    env = dict(os.environ)
    try:
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    finally:
        for key in set(os.environ) - set(env):
            del os.environ[key]
    assert result.attempted > 0, f"tools/{name}.py has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in tools/{name}.py failed"
