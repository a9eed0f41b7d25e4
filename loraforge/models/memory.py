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
            stats.quant_kinds[_kind(module.quant_type, getattr(module, "blocksize", None),
                                    getattr(module, "double_quant", None), getattr(module, "threshold", None))] += n
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


def _kind(quant_type: str, blocksize, double_quant, threshold) -> str:
    if quant_type == "llm_int8":
        return f"llm_int8, threshold {6.0 if threshold is None else threshold:g}"
    return f"{quant_type}, block {blocksize}" + (", double quant" if double_quant else "")


def describe_memory(model: nn.Module) -> str:
    """One line: parameters, bytes and bits per parameter, overall and of the 4-bit (or 8-bit) layers, e.g.
    ``134.5M parameters in 168.2 MB (10.00 bits/param): 106.2M in 4-bit layers at 4.127
    bits/param (nf4, block 64, double quant), 28.3M others in float32``."""
    return describe_stats(memory_stats(model))


def describe_stats(s: MemoryStats) -> str:
    """:func:`describe_memory`'s line for computed or estimated statistics."""
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


def quantized_bits(in_features: int, out_features: int, quant_type: str, blocksize: int = 64,
                   double_quant: bool = True) -> float:
    """Stored bits per weight of a quantized ``out x in`` linear layer, as the layer's own
    ``bits_per_parameter()`` gives it (llm_int8: codes + one fp32 scale per row; blockwise types:
    packed codes + per-block absmax, double-quantized: 8-bit absmax + fp32 scale per 256 blocks
    + the offset)."""
    import math

    from loraforge.quant.codebooks import quant_type as parse_quant_type
    from loraforge.quant.int8_rowwise import INT8_TYPE

    if quant_type == INT8_TYPE:
        return 8 + 32 / in_features
    n = in_features * out_features
    nblocks = math.ceil(n / blocksize)
    scales = nblocks + 4 * math.ceil(nblocks / 256) + 4 if double_quant else 4 * nblocks
    return 8 * (math.ceil(n * parse_quant_type(quant_type).storage_bits / 8) + scales) / n


def estimated_memory_stats(model_config, dtype, quantization: dict | None = None) -> MemoryStats:
    """What :func:`memory_stats` reports once the model of ``model_config`` is loaded in ``dtype``
    and quantized as ``load_model(quantize=..., blocksize=..., double_quant=...)`` does, from
    shapes alone: a meta-device skeleton, no weights read. ``quantization``: ``{type, blocksize,
    double_quant}`` or None."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.models.quiet import quiet_transformers
    from loraforge.quant.replace import _skipped

    with torch.device("meta"), quiet_transformers():
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    stats = MemoryStats()
    quantized: set[int] = set()
    if quantization is not None:
        q = quantization
        for name, module in model.named_modules():
            if type(module) is not nn.Linear or _skipped(name, ("lm_head",)):
                continue
            n = module.in_features * module.out_features
            stats.quant_params += n
            stats.quant_bytes += n * quantized_bits(module.in_features, module.out_features, q["type"],
                                                    q.get("blocksize", 64), q.get("double_quant", True)) / 8
            stats.quant_kinds[_kind(q["type"], q.get("blocksize", 64), q.get("double_quant", True),
                                    q.get("llm_int8_threshold"))] += n
            quantized.add(id(module.weight))
    seen: set[int] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in quantized or id(tensor) in seen or not tensor.is_floating_point():
            continue
        seen.add(id(tensor))  # tied weights are one Parameter
        stats.other_params += tensor.numel()
        stats.other_bytes += tensor.numel() * tensor.element_size()
        stats.other_dtypes[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
    return stats


def estimate_base_memory(source, quantization: dict | None, dtype=None) -> str:
    """One line for ``train --dry-run``: the base's weight memory once loaded in ``dtype`` (None:
    the checkpoint's) and quantized per ``quantization``, from its config alone
    (:func:`estimated_memory_stats`); a checkpoint that is already quantized loads as stored, so
    its files' size is the figure; a GGUF file not yet converted has no config to read (its
    metadata would take a full parse)."""
    import torch
    from transformers import AutoConfig

    from loraforge.models.load import as_dtype
    from loraforge.models.quiet import quiet_transformers
    from loraforge.models.resolve import detect_format, resolve_model_path

    path = resolve_model_path(source)
    fmt = detect_format(path)
    if fmt in ("bnb-4bit", "bnb-8bit", "kbit"):
        stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return f"{_size(stored)} of {fmt} weights, loaded as stored"
    folder = path
    if fmt == "gguf":
        from loraforge.models.gguf import gguf_cache_entry

        folder, dtype = gguf_cache_entry(path), dtype or torch.float32
        if not (folder / "config.json").is_file():
            return "not estimated (the GGUF file is converted on the first load; its config is read then)"
    with quiet_transformers():
        model_config = AutoConfig.from_pretrained(folder)
    if dtype is None:
        stored = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
        dtype = as_dtype(str(stored).removeprefix("torch.")) if stored is not None else torch.float32
    return describe_stats(estimated_memory_stats(model_config, dtype, quantization))
