"""Put a transformers decoder causal LM onto loraforge's kernels, explicitly and reversibly: the
model types of :data:`loraforge.kernels.arch_specs.SPECS` (Llama, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3 text, Phi-3, OLMo 2, Granite), each described by its :class:`ArchSpec`.

:func:`apply_kernels` sets ``forward`` on module *instances* (the classes are never touched):

- every ``*RMSNorm`` -> :func:`loraforge.kernels.rmsnorm.rmsnorm` in the architecture's
  convention (Gemma's ``1 + w``; q/k norms included);
- every attention whose projections are LoRA or DoRA layers (one active adapter, dropout 0)
  over ``nn.Linear`` / quantized linears (frozen biases allowed), or bare such linears -> fused
  Q/K/V and O projections plus the Triton RoPE (:func:`loraforge.kernels.lora_attn.fused_attention_forward`);
- every gated MLP (SwiGLU, GeGLU) whose projections qualify the same way -> the fused LoRA MLP;
- the causal LM's ``forward``: when ``labels`` are given, the loss comes from the last hidden
  states through the chunked linear + cross-entropy (with Granite's logit divisor and Gemma's
  final soft-cap; ignored positions are skipped, the full logits never exist; the output's
  ``logits`` is then ``None``); ``num_items_in_batch`` and ``shift_labels`` are honoured as
  transformers does. Without labels the original forward runs.

Modules that do not qualify keep their forward, and one notice per reason is printed, naming the
model type, the modules and why. The returned :class:`KernelPatch` lists what was changed;
``patch.undo()`` (or :func:`remove_kernels`) deletes the instance attributes, restoring the
class forwards. Whether a kernel runs in Triton or in its PyTorch reference is decided per call
by :mod:`loraforge.kernels.dispatch`, so a patched model also runs (and is tested) on CPU.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from loraforge.kernels.arch_specs import SPECS, ArchSpec, spec_for
from loraforge.kernels.cross_entropy import linear_cross_entropy
from loraforge.kernels.dispatch import notice
from loraforge.kernels.lora_attn import attention_specs, fused_attention_forward
from loraforge.kernels.lora_mlp import fused_mlp_forward, mlp_specs
from loraforge.kernels.rmsnorm import rmsnorm

SUPPORTED = tuple(SPECS)
IGNORE_INDEX = -100


@dataclass
class KernelPatch:
    """What :func:`apply_kernels` changed: ``(kind, module)`` pairs (kind: rmsnorm, attention,
    mlp, loss)."""

    patched: list[tuple[str, nn.Module]] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.patched if k == kind)

    def undo(self) -> None:
        for _, module in self.patched:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_loraforge_kernels", None)
        self.patched.clear()


def _rmsnorm_forward(self, hidden_states: torch.Tensor, style: str = "llama") -> torch.Tensor:
    eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
    return rmsnorm(hidden_states, self.weight, eps, style)


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                       labels=None, use_cache=None, logits_to_keep=0, arch: ArchSpec | None = None, **kwargs):
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    arch = arch or spec_for(self.config.model_type)
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "sum" if num_items is not None else "mean"
    divisor, softcap = arch.logit_transforms(self.config)
    loss = linear_cross_entropy(hidden, self.lm_head.weight, shift_labels.to(hidden.device), reduction=reduction,
                                ignore_index=ignore_index, divisor=divisor, softcap=softcap)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, cache=getattr(outputs, "cache", None),
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _causal_lms(model: nn.Module) -> list[nn.Module]:
    """The decoder causal LMs inside ``model`` (modules with a config, an ``lm_head`` and ``model.layers``)."""
    found = []
    for module in model.modules():
        if (getattr(getattr(module, "config", None), "model_type", None) is not None
                and isinstance(getattr(module, "lm_head", None), nn.Module)
                and hasattr(getattr(module, "model", None), "layers")):
            found.append(module)
    return found


def _model_type(model: nn.Module) -> str | None:
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type is not None:
            return model_type
    return None


def _set(patch: KernelPatch, kind: str, module: nn.Module, forward, **bound) -> None:
    """``module.forward = forward(module, ..., **bound)`` on the instance."""
    module.forward = types.MethodType(functools.partial(forward, **bound), module)
    module._loraforge_kernels = kind
    patch.patched.append((kind, module))


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(parts)


def _is_rmsnorm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and (hasattr(module, "variance_epsilon") or hasattr(module, "eps")))


def apply_kernels(model: nn.Module, *, norms: bool = True, attention: bool = True, mlp: bool = True,
                  loss: bool = True) -> KernelPatch:
    """Patch ``model`` (a causal LM or any module holding one, e.g. an adapter wrapper) in place."""
    remove_kernels(model)
    patch = KernelPatch()
    lms = _causal_lms(model)
    if not lms:
        model_type = _model_type(model)
        what = f"model type {model_type!r}" if model_type else type(model).__name__
        notice(f"{what}: no decoder causal LM (lm_head + model.layers) found; kernels not applied")
        return patch
    for lm in lms:
        model_type = lm.config.model_type
        arch = spec_for(model_type)
        if arch is None:
            notice(f"model type {model_type!r} ({type(lm).__name__}) has no kernel spec (kernels cover "
                   f"{', '.join(SUPPORTED)}); transformers' forward runs unchanged")
            continue
        if norms:
            for module in lm.modules():
                if _is_rmsnorm(module):
                    _set(patch, "rmsnorm", module, _rmsnorm_forward, style=arch.norm)
        kept: dict[tuple[str, str], list[int]] = {}
        for i, layer in enumerate(lm.model.layers):
            for kind, enabled, name, check, forward in (("attention", attention, "self_attn", attention_specs,
                                                         fused_attention_forward),
                                                        ("mlp", mlp, "mlp", mlp_specs, fused_mlp_forward)):
                if not enabled:
                    continue
                found, why = check(getattr(layer, name), arch)
                if found is None:
                    kept.setdefault((name, why), []).append(i)
                else:
                    _set(patch, kind, getattr(layer, name), forward, arch=arch)
        for (name, why), layers in kept.items():
            notice(f"{model_type}: model.layers[{_ranges(layers)}].{name} keeps transformers' forward ({why})")
        if loss:
            head = lm.lm_head
            if isinstance(head, nn.Linear) and head.bias is None:
                _set(patch, "loss", lm, _causal_lm_forward, arch=arch)
            else:
                notice(f"{model_type}: lm_head ({type(head).__name__}) is not a bias-free nn.Linear; "
                       "the loss keeps transformers' path")
    model._loraforge_kernel_patch = patch
    return patch


def remove_kernels(model: nn.Module) -> None:
    """Undo :func:`apply_kernels` on ``model`` (a no-op if it was not patched)."""
    patch = model.__dict__.pop("_loraforge_kernel_patch", None)
    if patch is not None:
        patch.undo()
