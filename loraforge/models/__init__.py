"""Loading models (HF folder, GGUF via a safetensors cache, bitsandbytes 4-bit / 8-bit folder, aliases)
and writing bitsandbytes-format 4-bit and 8-bit checkpoints. See load.py for the overview.

Names are imported on first use, so that ``loraforge --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_model": "loraforge.models.load",
    "load_tokenizer_for": "loraforge.models.load",
    "QUANT_TYPES": "loraforge.models.load",
    "load_bnb_checkpoint": "loraforge.models.bnb_checkpoint",
    "save_quantized": "loraforge.models.bnb_checkpoint",
    "describe_memory": "loraforge.models.memory",
    "memory_stats": "loraforge.models.memory",
    "estimated_memory_stats": "loraforge.models.memory",
    "estimate_base_memory": "loraforge.models.memory",
    "resolve_model_path": "loraforge.models.resolve",
    "detect_format": "loraforge.models.resolve",
    "ALIASES": "loraforge.models.resolve",
    "DEFAULT_MODEL": "loraforge.models.resolve",
    "SUPPORTED_ARCHITECTURES": "loraforge.models.validate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loraforge.models' has no attribute {name!r}")
