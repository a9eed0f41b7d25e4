"""Shared pieces of the adapter tests: tiny models, a 4-bit base (loraforge's QuantLinear),
non-zero adapters, and the mapping from PEFT's parameter names to the on-disk keys."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_llama_config  # noqa: E402


def quantize_nf4(model: nn.Module) -> nn.Module:
    """Every linear layer but lm_head as loraforge's 4-bit NF4 QuantLinear (double quant, fp32 compute)."""
    from loraforge.quant.replace import quantize_model

    return quantize_model(model, quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=torch.float32)


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
