"""Rotary position embedding (Su et al., 2021, arXiv:2104.09864) in transformers' Llama
convention (``rotate_half``: the two halves of the head dimension form the pairs):

    y1 = x1 * cos1 - x2 * sin1        y2 = x2 * cos2 + x1 * sin2
    (x = [x1, x2], cos = [cos1, cos2], sin = [sin1, sin2] along the head dimension D)

Backward (cos and sin carry no gradient): ``dx1 = dy1 * cos1 + dy2 * sin2``,
``dx2 = dy2 * cos2 - dy1 * sin1`` -- the same kernel with ``sin`` negated and the halves' roles
swapped, run with a ``BACKWARD`` flag. ``x`` is ``[B, heads, S, D]`` (any strides: one program per
(b, head, s) row), ``cos`` / ``sin`` are ``[B or 1, S, D]`` as the model's rotary module returns (narrower than
``D`` for partial rotary: the remaining dimensions pass through).
"""

from __future__ import annotations

import torch

from loraforge.kernels.dispatch import use_triton
from loraforge.kernels.jit import kernel

try:
    import triton.language as tl
except ImportError:
    tl = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``cos``, ``sin`` unsqueezed at the head dimension."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


@kernel()
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, S, sxb, sxh, sxs, scb, scs, syb, syh, sys,
                 HALF: tl.constexpr, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    s = pid % S
    h = (pid // S) % H
    b = pid // (S * H)
    d = tl.arange(0, BLOCK)
    mask = d < HALF
    xrow = x_ptr + b * sxb + h * sxh + s * sxs
    crow = b * scb + s * scs
    x1 = tl.load(xrow + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xrow + HALF + d, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + crow + d, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + crow + HALF + d, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + crow + d, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + crow + HALF + d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    yrow = y_ptr + b * syb + h * syh + s * sys
    tl.store(yrow + d, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(yrow + HALF + d, y2.to(y_ptr.dtype.element_ty), mask=mask)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    import triton

    B, H, S, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(cos.shape[0], S, D), sin.expand(sin.shape[0], S, D)
    cos, sin = cos.contiguous(), sin.contiguous()
    scb = 0 if cos.shape[0] == 1 else cos.stride(0)
    y = torch.empty(B, H, S, D, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    _rope_kernel[(B * H * S,)](x, cos, sin, y, H, S, x.stride(0), x.stride(1), x.stride(2), scb, cos.stride(1),
                               y.stride(0), y.stride(1), y.stride(2),
                               HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2), BACKWARD=backward)
    return y


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return rope_triton(x, cos, sin)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return rope_triton(dy, cos, sin, backward=True).to(ctx.x_dtype), None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` for ``[B, heads, S, D]`` tensors.

    Partial rotary (Phi-3's ``partial_rotary_factor``: ``cos`` narrower than ``D``) rotates the
    first ``cos.shape[-1]`` dimensions and passes the rest through, as transformers does."""
    rotary = cos.shape[-1]
    if rotary < q.shape[-1]:
        (q_rot, k_rot), passes = apply_rope(q[..., :rotary], k[..., :rotary], cos, sin), (q[..., rotary:], k[..., rotary:])
        return torch.cat([q_rot, passes[0]], dim=-1), torch.cat([k_rot, passes[1]], dim=-1)
    if use_triton(q) and q.shape[-1] % 2 == 0:
        return RoPEFunction.apply(q, cos, sin), RoPEFunction.apply(k, cos, sin)
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin)
