"""The optimizer named by ``train.optimizer``.

``adamw`` is PyTorch's AdamW (decoupled weight decay, Loshchilov & Hutter); ``adamw8bit``,
``paged_adamw`` and ``paged_adamw8bit`` are QLoRA's memory-saving variants from
:mod:`loraforge.optim` (``build_optimizer(name, params, lr, weight_decay)``). Where that package
is not importable only ``adamw`` exists, and asking for another name is a UserError, never a silent
fall-back to 32-bit AdamW. Names are checked when the config loads, before anything else.
"""

from __future__ import annotations

import torch

from loraforge.errors import check_choice


def _optim():
    try:
        import loraforge.optim as optim
    except ImportError:
        return None
    return optim if hasattr(optim, "build_optimizer") else None


def available_optimizers() -> tuple[str, ...]:
    optim = _optim()
    return tuple(optim.OPTIMIZERS) if optim is not None else ("adamw",)


def check_optimizer(name: str, where: str | None = None) -> str:
    return check_choice(name, available_optimizers(), "optimizer", where=where)


def build_optimizer(name: str, params, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    check_optimizer(name, "train.optimizer")
    optim = _optim()
    if optim is None:
        return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    return optim.build_optimizer(name, params, lr, weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """State bytes; before the first step, what the first step will allocate."""
    optim = _optim()
    if optim is not None:
        return optim.optimizer_state_bytes(optimizer)
    return sum(2 * p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"] if p.requires_grad)
