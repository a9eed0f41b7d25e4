"""Optimizer state-dict plumbing shared by the 8-bit and paged optimizers.

torch's ``Optimizer.load_state_dict`` casts every state tensor of a floating-point parameter to
the parameter's dtype and device. That is wrong for 8-bit codes and fp32 absmax, and for paged
states it would put every moment on the GPU at once; these helpers let the optimizers take such
tensors out of torch's hands and place them themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


def flat_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in state-dict order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def flat_ids(state_dict: dict) -> list[Hashable]:
    """The saved parameter ids in the same order as :func:`flat_params`."""
    return [i for group in state_dict["param_groups"] for i in group["params"]]


def split_state_tensors(state_dict: dict, take: Callable[[Hashable], bool]) -> tuple[dict, dict]:
    """Split ``state_dict["state"]`` into ``({id: {key: tensor}}, rest)``.

    For every id with ``take(id)`` the tensors other than ``step`` go to the first dict; all else
    (step counters, other parameters' states) stays in ``rest`` for torch to load.
    """
    taken, rest = {}, {}
    for pid, state in state_dict["state"].items():
        if not take(pid):
            rest[pid] = state
            continue
        taken[pid] = {k: v for k, v in state.items() if k != "step" and torch.is_tensor(v)}
        rest[pid] = {k: v for k, v in state.items() if k not in taken[pid]}
    return taken, rest


def pinned_copy(value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of ``value`` in pinned host memory (cast to ``dtype`` if given)."""
    host = torch.empty(value.shape, dtype=dtype or value.dtype, pin_memory=True)
    return host.copy_(value)
