"""Swap a model's ``nn.Linear`` layers for frozen :class:`QuantLinear` ones (QLoRA's 4-bit base),
or, with ``quant_type="llm_int8"``, for :class:`~loraforge.quant.int8_rowwise.Int8Linear` ones
(LLM.int8's 8-bit base; ``blocksize`` and ``double_quant`` do not apply to it).

Layers are replaced one at a time, in place: each full-precision weight is quantized and released
before the next, so peak memory stays at the model plus one layer's temporaries.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loraforge.quant.blockwise import check_blocksize
from loraforge.quant.codebooks import quant_type as parse_quant_type
from loraforge.quant.int8_rowwise import DEFAULT_THRESHOLD, INT8_TYPE, Int8Linear, check_threshold
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
    threshold: float = DEFAULT_THRESHOLD,
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (except those named in ``skip``) by a QuantLinear
    (an Int8Linear with outlier ``threshold`` for ``llm_int8``)."""
    if quant_type == INT8_TYPE:
        check_threshold(threshold)

        def quantize(linear: nn.Linear) -> nn.Module:
            return Int8Linear.from_linear(linear, threshold)
    else:
        parse_quant_type(quant_type)
        check_blocksize(blocksize)

        def quantize(linear: nn.Linear) -> nn.Module:
            return QuantLinear.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype)
    skip = tuple(skip)
    targets = [
        name for name, module in model.named_modules()
        if type(module) is nn.Linear and not _skipped(name, skip)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, quantize(linear))
        linear.weight = None  # drop the full-precision copy now, not at the end
    return model


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters left unquantized (embeddings, norms, the head) to
    ``dtype``; the 4-bit / 8-bit layers' codes and scales, and buffers such as rotary
    frequencies, keep theirs (so the codes do not depend on the compute dtype)."""
    for module in model.modules():
        if isinstance(module, (QuantLinear, Int8Linear)):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model
