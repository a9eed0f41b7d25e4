"""Shared pieces of the fused LoRA blocks (LoRA: Hu et al., 2021, arXiv:2106.09685).

A LoRA projection is ``y = x W^T + s (x A^T) B^T`` with ``W [out, in]`` frozen (dense, or
4-bit / k-bit quantized), ``A [r, in]``, ``B [out, r]`` trained and ``s`` the scaling. With
``T`` tokens the rank-r product is formed first (``x A^T`` is ``[T, r]``), never ``B A``.
Several projections that read the same ``x`` (Q, K, V; gate and up) share one product
``x [A_1; A_2; ...]^T``. Backward, with ``dy`` the output gradient:

    dB = s dy^T (x A^T)        g = s dy B   ([T, r])        dA = g^T x        dx = dy W + g A

so only ``x`` and ``x A^T`` are kept. A quantized ``W`` is dequantized (Triton on GPU) into one
reused buffer right before its matmul and dropped, forward and backward.

:func:`lora_spec` reads a loraforge ``LoraLayer`` (or a plain ``nn.Linear`` / quantized linear
without adapter) into a :class:`LoraSpec`, or says why it cannot be fused: the fused path covers
one active plain LoRA adapter with dropout 0 on a bias-free base; DoRA, VeRA and the other
methods, dropout > 0, a base bias, several active or merged adapters keep the module's own
forward. Detection is by attributes and class name (this package imports nothing else of
loraforge).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraforge.kernels.dequant import dequantize_layer, packed_from_layer


@dataclass
class LoraSpec:
    base: nn.Module                      # nn.Linear or a quantized linear (has .dequantize)
    A: nn.Parameter | None               # [r, in]  (None: no adapter on this projection)
    B: nn.Parameter | None               # [out, r]
    scale: float
    out_features: int

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]


def _is_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (callable(getattr(module, "dequantize", None))
                                             and hasattr(module, "in_features"))


def lora_spec(module: nn.Module) -> tuple[LoraSpec | None, str]:
    """``(spec, "")`` when ``module`` can run fused, else ``(None, reason)``."""
    if _is_base(module):
        if getattr(module, "bias", None) is not None:
            return None, "a projection has a bias"
        if getattr(getattr(module, "weight", None), "requires_grad", False):
            return None, "a projection's weight is trained (the fused path computes no gradient for it)"
        return LoraSpec(module, None, None, 0.0, module.out_features), ""
    if type(module).__name__ != "LoraLayer" or not hasattr(module, "lora_A"):
        return None, f"{type(module).__name__} is not a plain LoRA layer"
    if getattr(module, "disabled", False) or getattr(module, "merged_adapters", []):
        return None, "adapters are disabled or merged"
    active = [n for n in module.active_adapters if n in module.lora_A]
    if len(active) != 1:
        return None, f"{len(active)} active adapters (the fused path takes exactly one)"
    name = active[0]
    if name in getattr(module, "lora_magnitude", {}):
        return None, "DoRA adapters"
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and not (isinstance(dropout, nn.Dropout) and dropout.p == 0):
        return None, "LoRA dropout > 0"
    base = module.base_layer
    if not _is_base(base):
        return None, f"base layer {type(base).__name__} is not linear"
    if getattr(base, "bias", None) is not None:
        return None, "a projection has a bias"
    return LoraSpec(base, module.lora_A[name].weight, module.lora_B[name].weight,
                    float(module.scaling[name]), module.out_features), ""


# ----- one reused buffer for dequantized weights ------------------------------------------------

_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``W [out, in]`` in ``dtype``: a dense weight as is (cast if needed); a quantized one
    dequantized into a buffer shared by all fused layers (valid until the next call)."""
    if isinstance(base, nn.Linear):
        return base.weight if base.weight.dtype == dtype else base.weight.to(dtype)
    if packed_from_layer(base) is None:
        return base.dequantize(dtype)
    device = base.qweight.device
    n = base.out_features * base.in_features
    buf = _BUFFERS.get((device, dtype))
    if buf is None or buf.numel() < n:
        buf = _BUFFERS[(device, dtype)] = torch.empty(n, dtype=dtype, device=device)
    return dequantize_layer(base, dtype, out=buf[:n].view(base.out_features, base.in_features))


def release_buffers() -> None:
    """Free the shared dequantization buffers (they are re-created on demand)."""
    _BUFFERS.clear()


# ----- forward / backward of projections that share their input -------------------------------

def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the fused blocks compute in: autocast's when it is on (the Functions then cast
    their input once and run with autocast off, so that forward and backward agree), else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def autocast_off(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def lora_tensors(specs: list[LoraSpec]) -> list[torch.Tensor]:
    """The trained tensors, in the order the autograd Functions take them: A_i, B_i per adapter."""
    return [t for s in specs if s.A is not None for t in (s.A, s.B)]


def project(x2: torch.Tensor, specs: list[LoraSpec]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``[x W_i^T + s_i (x A_i^T) B_i^T]`` and the shared ``x [A_1; ...]^T`` (None without adapters)."""
    dtype = x2.dtype
    adapters = [s for s in specs if s.A is not None]
    xa = x2 @ torch.cat([s.A for s in adapters]).to(dtype).t() if adapters else None
    outs, col = [], 0
    for s in specs:
        y = x2 @ base_weight(s.base, dtype).t()
        if s.A is not None:
            y.addmm_(xa[:, col:col + s.rank], s.B.to(dtype).t(), alpha=s.scale)
            col += s.rank
        outs.append(y)
    return outs, xa


def project_backward(dys: list[torch.Tensor | None], x2: torch.Tensor, xa: torch.Tensor | None,
                     specs: list[LoraSpec], need_dx: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """``(dx, [dA_1, dB_1, ...])`` for :func:`project` (``dy_i = None``: no gradient reached output i)."""
    dtype = x2.dtype
    dx = None
    grads_b, gs, col = [], [], 0
    for s, dy in zip(specs, dys):
        if s.A is not None:
            if dy is None:
                grads_b.append(torch.zeros_like(s.B))
                gs.append(x2.new_zeros(x2.shape[0], s.rank))
            else:
                grads_b.append((dy.t() @ xa[:, col:col + s.rank]).mul_(s.scale).to(s.B.dtype))
                gs.append((dy @ s.B.to(dtype)).mul_(s.scale))
            col += s.rank
        if need_dx and dy is not None:
            w = base_weight(s.base, dtype)
            dx = dy @ w if dx is None else dx.addmm_(dy, w)
    grads = []
    if gs:
        g = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
        a_all = torch.cat([s.A for s in specs if s.A is not None]).to(dtype)
        grad_a = g.t() @ x2
        if need_dx:
            dx = g @ a_all if dx is None else dx.addmm_(g, a_all)
        row = 0
        adapters = [s for s in specs if s.A is not None]
        for s, gb in zip(adapters, grads_b):
            grads += [grad_a[row:row + s.rank].to(s.A.dtype), gb]
            row += s.rank
    if need_dx and dx is None:
        dx = torch.zeros_like(x2)
    return dx, grads
