"""GPT-2's ``Conv1D`` projections as linear layers, so that adapters, 4-bit quantization and
merging see one kind of layer.

transformers' ``Conv1D`` computes ``y = x W + b`` with ``W`` stored ``[in, out]`` (the transpose
of ``nn.Linear``'s ``[out, in]``). :class:`Conv1DLinear` is an ``nn.Linear`` holding ``W^T`` that
reads and writes its state dict in Conv1D's ``[in, out]`` layout, so ``save_pretrained`` and
checkpoints keep the Hugging Face format. The adapter tensors do not depend on the layout
(``lora_A`` is ``[r, in]``, ``lora_B`` ``[out, r]``, as PEFT stores them for Conv1D with
``fan_in_fan_out = true``); ``fan_in_fan_out`` marks the layer so that saved adapter configs say
what PEFT writes for these modules.
"""

from __future__ import annotations

import torch
from torch import nn


class Conv1DLinear(nn.Linear):
    """``nn.Linear`` computing what a transformers ``Conv1D`` computes; state dict in Conv1D layout."""

    fan_in_fan_out = True

    @classmethod
    @torch.no_grad()
    def from_conv1d(cls, conv: nn.Module) -> Conv1DLinear:
        n_in, n_out = conv.weight.shape
        layer = cls(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        layer.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
        layer.weight.requires_grad_(conv.weight.requires_grad)
        return layer

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = destination[prefix + "weight"]
        destination[prefix + "weight"] = weight.t() if keep_vars else weight.t().contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:  # always Conv1D's [in, out] (square c_proj weights look alike)
            state_dict[key] = state_dict[key].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def linearize_conv1d(model: nn.Module) -> nn.Module:
    """Replace every transformers ``Conv1D`` in ``model`` by an equivalent :class:`Conv1DLinear`."""
    from transformers.pytorch_utils import Conv1D

    for key, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            parent, _, child = key.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Conv1DLinear.from_conv1d(module))
    return model
