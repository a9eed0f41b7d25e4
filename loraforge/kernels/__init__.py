"""Fused kernels for LoRA / QLoRA training and 4-bit inference.

Each module holds a Triton kernel, its PyTorch reference and, where it trains, its autograd
Function; :mod:`~loraforge.kernels.dispatch` picks the kernel on CUDA (and under
``TRITON_INTERPRET=1`` on CPU) and the reference elsewhere (``LORAFORGE_KERNELS=reference``
forces it). Modules:

- ``dequant``: NF4 / FP4 dequantization (float32 or double-quantized scales);
  ``gemv4bit``: fused 4-bit dequant + matmul for 1..16 rows;
- ``rmsnorm``, ``rope``, ``swiglu``: the decoders' elementwise layers (RMSNorm in the Llama,
  Gemma and OLMo 2 conventions; RoPE, partial too; SwiGLU and GeGLU), forward and backward;
- ``lora_linear``, ``lora_attn``, ``lora_mlp``: fused LoRA / DoRA projections (QKV together, O)
  and the fused gated MLP with hand-written backward;
- ``arch_specs``: what differs per model type, as data (one ``ArchSpec`` each);
- ``cross_entropy``: chunked linear + cross-entropy that skips ignored labels;
- ``checkpoint``: per-decoder-layer activation checkpointing with optional CPU offload;
- ``patch``: ``apply_kernels(model)`` / ``remove_kernels(model)`` for the model types of
  ``arch_specs.SPECS`` (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, olmo2, granite).

Nothing here is imported by ``import loraforge``; triton is imported only by these modules.
"""

from loraforge.kernels.checkpoint import disable_checkpointing, enable_checkpointing
from loraforge.kernels.patch import apply_kernels, remove_kernels

__all__ = ["apply_kernels", "remove_kernels", "enable_checkpointing", "disable_checkpointing"]
