"""Triton kernels that are compiled on first launch, not at import.

``triton.jit`` decides at decoration time whether a function runs compiled or in the interpreter
(``TRITON_INTERPRET=1``). Decorating at first launch instead lets one process import
``loraforge.kernels`` before the environment is set (CI sets it per test), and keeps
``import loraforge`` free of triton. :class:`Kernel` holds the plain Python function and builds
``triton.jit`` (wrapped in ``triton.autotune`` over ``configs`` when compiled; the interpreter
takes ``configs[0]``'s meta-parameters, since timing configs there is meaningless) once per mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loraforge.kernels.dispatch import interpreting


class Kernel:
    def __init__(self, fn: Callable, configs: list[dict[str, Any]] | None = None, key: list[str] | None = None):
        self.fn = fn
        self.configs = configs or []
        self.key = key or []
        self._built: dict[bool, Any] = {}

    def _build(self, interp: bool):
        import triton

        jitted = triton.jit(self.fn)
        if self.configs and not interp:
            configs = [
                triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                              num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 2))
                for c in self.configs
            ]
            jitted = triton.autotune(configs=configs, key=self.key)(jitted)
        return jitted

    def __getitem__(self, grid):
        interp = interpreting()
        if interp not in self._built:
            self._built[interp] = self._build(interp)
        kernel = self._built[interp][grid]
        if self.configs and interp:
            first = {k: v for k, v in self.configs[0].items() if k not in ("num_warps", "num_stages")}
            return lambda *args, **kwargs: kernel(*args, **first, **kwargs)
        return kernel


def kernel(configs: list[dict[str, Any]] | None = None, key: list[str] | None = None):
    """Decorator: ``@kernel(configs=[{"BLOCK": 1024, "num_warps": 4}, ...], key=["n"])``."""
    return lambda fn: Kernel(fn, configs, key)
