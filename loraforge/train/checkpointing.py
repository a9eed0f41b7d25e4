"""``train.gradient_checkpointing: auto``: recompute activations only when keeping them would not fit.

Gradient checkpointing (Chen et al. 2016, arXiv:1604.06174) keeps only each decoder layer's input
and recomputes the layer in backward: about one extra forward per step (~6 instead of ~4 x params x
tokens FLOPs for LoRA on a frozen base) bought with memory. Where memory is ample -- most CPU
runs -- it only slows training, so ``auto`` turns it on only when the activations of one
micro-batch, estimated as below, would take more than :data:`FREE_FRACTION` of the memory still
free on the device after the model is loaded (the rest is headroom for gradients, the optimizer
step, the allocator and the loss).

Estimate (after Korthikanti et al. 2022, arXiv:2205.05198, sec. 4.1, for a Llama-family block
with SwiGLU MLP and grouped-query attention through SDPA, i.e. no ``s x s`` score matrix kept):
per token and decoder layer the tensors autograd saves are about ``7 h + 3 kv + 4 i`` values of
the compute dtype (``h`` hidden size, ``kv`` the key/value width, ``i`` the MLP width): the two
norms' inputs and outputs (4 h; the normed input is also the projections' input), q and k before
and after RoPE (2 h + 2 kv), v (kv), the attention output (h, also o_proj's input), gate and up
outputs, the activation and the down projection's input (4 i); plus, for the whole model, the
float32 logits and their gradient (``2 x vocab`` values per token). Adapters add ``r`` values per
adapted projection (and a dropout mask where dropout is on): small beside these. On a tiny Llama
this is 1.5x what autograd really keeps (tests/test_train_checkpointing.py): a cautious figure.
Without a transformers config of that shape the block is taken as ``34 h`` values per token (the
paper's figure without attention scores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

FREE_FRACTION = 0.5


@dataclass
class CheckpointingDecision:
    on: bool
    reason: str

    def describe(self) -> str:
        return f"{'on' if self.on else 'off'}   ({self.reason})"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def activation_bytes(model_config, tokens: int, dtype_bytes: int) -> int:
    """Estimated bytes autograd keeps for one micro-batch of ``tokens`` tokens without checkpointing."""
    h = int(getattr(model_config, "hidden_size", 0) or 0)
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    if not h or not layers:
        return 0
    heads = int(getattr(model_config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(model_config, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(model_config, "head_dim", 0) or (h // heads if heads else 0))
    inter = int(getattr(model_config, "intermediate_size", 0) or 0)
    per_layer = 7 * h + 3 * kv_heads * head_dim + 4 * inter if head_dim and inter else 34 * h
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    return tokens * (layers * per_layer * dtype_bytes + 2 * vocab * 4)


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory still available on ``device`` (CUDA: the driver's free figure; CPU: the system's
    available memory), or ``None`` when it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def decide_checkpointing(setting: bool | str, model_config, device: torch.device, tokens: int,
                         dtype_bytes: int, free: int | None = None) -> CheckpointingDecision:
    """The decision for ``train.gradient_checkpointing`` (true, false or "auto") and its reason."""
    if setting is True or setting is False:
        return CheckpointingDecision(setting, f"train.gradient_checkpointing: {str(setting).lower()}")
    need = activation_bytes(model_config, tokens, dtype_bytes)
    free = free_memory_bytes(device) if free is None else free
    if not need or free is None:
        return CheckpointingDecision(True, "auto: activation memory unknown, so on")
    fits = need <= FREE_FRACTION * free
    verdict = "fit" if fits else "would not fit"
    return CheckpointingDecision(not fits, f"auto: ~{_gib(need)} of activations per micro-batch {verdict} in "
                                           f"{_gib(free)} free")
