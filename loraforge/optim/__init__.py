"""Optimizers: torch AdamW, 8-bit AdamW (bitsandbytes-compatible) and their paged variants.

``train.optimizer`` picks one by name through :func:`build_optimizer`:

=================  ===============================================  ======================
name               what                                             state bytes / param
=================  ===============================================  ======================
adamw              ``torch.optim.AdamW`` (fused kernel on CUDA)     8 (fp32 params)
adamw8bit          :class:`AdamW8bit`, blockwise 8-bit moments      ~2.03
paged_adamw        :class:`PagedAdamW`, states in pinned host mem   8, off the GPU
paged_adamw8bit    :class:`PagedAdamW8bit`                          ~2.03, off the GPU
=================  ===============================================  ======================
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from loraforge.errors import check_choice
from loraforge.optim.adamw8bit import AdamW8bit
from loraforge.optim.paged import PagedAdamW, PagedAdamW8bit

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")

__all__ = ["OPTIMIZERS", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "build_optimizer", "optimizer_state_bytes"]


def build_optimizer(
    name: str,
    params: Iterable,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer called ``name`` over ``params`` (tensors or param-group dicts).

    Unknown names raise a UserError (key ``train.optimizer``) with a did-you-mean.
    """
    check_choice(name, OPTIMIZERS, "optimizer", where="train.optimizer")
    params = list(params)
    args = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name in ("adamw", "paged_adamw"):
        fused = _all_on_cuda(params)
        cls = torch.optim.AdamW if name == "adamw" else PagedAdamW
        return cls(params, **args, fused=fused or None)
    cls = AdamW8bit if name == "adamw8bit" else PagedAdamW8bit
    return cls(params, **args)


def _all_on_cuda(params: list) -> bool:
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    return bool(tensors) and all(t.is_cuda and t.is_floating_point() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state for ``optimizer``'s trainable parameters (host and device).

    States are created lazily at the first step; for a parameter without state yet this counts
    what its first step will allocate (our optimizers know it; torch Adam/AdamW keep two moments
    of the parameter's dtype), so the trainer's start banner shows the real figure. Tensors
    shared between parameters (bitsandbytes' code books) count once.
    """
    seen: set[int] = set()
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                for value in state.values():
                    if hasattr(value, "to_local"):  # a DTensor (FSDP): this rank's shard
                        value = value.to_local()
                    if torch.is_tensor(value) and value.data_ptr() not in seen:
                        seen.add(value.data_ptr())
                        total += value.numel() * value.element_size()
            elif p.requires_grad:
                total += _projected_bytes(optimizer, p, group)
    return total


def _projected_bytes(optimizer: torch.optim.Optimizer, p: torch.Tensor, group: dict) -> int:
    if isinstance(optimizer, AdamW8bit):
        return optimizer.state_bytes(p)
    if isinstance(optimizer, torch.optim.Adam):  # AdamW and PagedAdamW too
        moments = 3 if group.get("amsgrad") else 2
        local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor (FSDP): this rank's shard
        return moments * local.numel() * local.element_size() + 4
    return 0
