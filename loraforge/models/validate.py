"""Cheap checks of model files before anything heavy reads them, so that a truncated download or
an unsupported model gives one clear UserError naming the file instead of a deep traceback.

- safetensors: 8-byte little-endian header length N, N bytes of JSON mapping each tensor to
  ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data that follows; the file
  must hold all ``max(end)`` bytes of tensor data.
- GGUF: the magic ``b"GGUF"``, then a header, metadata and tensor infos that ``gguf.GGUFReader``
  parses and maps onto the file (it fails when tensor data is missing).
- Architecture: decoder-only models whose projections are ``nn.Linear`` (so loraforge's
  QuantLinear and adapters can replace and wrap them); each listed type is covered by a test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from loraforge.errors import UserError, did_you_mean

# transformers model_type values tested end to end (load, quantize, bitsandbytes interop).
SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "granite",
    "olmo2",
)
# GGUF general.architecture -> transformers model_type, where they differ.
_GGUF_TO_MODEL_TYPE = {"gemma3": "gemma3_text"}

_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def check_architecture(model_type: str, where: str) -> str:
    """``model_type`` if loraforge supports it, else a UserError listing what it supports."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {model_type!r}{did_you_mean(model_type, SUPPORTED_ARCHITECTURES)}; "
            f"loraforge supports decoder-only models of type: {', '.join(SUPPORTED_ARCHITECTURES)}",
            where=where,
        )
    return model_type


def check_safetensors(path: Path) -> dict:
    """The parsed header of a complete safetensors file; UserError if truncated or corrupt."""
    expected = "expected a complete .safetensors file (re-save or re-download it)"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"truncated safetensors file ({size} bytes, no header); {expected}", where=str(path))
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise UserError(
                f"truncated or corrupt safetensors file: the header claims {n:,} bytes but the file "
                f"has {size:,}; {expected}",
                where=str(path),
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"corrupt safetensors file: its header is not JSON; {expected}", where=str(path)) from None
    if not isinstance(header, dict):
        raise UserError(f"corrupt safetensors file: its header is not a JSON object; {expected}", where=str(path))
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= d
            ok = end - begin == numel * _DTYPE_SIZES.get(info["dtype"], end - begin) and begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"corrupt safetensors file: bad entry for tensor {name!r}; {expected}", where=str(path))
        data_end = max(data_end, end)
    have = size - 8 - n
    if data_end > have:
        raise UserError(
            f"truncated safetensors file: the header describes {data_end:,} bytes of tensor data but only "
            f"{have:,} follow; {expected}",
            where=str(path),
        )
    return header


def load_safetensors(path: Path) -> dict:
    """Every tensor of a safetensors file, after :func:`check_safetensors`; what safetensors
    itself still refuses (a bad dtype, an unreadable file) is a UserError naming the file too."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        check_safetensors(path)
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read this safetensors file ({err}); expected a complete .safetensors file "
                        "(re-save or re-download it)", where=str(path)) from None


def check_gguf(path: Path) -> str:
    """The transformers model_type of a complete, supported GGUF file; UserError otherwise."""
    expected = "expected a complete GGUF file (llama.cpp format)"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"not a GGUF file (it does not start with the bytes 'GGUF'); {expected}", where=str(path))
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises ValueError/IndexError/struct.error on bad data
        raise UserError(f"truncated or corrupt GGUF file ({err}); {expected}", where=str(path)) from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UserError(f"the GGUF metadata has no 'general.architecture'; {expected}", where=str(path))
    arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    readable = gguf_architectures()
    if arch not in readable:
        raise UserError(
            f"unsupported GGUF architecture {arch!r}{did_you_mean(arch, readable)}; "
            f"loraforge reads GGUF files of: {', '.join(readable)}",
            where=str(path),
        )
    return _GGUF_TO_MODEL_TYPE.get(arch, arch)


def gguf_architectures() -> list[str]:
    """GGUF ``general.architecture`` values transformers converts and loraforge supports."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if _GGUF_TO_MODEL_TYPE.get(a, a) in SUPPORTED_ARCHITECTURES]
