"""Shared pieces of the fused LoRA blocks (LoRA: Hu et al., 2021, arXiv:2106.09685; DoRA: Liu et
al., 2024, arXiv:2402.09353).

A LoRA projection is ``y = x W^T + s (x A^T) B^T + b`` with ``W [out, in]`` frozen (dense, or
4-bit / k-bit quantized), ``A [r, in]``, ``B [out, r]`` trained, ``s`` the scaling and ``b`` an
optional frozen bias (Qwen2's q/k/v). With ``T`` tokens the rank-r product is formed first
(``x A^T`` is ``[T, r]``), never ``B A``. Several projections that read the same ``x`` (Q, K, V;
gate and up) share one product ``x [A_1; A_2; ...]^T``. Backward, with ``dy`` the output gradient:

    dB = s dy^T (x A^T)        g = s dy B   ([T, r])        dA = g^T x        dx = dy W + g A

so only ``x`` and ``x A^T`` are kept. A quantized ``W`` is dequantized (Triton on GPU) into one
reused buffer right before its matmul and dropped, forward and backward.

DoRA (a magnitude ``m [out]`` per projection): ``y = c * z + b`` with ``z = x W^T + s (x A^T) B^T``
and ``c = m / ||W + s B A||_row``, the norm detached (the paper's section 4.3, as loraforge's
``adapters/dora.py`` and PEFT). The norm is formed in the forward from the ``W`` already in hand
for the matmul (dequantized once), without the ``[out, in]`` sum:

    ||W + s B A||^2 = rowsum(W * W) + 2 s rowsum(B * (W A^T)) + s^2 rowsum((B (A A^T)) * B)

at the cost of ``r`` extra rows through ``W`` (``rowsum(W * W)`` of a frozen base is kept per
base layer until its weight tensor changes; inside a checkpointed layer's re-run the norm of
the same step's forward is reused, A and B being unchanged between the two). Backward: ``dm = colsum(dy * z) / ||W + s B A||``
and ``dz = c * dy``, then the LoRA backward above with ``dz``; ``z`` is kept (``[T, out]``, what
PEFT's DoRA keeps too).

:func:`lora_spec` reads a loraforge ``LoraLayer`` (or a plain ``nn.Linear`` / quantized linear
without adapter) into a :class:`LoraSpec`, or says why it cannot be fused: the fused path covers
one active LoRA or DoRA adapter with dropout 0; VeRA and the other methods, dropout > 0, several
active or merged adapters keep the module's own forward. Detection is by attributes and class
name (this package imports nothing else of loraforge).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from loraforge.kernels.checkpoint import in_recompute
from loraforge.kernels.dequant import dequantize_layer, packed_from_layer


@dataclass
class LoraSpec:
    base: nn.Module                      # nn.Linear or a quantized linear (has .dequantize)
    A: nn.Parameter | None               # [r, in]  (None: no adapter on this projection)
    B: nn.Parameter | None               # [out, r]
    scale: float
    out_features: int
    bias: torch.Tensor | None = None     # the base layer's frozen bias [out]
    magnitude: nn.Parameter | None = None  # DoRA's m [out]

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """The trained tensors of this projection: A, B (and m for DoRA); none without adapter."""
        if self.A is None:
            return []
        return [self.A, self.B] + ([self.magnitude] if self.magnitude is not None else [])


def _is_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (callable(getattr(module, "dequantize", None))
                                             and hasattr(module, "in_features"))


def _frozen_bias(base: nn.Module) -> tuple[torch.Tensor | None, str]:
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return None, "the base bias is trained"
    return bias, ""


# a base whose own product is not ``x @ dequantize(W)`` (LLM.int8's mixed-precision decomposition)
_UNFUSABLE = "base layer {} computes its own product (the fused path multiplies by the dequantized weight)"


def lora_spec(module: nn.Module) -> tuple[LoraSpec | None, str]:
    """``(spec, "")`` when ``module`` can run fused, else ``(None, reason)``."""
    if _is_base(module):
        if not getattr(module, "fusable", True):
            return None, _UNFUSABLE.format(type(module).__name__)
        if getattr(getattr(module, "weight", None), "requires_grad", False):
            return None, "a projection's weight is trained (the fused path computes no gradient for it)"
        bias, why = _frozen_bias(module)
        if why:
            return None, why
        return LoraSpec(module, None, None, 0.0, module.out_features, bias), ""
    if type(module).__name__ != "LoraLayer" or not hasattr(module, "lora_A"):
        return None, f"{type(module).__name__} is not a LoRA / DoRA layer"
    if getattr(module, "disabled", False) or getattr(module, "merged_adapters", []):
        return None, "adapters are disabled or merged"
    active = [n for n in module.active_adapters if n in module.lora_A]
    if len(active) != 1:
        return None, f"{len(active)} active adapters (the fused path takes exactly one)"
    name = active[0]
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and not (isinstance(dropout, nn.Dropout) and dropout.p == 0):
        return None, "LoRA dropout > 0"
    base = module.base_layer
    if not _is_base(base):
        return None, f"base layer {type(base).__name__} is not linear"
    if not getattr(base, "fusable", True):
        return None, _UNFUSABLE.format(type(base).__name__)
    bias, why = _frozen_bias(base)
    if why:
        return None, why
    magnitude = getattr(module, "lora_magnitude", {})
    return LoraSpec(base, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]),
                    module.out_features, bias, magnitude[name] if name in magnitude else None), ""


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
    """The trained tensors, in the order the autograd Functions take them: A_i, B_i (m_i) per adapter."""
    return [t for s in specs for t in s.tensors()]


@dataclass
class DoraState:
    """What a DoRA projection's backward needs: ``z`` (``[T, out]``, before the magnitude),
    ``c = m / norm`` (compute dtype) and ``norm = ||W + s B A||_row`` (float32)."""

    z: torch.Tensor
    c: torch.Tensor
    norm: torch.Tensor


_ROW_SQ: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base layer -> (version, rowsum(W * W))
_NORMS: dict[int, tuple[tuple, torch.Tensor]] = {}  # id(DoRA magnitude) -> (key, norm), for re-runs


def _remember_norm(magnitude: torch.Tensor, key: tuple, norm: torch.Tensor) -> None:
    if id(magnitude) not in _NORMS:  # dropped with the parameter (tensors compare elementwise: no weak dict)
        weakref.finalize(magnitude, _NORMS.pop, id(magnitude), None)
    _NORMS[id(magnitude)] = (key, norm)


def _weight_version(base: nn.Module) -> tuple | None:
    """What identifies the current value of a frozen base weight (None: cannot tell, do not cache)."""
    weight = base.weight if isinstance(base, nn.Linear) else getattr(base, "qweight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    return weight.data_ptr(), weight._version, weight.dtype


def _row_norms_sq(w: torch.Tensor, base: nn.Module) -> torch.Tensor:
    version = _weight_version(base)
    cached = _ROW_SQ.get(base)
    if version is not None and cached is not None and cached[0] == (version, w.dtype):
        return cached[1]
    w_sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
    if version is not None:
        _ROW_SQ[base] = ((version, w.dtype), w_sq)
    return w_sq


def dora_norm(w: torch.Tensor, spec: LoraSpec) -> torch.Tensor:
    """``||W + s B A||`` per output row (float32) from ``w`` (the ``W [out, in]`` in hand)."""
    a_param, b_param = spec.A, spec.B
    key = (a_param.data_ptr(), a_param._version, b_param.data_ptr(), b_param._version, spec.scale, w.dtype,
           _weight_version(spec.base))
    cached = _NORMS.get(id(spec.magnitude))
    if in_recompute() and cached is not None and cached[0] == key and key[-1] is not None:
        return cached[1]
    with torch.no_grad():
        a, b, s = a_param.float(), b_param.float(), spec.scale
        w_at = (w @ a_param.to(w.dtype).t()).float()                       # [out, r]
        cross = (b * w_at).sum(1)
        lora_sq = ((b @ (a @ a.t())) * b).sum(1)
        norm = (_row_norms_sq(w, spec.base) + 2.0 * s * cross + (s * s) * lora_sq).clamp_min(0).sqrt()
    _remember_norm(spec.magnitude, key, norm)
    return norm


def finish(z: torch.Tensor, spec: LoraSpec, dora: DoraState | None) -> torch.Tensor:
    """``y = c * z + b`` from the pre-magnitude output ``z`` (a new tensor when anything applies)."""
    y = z * dora.c if dora is not None else z
    if spec.bias is not None:
        y = y + spec.bias.to(z.dtype)
    return y


def project(x2: torch.Tensor, specs: list[LoraSpec]
            ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[DoraState | None]]:
    """``[c_i (x W_i^T + s_i (x A_i^T) B_i^T) + b_i]``, the shared ``x [A_1; ...]^T`` (None
    without adapters) and the DoRA states (None for plain projections)."""
    dtype = x2.dtype
    adapters = [s for s in specs if s.A is not None]
    xa = x2 @ torch.cat([s.A for s in adapters]).to(dtype).t() if adapters else None
    outs, doras, col = [], [], 0
    for s in specs:
        w = base_weight(s.base, dtype)
        z = x2 @ w.t()
        dora = None
        if s.A is not None:
            z.addmm_(xa[:, col:col + s.rank], s.B.to(dtype).t(), alpha=s.scale)
            col += s.rank
            if s.magnitude is not None:
                norm = dora_norm(w, s)
                dora = DoraState(z, (s.magnitude.detach().float() / norm).to(dtype), norm)
        outs.append(finish(z, s, dora))
        doras.append(dora)
    return outs, xa, doras


def project_backward(dys: list[torch.Tensor | None], x2: torch.Tensor, xa: torch.Tensor | None,
                     specs: list[LoraSpec], doras: list[DoraState | None] | None = None,
                     need_dx: bool = True, own_dys: bool = False) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """``(dx, [dA_1, dB_1, (dm_1), ...])`` for :func:`project` (``dy_i = None``: no gradient
    reached output i; ``own_dys``: the caller's ``dy`` buffers may be overwritten)."""
    dtype = x2.dtype
    doras = doras or [None] * len(specs)
    dx = None
    grads_bm, gs, col = [], [], 0
    for s, dy, dora in zip(specs, dys, doras):
        if s.A is not None:
            if dy is None:
                grads_bm.append([torch.zeros_like(t) for t in s.tensors()[1:]])
                gs.append(x2.new_zeros(x2.shape[0], s.rank))
            else:
                extra = []
                if dora is not None:
                    extra = [((dy * dora.z).float().sum(0) / dora.norm).to(s.magnitude.dtype)]
                    dy = dy.mul_(dora.c) if own_dys else dy * dora.c
                grads_bm.append([(dy.t() @ xa[:, col:col + s.rank]).mul_(s.scale).to(s.B.dtype), *extra])
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
        for s, gbm in zip(adapters, grads_bm):
            grads += [grad_a[row:row + s.rank].to(s.A.dtype), *gbm]
            row += s.rank
    if need_dx and dx is None:
        dx = torch.zeros_like(x2)
    return dx, grads
