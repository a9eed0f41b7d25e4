"""How much memory a model's weights take, and how many bits each parameter costs.

For a 4-bit layer (QLoRA, Dettmers et al., 2023) with block size B the cost per weight is
4 + 32/B bits (fp32 absmax per block: 4.5 at B = 64), or with double quantization
4 + 8/B + 32/(256 B) bits (8-bit absmax, one fp32 scale per 256 blocks: 4.127 at B = 64).
An LLM.int8 layer (Dettmers et al., 2022) costs 8 + 32/in_features bits (int8 codes, one fp32
absmax per row: 8.056 for a 576-wide projection).
The figure reported here is the layer's own ``bits_per_parameter()``; every other tensor
(embeddings, norms, ``lm_head``, biases) counts its real storage, tied tensors once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn


@dataclass
class MemoryStats:
    quant_params: int = 0
    quant_bytes: float = 0.0
    other_params: int = 0
    other_bytes: int = 0
    other_dtypes: Counter = field(default_factory=Counter)  # dtype name -> parameters
    quant_kinds: Counter = field(default_factory=Counter)  # "nf4, block 64" -> parameters

    @property
    def params(self) -> int:
        return self.quant_params + self.other_params

    @property
    def bytes(self) -> float:
        return self.quant_bytes + self.other_bytes

    @property
    def quant_bits(self) -> float:
        return 8 * self.quant_bytes / self.quant_params if self.quant_params else 0.0


def memory_stats(model: nn.Module) -> MemoryStats:
    """Parameter counts and bytes of ``model``'s weights, split into quantized layers and the rest."""
    from loraforge.quant.int8_rowwise import Int8Linear
    from loraforge.quant.linear import QuantLinear

    stats = MemoryStats()
    seen: set[int] = set()
    quant_tensors: set[int] = set()
    for module in model.modules():
        if isinstance(module, (QuantLinear, Int8Linear)):
            n = module.in_features * module.out_features
            stats.quant_params += n
            stats.quant_bytes += n * module.bits_per_parameter() / 8
            if isinstance(module, Int8Linear):
                kind = f"{module.quant_type}, threshold {module.threshold:g}"
            else:
                kind = f"{module.quant_type}, block {module.blocksize}" + (", double quant" if module.double_quant else "")
            stats.quant_kinds[kind] += n
            quant_tensors.update(id(t) for t in module.parameters(recurse=False))
            quant_tensors.update(id(t) for t in module.buffers(recurse=False))
            if module.bias is not None:
                quant_tensors.discard(id(module.bias))
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in quant_tensors or tensor.is_meta:
            continue
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        if not tensor.is_floating_point():
            continue
        stats.other_params += tensor.numel()
        stats.other_bytes += tensor.numel() * tensor.element_size()
        stats.other_dtypes[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
    return stats


def describe_memory(model: nn.Module) -> str:
    """One line: parameters, bytes and bits per parameter, overall and of the 4-bit (or 8-bit) layers, e.g.
    ``134.5M parameters in 168.2 MB (10.00 bits/param): 106.2M in 4-bit layers at 4.127
    bits/param (nf4, block 64, double quant), 28.3M others in float32``."""
    s = memory_stats(model)
    text = f"{_count(s.params)} parameters in {_size(s.bytes)} ({8 * s.bytes / max(s.params, 1):.2f} bits/param"
    dtypes = "/".join(s.other_dtypes) or "-"
    if not s.quant_params:
        return f"{text}, {dtypes})"
    kinds = "; ".join(s.quant_kinds)
    bits = "8-bit" if all(k.startswith("llm_int8") for k in s.quant_kinds) else "4-bit"
    return (
        f"{text}): {_count(s.quant_params)} in {bits} layers at {s.quant_bits:.3f} bits/param ({kinds}), "
        f"{_count(s.other_params)} others in {dtypes}"
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"
