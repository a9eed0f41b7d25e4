"""Fused LoRA attention projections: Q, K, V together, and O (see :mod:`lora_linear` for the
formulas). Q, K and V read the same normed hidden state, so their LoRA-A matrices run as one
``[T, r_q + r_k + r_v]`` product, and their backward sums into one ``dx``; only ``x`` and that
product are saved. :class:`LoRAProjectionsFunction` serves any number of projections of one
input (three for QKV, one for O). :func:`fused_attention_forward` is a Llama-family attention
forward (transformers' ``LlamaAttention.forward``) on these, with the Triton RoPE.
"""

from __future__ import annotations

import sys

import torch

from loraforge.kernels.lora_linear import (
    LoraSpec,
    autocast_off,
    compute_dtype,
    lora_spec,
    lora_tensors,
    project,
    project_backward,
)
from loraforge.kernels.rope import apply_rope


class LoRAProjectionsFunction(torch.autograd.Function):
    """``(y_1, ..., y_n) = f(x)``, ``y_i = x W_i^T + s_i (x A_i^T) B_i^T``; gradients for ``x``
    and every ``A_i``, ``B_i`` (passed after ``specs`` in :func:`lora_tensors` order)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, specs: list[LoraSpec], *params: torch.Tensor):
        with autocast_off(x):
            x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))
            outs, xa = project(x2, specs)
        ctx.save_for_backward(x2, xa)
        ctx.specs, ctx.shape, ctx.in_dtype = specs, x.shape, x.dtype
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)

    @staticmethod
    def backward(ctx, *dys):
        x2, xa = ctx.saved_tensors
        dys = [None if d is None else d.reshape(-1, d.shape[-1]).to(x2.dtype) for d in dys]
        dx, grads = project_backward(dys, x2, xa, ctx.specs, need_dx=ctx.needs_input_grad[0])
        return (None if dx is None else dx.view(ctx.shape).to(ctx.in_dtype)), None, *grads


def fused_projections(x: torch.Tensor, specs: list[LoraSpec]) -> tuple[torch.Tensor, ...]:
    return LoRAProjectionsFunction.apply(x, specs, *lora_tensors(specs))


def attention_specs(attn) -> tuple[tuple[list[LoraSpec], LoraSpec] | None, str]:
    """``((qkv specs, o spec), "")`` for a Llama-family attention module, or ``(None, reason)``."""
    specs = []
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        module = getattr(attn, name, None)
        if module is None:
            return None, f"attention has no {name}"
        spec, why = lora_spec(module)
        if spec is None:
            return None, f"{name}: {why}"
        specs.append(spec)
    return (specs[:3], specs[3]), ""


def fused_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """transformers' ``LlamaAttention.forward`` with fused QKV / O LoRA projections and RoPE."""
    module = sys.modules[type(self).__module__]
    specs, _ = attention_specs(self)
    if specs is None:  # the adapters changed since patching (e.g. merged): the module's own path
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    qkv, o = specs
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = fused_projections(hidden_states, qkv)
    q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    q, k = apply_rope(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    interface = module.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                             module.eager_attention_forward)
    extra = {}
    if self.config.model_type == "mistral":  # as transformers' Mistral / Qwen2 attention pass it
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif self.config.model_type == "qwen2":
        extra["sliding_window"] = getattr(self, "sliding_window", None)
    out, weights = interface(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **extra, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    (out,) = fused_projections(out, [o])
    return out, weights
