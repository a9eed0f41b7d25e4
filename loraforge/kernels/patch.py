"""Put a transformers Llama-family causal LM (``LlamaForCausalLM`` and the compatible Mistral
and Qwen2 classes) onto loraforge's kernels, explicitly and reversibly.

:func:`apply_kernels` sets ``forward`` on module *instances* (the classes are never touched):

- every ``*RMSNorm`` -> :func:`loraforge.kernels.rmsnorm.rmsnorm`;
- every attention whose q/k/v/o are plain LoRA layers (one active adapter, dropout 0, no DoRA)
  over bias-free ``nn.Linear`` / quantized linears, or bare such linears -> fused QKV / O LoRA
  projections plus the Triton RoPE (:func:`loraforge.kernels.lora_attn.fused_attention_forward`);
- every SwiGLU MLP whose gate/up/down qualify the same way -> the fused LoRA MLP;
- the causal LM's ``forward``: when ``labels`` are given, the loss comes from the last hidden
  states through the chunked linear + cross-entropy (ignored positions are skipped, the full
  logits never exist; the output's ``logits`` is then ``None``); ``num_items_in_batch`` and
  ``shift_labels`` are honoured as transformers does. Without labels the original forward runs.

Modules that do not qualify keep their forward, and one notice per reason is printed. The
returned :class:`KernelPatch` lists what was changed; ``patch.undo()`` (or
:func:`remove_kernels`) deletes the instance attributes, restoring the class forwards. Whether
a kernel runs in Triton or in its PyTorch reference is decided per call by
:mod:`loraforge.kernels.dispatch`, so a patched model also runs (and is tested) on CPU.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn

from loraforge.kernels.cross_entropy import linear_cross_entropy
from loraforge.kernels.dispatch import notice
from loraforge.kernels.lora_attn import attention_specs, fused_attention_forward
from loraforge.kernels.lora_mlp import fused_mlp_forward, mlp_specs
from loraforge.kernels.rmsnorm import rmsnorm

SUPPORTED = ("llama", "mistral", "qwen2")
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


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rmsnorm(hidden_states, self.weight, self.variance_epsilon)


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                       labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

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
    loss = linear_cross_entropy(hidden, self.lm_head.weight, shift_labels.to(hidden.device), reduction=reduction,
                                ignore_index=ignore_index)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, cache=getattr(outputs, "cache", None),
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _causal_lms(model: nn.Module) -> list[nn.Module]:
    found = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if (getattr(config, "model_type", None) in SUPPORTED and isinstance(getattr(module, "lm_head", None), nn.Module)
                and hasattr(getattr(module, "model", None), "layers")):
            found.append(module)
    return found


def _set(patch: KernelPatch, kind: str, module: nn.Module, forward) -> None:
    module.forward = types.MethodType(forward, module)
    module._loraforge_kernels = kind
    patch.patched.append((kind, module))


def apply_kernels(model: nn.Module, *, norms: bool = True, attention: bool = True, mlp: bool = True,
                  loss: bool = True) -> KernelPatch:
    """Patch ``model`` (a causal LM or any module holding one, e.g. an adapter wrapper) in place."""
    remove_kernels(model)
    patch = KernelPatch()
    lms = _causal_lms(model)
    if not lms:
        notice(f"{type(model).__name__} holds no Llama-family causal LM ({', '.join(SUPPORTED)}); kernels not applied")
        return patch
    for lm in lms:
        for module in lm.modules():
            if norms and type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
                _set(patch, "rmsnorm", module, _rmsnorm_forward)
        for layer in lm.model.layers:
            if attention:
                specs, why = attention_specs(layer.self_attn)
                if specs is None:
                    notice(f"attention keeps its own forward ({why})")
                else:
                    _set(patch, "attention", layer.self_attn, fused_attention_forward)
            if mlp:
                specs, why = mlp_specs(layer.mlp)
                if specs is None:
                    notice(f"MLP keeps its own forward ({why})")
                else:
                    _set(patch, "mlp", layer.mlp, fused_mlp_forward)
        if loss:
            head = lm.lm_head
            if isinstance(head, nn.Linear) and head.bias is None:
                _set(patch, "loss", lm, _causal_lm_forward)
            else:
                notice(f"the output head ({type(head).__name__}) is not a bias-free nn.Linear; loss keeps transformers' path")
    model._loraforge_kernel_patch = patch
    return patch


def remove_kernels(model: nn.Module) -> None:
    """Undo :func:`apply_kernels` on ``model`` (a no-op if it was not patched)."""
    patch = model.__dict__.pop("_loraforge_kernel_patch", None)
    if patch is not None:
        patch.undo()
