"""Gated activations (Shazeer, 2020, arXiv:2002.05202) ``h = act(g) * u``: SwiGLU, the Llama
MLP's ``act = silu``, ``silu(g) = g * sigmoid(g)``, and GeGLU with the tanh-approximated GELU
(Gemma's ``gelu_pytorch_tanh``), ``gelu(g) = g / 2 * (1 + t)``, ``t = tanh(k (g + 0.044715 g^3))``,
``k = sqrt(2 / pi)``. Backward (float32), ``du = dh * act(g)`` and ``dg = dh * u * act'(g)`` with

    silu'(g) = s * (1 + g * (1 - s))      (s = sigmoid(g))
    gelu'(g) = (1 + t) / 2 + g / 2 * (1 - t^2) * k * (1 + 3 * 0.044715 g^2)   (PyTorch's formula)

``act`` is ``"silu"`` (the default everywhere) or ``"gelu_tanh"``; in Triton ``tanh(y)`` is
``2 sigmoid(2 y) - 1``. The activation is rounded to the input dtype before the product, as
``F.silu`` / ``F.gelu`` then ``* u`` do.

Elementwise Triton kernels over ``[rows, I]`` with arbitrary row strides, so gate and up may be
two column halves of one ``[rows, 2I]`` product. The backward can write ``dg`` / ``du`` into
any buffers, including ``g`` / ``u`` themselves (the fused MLP does that: they are dead after).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraforge.kernels.dispatch import use_triton
from loraforge.kernels.jit import kernel

try:
    import triton.language as tl
except ImportError:
    tl = None

_CONFIGS = [{"BLOCK": 1024, "num_warps": 4}, {"BLOCK": 2048, "num_warps": 8}, {"BLOCK": 4096, "num_warps": 8}]


ACTS = ("silu", "gelu_tanh")
_K = 0.7978845608028654  # sqrt(2 / pi)
_C = 0.044715


def swiglu_reference(g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> torch.Tensor:
    # ``* u`` in place on the fresh activation: the same bits as ``act(g) * u``, one allocation
    return (F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")).mul_(u)


def _act_and_grad(gf: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    if act == "silu":
        s = torch.sigmoid(gf)
        return gf * s, s * (1 + gf * (1 - s))
    t = torch.tanh(_K * (gf + _C * gf * gf * gf))
    return 0.5 * gf * (1 + t), 0.5 * (1 + t) + 0.5 * gf * (1 - t * t) * _K * (1 + 3 * _C * gf * gf)


def swiglu_backward_reference(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                              act: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    gf, uf, dhf = g.float(), u.float(), dh.float()
    a, da = _act_and_grad(gf, act)
    return (dhf * uf * da).to(g.dtype), (dhf * a).to(u.dtype)


def swiglu_backward_in_place(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> None:
    """The PyTorch path's backward, writing ``dg`` over ``g`` and ``du`` over ``u``. float32: five
    elementwise passes and one temporary, with PyTorch's own derivative (``aten.silu_backward`` /
    ``gelu_backward``, the ops autograd runs for ``F.silu`` / ``F.gelu``), instead of the
    reference's eleven passes and temporaries (a ``[512, 1536]`` SmolLM2 MLP: ~9 -> ~5 ms on one
    core); other dtypes: the reference, whose float32 intermediates a half-precision pass would round."""
    if g.dtype != torch.float32 or u.dtype != torch.float32 or dh.dtype != torch.float32:
        dg, du = swiglu_backward_reference(dh, g, u, act)
        g.copy_(dg)
        u.copy_(du)
        return
    activation = F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")
    u.mul_(dh)                                     # dh * u
    if act == "silu":
        torch.ops.aten.silu_backward.grad_input(u, g, grad_input=g)
    else:
        torch.ops.aten.gelu_backward.grad_input(u, g, approximate="tanh", grad_input=g)
    torch.mul(dh, activation, out=u)


@kernel(configs=_CONFIGS, key=["I"])
def _swiglu_fwd(g_ptr, u_ptr, h_ptr, I, stride_g, stride_u, stride_h, BLOCK: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)) - 1.0
        a = 0.5 * g * (1.0 + t)
    else:
        a = g * tl.sigmoid(g)
    a = a.to(g_ptr.dtype.element_ty).to(tl.float32)  # F.silu / F.gelu round here
    tl.store(h_ptr + row * stride_h + cols, (a * u).to(h_ptr.dtype.element_ty), mask=mask)


@kernel(configs=_CONFIGS, key=["I"])
def _swiglu_bwd(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, I, stride_dh, stride_g, stride_u, stride_dg, stride_du,
                BLOCK: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        k = 0.7978845608028654
        t = 2.0 * tl.sigmoid(2.0 * k * (g + 0.044715 * g * g * g)) - 1.0
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    dg = dh * u * da
    du = dh * a
    tl.store(dg_ptr + row * stride_dg + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * stride_du + cols, du.to(du_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``[rows, I]`` view with unit column stride (copying only if needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _grid(rows: int, I: int):
    import triton

    return lambda meta: (rows, triton.cdiv(I, meta["BLOCK"]))


def swiglu_forward_triton(g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> torch.Tensor:
    g2, u2 = _rows(g), _rows(u)
    rows, I = g2.shape
    h = torch.empty(rows, I, dtype=g.dtype, device=g.device)
    _swiglu_fwd[_grid(rows, I)](g2, u2, h, I, g2.stride(0), u2.stride(0), h.stride(0), GELU=act == "gelu_tanh")
    return h.view(*g.shape)


def swiglu_backward_triton(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                           dg: torch.Tensor | None = None, du: torch.Tensor | None = None,
                           act: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)``; pass ``dg`` / ``du`` (2-D, unit column stride; may alias ``g`` / ``u``) to write in place."""
    dh2, g2, u2 = _rows(dh), _rows(g), _rows(u)
    rows, I = g2.shape
    dg = torch.empty(rows, I, dtype=g.dtype, device=g.device) if dg is None else dg
    du = torch.empty(rows, I, dtype=u.dtype, device=u.device) if du is None else du
    _swiglu_bwd[_grid(rows, I)](dh2, g2, u2, dg, du, I, dh2.stride(0), g2.stride(0), u2.stride(0),
                                dg.stride(0), du.stride(0), GELU=act == "gelu_tanh")
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> torch.Tensor:
        ctx.save_for_backward(g, u)
        ctx.act = act
        return swiglu_forward_triton(g, u, act)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        dg, du = swiglu_backward_triton(dh, g, u, act=ctx.act)
        return dg.view(g.shape), du.view(u.shape), None


def swiglu(g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``act(g) * u``: the Triton kernels where they run, else PyTorch."""
    if use_triton(g):
        return SwiGLUFunction.apply(g, u, act)
    return swiglu_reference(g, u, act)
