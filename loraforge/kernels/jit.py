"""Triton kernels that are built on first launch, not at import.

``triton.jit`` decides at decoration time whether a function is compiled or run by Triton's
interpreter (``TRITON_INTERPRET=1``). Building at first launch instead lets one process import
``loraforge.kernels`` before the environment variable is set (the tests set it per test) and keeps
``import loraforge`` free of triton. :class:`Kernel` holds the plain Python function and builds
``triton.jit`` -- wrapped in ``triton.autotune`` over ``configs`` when compiled -- once per mode.
The interpreter takes ``configs[0]``'s meta-parameters (timing configs there means nothing).

One more interpreter detail: triton's own library functions (``tl.sum``, ``tl.max``, ``tl.zeros``,
``tl.sigmoid``, ``tl.cdiv``, ...) are themselves ``triton.jit`` functions, created when
``triton.language`` is imported; the interpreter can only call those created in interpret mode.
When triton was imported for compilation first (bitsandbytes imports it), an interpreted launch
substitutes interpreted twins for them for the duration of the launch and puts the originals
back afterwards (:func:`_interpretable_triton_library`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from loraforge.kernels.dispatch import interpreting

_TWINS: dict[int, Any] = {}
_COMPILE_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")  # launch options the interpreter refuses


@contextlib.contextmanager
def _interpretable_triton_library():
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    swapped = []
    for owner in (tl, tl.standard, tl.math, tl.core, tl.tensor):
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction):
                twin = _TWINS.setdefault(id(value), InterpretedFunction(value.fn))
                swapped.append((owner, name, value))
                setattr(owner, name, twin)
    try:
        yield
    finally:
        for owner, name, value in swapped:
            setattr(owner, name, value)


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
                triton.Config({k: v for k, v in c.items() if k not in _COMPILE_OPTIONS},
                              num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 2))
                for c in self.configs
            ]
            jitted = triton.autotune(configs=configs, key=self.key)(jitted)
        return jitted

    def __getitem__(self, grid):
        interp = interpreting()
        if interp not in self._built:
            self._built[interp] = self._build(interp)
        launch = self._built[interp][grid]
        if not interp:
            return launch
        first = {k: v for k, v in self.configs[0].items() if k not in _COMPILE_OPTIONS} if self.configs else {}

        def run(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in _COMPILE_OPTIONS}
            with _interpretable_triton_library():
                return launch(*args, **first, **kwargs)

        return run


def kernel(configs: list[dict[str, Any]] | None = None, key: list[str] | None = None):
    """Decorator: ``@kernel(configs=[{"BLOCK": 1024, "num_warps": 4}, ...], key=["n"])``."""
    return lambda fn: Kernel(fn, configs, key)
