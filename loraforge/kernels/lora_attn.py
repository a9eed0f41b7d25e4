"""Fused LoRA (or DoRA) attention projections: Q, K, V together, and O (see :mod:`lora_linear`
for the formulas). Q, K and V read the same normed hidden state, so their LoRA-A matrices run as
one ``[T, r_q + r_k + r_v]`` product, and their backward sums into one ``dx``; only ``x`` and that
product are saved (plus ``z`` per DoRA projection). :class:`LoRAProjectionsFunction` serves any
number of projections of one input (three for Q/K/V, one for Phi-3's fused ``qkv_proj`` or O).

:func:`fused_attention_forward` is transformers' decoder attention forward (``LlamaAttention``
and the variants listed in :mod:`arch_specs`) on these projections with the Triton RoPE:
project, split Phi-3's ``[q | k | v]``, q/k RMSNorm (over all heads for OLMo 2, per head for
Qwen3 / Gemma 3), RoPE, cache update, the configured attention function (with the layer's
sliding window and Gemma 2's soft-capping as the model passes them), O projection. The attention
scores themselves run in transformers' attention function (eager / SDPA / flash), unchanged --
except that on a CPU bfloat16 queries, keys and values go in as float32 (and the output comes back
in bfloat16): PyTorch's CPU flash attention takes twice as long in bfloat16 as in float32 for
forward plus backward (23.6 against 11.1 ms at SmolLM2's [4, 9, 128, 64], one thread, with the
casts), so float32 there is both faster and exact to more bits.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext as _no_change

import torch

from loraforge.kernels.arch_specs import ArchSpec, spec_for
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
    """``(y_1, ..., y_n) = f(x)``, ``y_i = c_i (x W_i^T + s_i (x A_i^T) B_i^T) + b_i``; gradients
    for ``x`` and every trained tensor (passed after ``specs`` in :func:`lora_tensors` order)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, specs: list[LoraSpec], *params: torch.Tensor):
        with autocast_off(x):
            x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))
            outs, xa, doras = project(x2, specs)
        ctx.save_for_backward(x2, xa)
        ctx.specs, ctx.doras, ctx.shape, ctx.in_dtype = specs, doras, x.shape, x.dtype
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)

    @staticmethod
    def backward(ctx, *dys):
        x2, xa = ctx.saved_tensors
        dys = [None if d is None else d.reshape(-1, d.shape[-1]).to(x2.dtype) for d in dys]
        dx, grads = project_backward(dys, x2, xa, ctx.specs, ctx.doras, need_dx=ctx.needs_input_grad[0])
        ctx.doras = None
        return (None if dx is None else dx.view(ctx.shape).to(ctx.in_dtype)), None, *grads


def fused_projections(x: torch.Tensor, specs: list[LoraSpec]) -> tuple[torch.Tensor, ...]:
    return LoRAProjectionsFunction.apply(x, specs, *lora_tensors(specs))


def attention_specs(attn, arch: ArchSpec | None = None) -> tuple[tuple[list[LoraSpec], LoraSpec] | None, str]:
    """``((qkv specs, o spec), "")`` for a decoder attention module of ``arch`` (read from
    ``attn.config`` when not given), or ``(None, reason)``."""
    arch = arch or spec_for(getattr(getattr(attn, "config", None), "model_type", None))
    if arch is None:
        return None, "no kernel spec for this model type"
    specs = []
    for name in (*arch.qkv, "o_proj"):
        module = getattr(attn, name, None)
        if module is None:
            return None, f"attention has no {name}"
        spec, why = lora_spec(module)
        if spec is None:
            return None, f"{name}: {why}"
        specs.append(spec)
    return (specs[:-1], specs[-1]), ""


def _split_qkv(self, outs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if len(outs) == 3:
        return outs
    q_size = self.config.num_attention_heads * self.head_dim
    kv_size = self.config.num_key_value_heads * self.head_dim
    return outs[0].split([q_size, kv_size, kv_size], dim=-1)


def _attention_kwargs(self, arch: ArchSpec) -> dict:
    """The keyword arguments the model's own attention passes besides dropout and scaling."""
    extra = {}
    if arch.sliding_window == "module":
        extra["sliding_window"] = self.sliding_window
    elif arch.sliding_window == "config":
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    if arch.attn_softcap:
        extra["softcap"] = self.attn_logit_softcapping
    return extra


def fused_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                            arch: ArchSpec | None = None, **kwargs):
    """transformers' decoder attention forward with fused Q/K/V and O projections and RoPE."""
    module = sys.modules[type(self).__module__]
    arch = arch or spec_for(self.config.model_type)
    specs, _ = attention_specs(self, arch)
    if specs is None:  # the adapters changed since patching (e.g. merged): the module's own path
        return type(self).forward(self, hidden_states=hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, cache=cache, **kwargs)
    qkv, o = specs
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = _split_qkv(self, fused_projections(hidden_states, qkv))
    if arch.qk_norm == "all":
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.view(hidden_shape) for t in (q, k, v))
    if arch.qk_norm == "head":
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    q, k = apply_rope(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    interface = module.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                             module.eager_attention_forward)
    dtype = q.dtype
    upcast = q.device.type == "cpu" and dtype == torch.bfloat16
    if upcast:  # see the module docstring
        q, k, v = q.float(), k.float(), v.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    with autocast_off(q) if upcast else _no_change():
        out, weights = interface(self, q, k, v, attention_mask,
                                 dropout=self.attention_dropout if self.training else 0.0,
                                 scaling=self.scaling, **_attention_kwargs(self, arch), **kwargs)
    out = out.to(dtype).reshape(*input_shape, -1).contiguous()
    (out,) = fused_projections(out, [o])
    return out, weights
