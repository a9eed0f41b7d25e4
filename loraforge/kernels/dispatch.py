"""Choosing between a Triton kernel and its PyTorch reference.

Every kernel in this package has a PyTorch reference beside it. :func:`use_triton` decides per
call which one runs:

- ``LORAFORGE_KERNELS=reference`` forces the reference everywhere (``auto``, the default, is
  the rule below).
- CUDA tensors run the Triton kernel when ``triton`` imports.
- CPU tensors run the reference, except when ``TRITON_INTERPRET=1`` is set: then the Triton
  kernel runs in Triton's interpreter (slow, for CI; the environment variable is read when a
  kernel is first launched, see :mod:`loraforge.kernels.jit`).

:func:`notice` prints a one-line message once per distinct text (fallbacks say why they happen).
:func:`unhooked` says whether a path may call around modules (their own kernel, a written-out forward).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

MODES = ("auto", "reference")


@functools.cache
def triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


def mode() -> str:
    value = os.environ.get("LORAFORGE_KERNELS", "auto").strip().lower() or "auto"
    return value if value in MODES else "auto"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernel should handle these tensors (all on one device)."""
    if mode() == "reference" or not triton_importable():
        return False
    device = tensors[0].device if tensors else torch.device("cpu")
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


_SEEN: set[str] = set()


def notice(message: str) -> None:
    """Print ``message`` once per process (one line, to stderr)."""
    if message not in _SEEN:
        _SEEN.add(message)
        print(f"loraforge.kernels: {message}", file=sys.stderr)


def unhooked(*modules: torch.nn.Module) -> bool:
    """No forward hooks and no instance-patched ``forward`` on any of ``modules`` (what a path
    that calls around them needs)."""
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules)
