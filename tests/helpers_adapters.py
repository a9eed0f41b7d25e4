"""Shared pieces of the adapter tests: tiny models, a 4-bit base, non-zero adapters, and the
mapping from PEFT's parameter names to the on-disk keys."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_llama_config  # noqa: E402

NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


class StandInQuantLinear(nn.Module):
    """NF4 blockwise linear with QuantLinear's interface, used while loraforge.quant.linear is
    not available (the adapter code only needs in/out_features, bias, dequantize, forward)."""

    def __init__(self, codes, absmax, shape, bias, blocksize, compute_dtype):
        super().__init__()
        self.out_features, self.in_features = shape
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.quant_type, self.blocksize, self.compute_dtype, self.double_quant = "nf4", blocksize, compute_dtype, False

    @classmethod
    def from_linear(cls, linear, quant_type="nf4", blocksize=64, double_quant=False, compute_dtype=None):
        w = linear.weight.detach().float().reshape(-1, blocksize)
        absmax = w.abs().amax(1)
        codes = ((w / absmax[:, None]).unsqueeze(-1) - NF4).abs().argmin(-1).to(torch.uint8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(codes, absmax, tuple(linear.weight.shape), bias, blocksize, compute_dtype)

    def dequantize(self, dtype=None):
        w = NF4.to(self.absmax.device)[self.codes.long()] * self.absmax[:, None]
        return w.reshape(self.out_features, self.in_features).to(dtype or self.compute_dtype or torch.float32)

    def forward(self, x):
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def quantize_nf4(model: nn.Module) -> nn.Module:
    """Every linear layer but lm_head as a 4-bit NF4 layer (loraforge's when it exists)."""
    try:
        from loraforge.quant.replace import quantize_model
    except ImportError:
        quantize_model = None
    if quantize_model is not None:
        return quantize_model(model, quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=torch.float32)
    for key, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not key.endswith("lm_head"):
            parent, _, child = key.rpartition(".")
            setattr(model.get_submodule(parent), child, StandInQuantLinear.from_linear(module))
    return model


def tiny_model(seed: int = 0, **overrides) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def dense_copy(model: nn.Module, seed: int = 0, **overrides) -> nn.Module:
    """A plain model holding ``model``'s (dequantized) weights: what PEFT runs on."""
    ref = tiny_model(seed, **overrides)
    with torch.no_grad():
        for key, module in ref.named_modules():
            if isinstance(module, nn.Linear):
                source = model.get_submodule(key)
                module.weight.copy_(source.weight if isinstance(source, nn.Linear) else source.dequantize(torch.float32))
    return ref


def randomize(params, seed: int = 1, scale: float = 0.1) -> None:
    """Add seeded noise to adapter parameters (so that B != 0 and the adapter matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def peft_key(name: str) -> str:
    """PEFT's in-memory parameter name -> its on-disk key."""
    name = name.replace(".default", "")
    return name.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")
