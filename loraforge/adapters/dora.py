"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

The adapted weight is split into a magnitude ``m`` (one value per output row) and a direction:

    W' = m * (W + s B A) / ||W + s B A||_row        s = alpha / r (or alpha / sqrt(r), rsLoRA)

``m`` starts at ``||W + s B A||_row`` (= the row norms of W while B = 0) so that W' = W at
init. As the paper's section 4.3 advises, the norm is treated as a constant (detached: no
gradient flows through it). With ``g = m / ||W + s B A||`` the layer output is

    y = W x + b + (g - 1) * (W x) + g * s * B A dropout(x)

i.e. ``y = g * (W x + s B A x) + b``: the base result ``W x + b`` already computed by the
wrapped layer is reused (minus its bias) instead of a second full matmul. Only in training with
dropout is ``W dropout(x)`` computed separately, exactly as PEFT does.

The row norm never materialises ``W + s B A``. Expanding the square,

    ||W + s B A||^2_row = ||W||^2_row + 2 s rowsum(B * (W A^T)) + s^2 rowsum((B (A A^T)) * B)

where ``||W||^2_row`` is computed once per frozen base weight and cached, and ``W A^T`` is the
base layer applied to the r rows of A (so a 4-bit base uses its own kernel). The cost per step
is that of r extra tokens through the base layer plus O(out r^2): no out x in temporary.

These functions work on a :class:`loraforge.adapters.lora.LoraLayer`; DoRA adapters are LoRA
adapters with ``use_dora=True`` (PEFT stores the magnitude as ``lora_magnitude_vector``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from loraforge.adapters.base import dense_weight

if TYPE_CHECKING:
    from loraforge.adapters.lora import LoraLayer

_ROW_CHUNK = 4096  # rows of a dense base weight squared at a time when caching ||W||^2


def _base_version(layer: LoraLayer) -> tuple:
    base = layer.base_layer
    weight = getattr(base, "weight", None)
    if isinstance(base, nn.Linear):
        return id(base), weight.data_ptr(), weight._version, weight.device
    return (id(base),)


def _base_dtype(layer: LoraLayer) -> torch.dtype:
    """The input dtype of the base layer's own forward."""
    base = layer.base_layer
    if isinstance(base, nn.Linear):
        return base.weight.dtype
    return getattr(base, "compute_dtype", None) or torch.float32


@torch.no_grad()
def base_row_norms_sq(layer: LoraLayer) -> torch.Tensor:
    """``||W||^2`` per output row of the frozen base weight, float32, cached until W changes."""
    version = _base_version(layer)
    cached = layer._dora_cache.get("w_sq")
    if cached is not None and cached[0] == version:
        return cached[1]
    base = layer.base_layer
    if isinstance(base, nn.Linear):
        w = base.weight
        rows = [w[i:i + _ROW_CHUNK].float().pow(2).sum(1) for i in range(0, w.shape[0], _ROW_CHUNK)]
        w_sq = torch.cat(rows)
    else:
        w_sq = dense_weight(base).pow(2).sum(1)
    layer._dora_cache["w_sq"] = (version, w_sq)
    return w_sq


@torch.no_grad()
def weight_norm(layer: LoraLayer, name: str) -> torch.Tensor:
    """``||W + s B A||`` per output row (float32, no gradient), without forming ``W + s B A``.

    In eval mode the result is cached (keyed by the versions of A, B, s and the base) so that
    generation pays for it once; a forward in training mode drops the cache and always
    recomputes, since optimizers may update parameters through ``.data`` without a version bump.
    """
    a_param, b_param = layer.lora_A[name].weight, layer.lora_B[name].weight
    s = layer.scaling[name]
    key = (a_param.data_ptr(), a_param._version, b_param.data_ptr(), b_param._version, s, _base_version(layer))
    cached = layer._dora_cache.pop(f"norm:{name}", None)
    if cached is not None and cached[0] == key and not layer.training:
        layer._dora_cache[f"norm:{name}"] = cached
        return cached[1]
    a, b = a_param.float(), b_param.float()  # [r, in], [out, r]
    w_at = layer.base_layer(a.to(_base_dtype(layer))).float()  # [r, out] = A W^T + bias
    bias = layer.base_bias()
    if bias is not None:
        w_at = w_at - bias.float()
    cross = (b * w_at.t()).sum(1)
    lora_sq = ((b @ (a @ a.t())) * b).sum(1)
    norm_sq = base_row_norms_sq(layer).to(b.device) + 2.0 * s * cross + (s * s) * lora_sq
    norm = norm_sq.clamp_min(0).sqrt()
    if not layer.training:
        layer._dora_cache[f"norm:{name}"] = (key, norm)
    return norm


def init_magnitude(layer: LoraLayer, name: str) -> None:
    """m = ||W + s B A||_row, so that the adapted layer starts equal to the base."""
    layer.lora_magnitude[name] = nn.Parameter(weight_norm(layer, name))


def output(layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` (= W x + b, plus earlier adapters) updated by DoRA adapter ``name``."""
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    dropout = layer.lora_dropout[name]
    scaling = layer.scaling[name]
    bias = layer.base_bias()
    magnitude = layer.lora_magnitude[name]
    g = magnitude / weight_norm(layer, name)  # the norm is detached (paper, section 4.3)

    if isinstance(dropout, nn.Identity) or not layer.training:
        # y = g * (W x + s B A x) + b, reusing the base result; autograd keeps one [tokens, out]
        # tensor (the parenthesis) for the gradient of m
        base_term = result if bias is None else result - bias
        out = g * (base_term + lora_b(lora_a(x)) * scaling)
        return out if bias is None else out + bias
    # as PEFT with dropout in training: the magnitude rescales W dropout(x), a second base matmul
    x = dropout(x)
    base_term = layer.base_layer(x.to(_base_dtype(layer))).to(x.dtype)
    if bias is not None:
        base_term = base_term - bias
    return result + (g - 1) * base_term + g * lora_b(lora_a(x)) * scaling


@torch.no_grad()
def merge_weight(layer: LoraLayer, name: str, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
    """W' = m / ||W0 + s B A|| * (W + s B A); the norm (from the unmerged W0) is kept for unmerge."""
    delta = layer.delta_weight(name)
    norm = torch.linalg.norm(base_weight + delta, dim=1)
    layer._dora_cache[f"merge_norm:{name}"] = norm
    factor = (layer.lora_magnitude[name].float() / norm).unsqueeze(1)
    return factor * (weight + delta)


@torch.no_grad()
def unmerge_weight(layer: LoraLayer, name: str, weight: torch.Tensor) -> torch.Tensor:
    norm = layer._dora_cache.pop(f"merge_norm:{name}")
    factor = (layer.lora_magnitude[name].float() / norm).unsqueeze(1)
    return weight / factor - layer.delta_weight(name)
