"""Swap a model's ``nn.Linear`` layers for frozen :class:`QuantLinear` ones (QLoRA's 4-bit base).

Layers are replaced one at a time, in place: each full-precision weight is quantized and released
before the next, so peak memory stays at the model plus one layer's temporaries.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loraforge.quant.blockwise import check_blocksize
from loraforge.quant.codebooks import quant_type as parse_quant_type
from loraforge.quant.linear import QuantLinear


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """``skip`` entries match a full module name or its trailing dotted part ("lm_head", "mlp.down_proj")."""
    return any(name == s or name.endswith("." + s) for s in skip)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip: Iterable[str] = ("lm_head",),
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (except those named in ``skip``) by a QuantLinear."""
    parse_quant_type(quant_type)
    check_blocksize(blocksize)
    skip = tuple(skip)
    targets = [
        name for name, module in model.named_modules()
        if type(module) is nn.Linear and not _skipped(name, skip)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, QuantLinear.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype))
        linear.weight = None  # drop the full-precision copy now, not at the end
    return model
