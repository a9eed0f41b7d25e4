"""RMSNorm (Zhang & Sennrich, 2019, arXiv:1910.07467) in the three conventions of transformers'
decoders (``style``), with ``r = 1 / sqrt(mean(x^2) + eps)`` and ``n = x * r`` in float32:

    "llama" (Llama, Mistral, Qwen, Phi-3, Granite)   y = w * n.to(x.dtype)
    "gemma" (Gemma 2 / 3)                              y = (n * (1 + w)).to(x.dtype)
    "olmo2" (OLMo 2)                                   y = (w * n).to(x.dtype)

i.e. an effective weight ``w + offset`` (offset 1 for Gemma) and a cast of ``n`` before (Llama)
or after (Gemma, OLMo 2) the product. Backward (``g = dy * (w + offset)``, in float32):
``dx = r * (g - n * mean(g * n))``, ``dw = sum_rows(dy * n)``.
The Triton kernels process one row per program (the row fits in one block: ``BLOCK = next power
of two >= H``) and save only ``r`` (one float per row) besides the input. The weight gradient
(a reduction over rows) is formed with one PyTorch product only when the weight trains, which it
does not in LoRA fine-tuning.
"""

from __future__ import annotations

import torch

from loraforge.kernels.dispatch import use_triton
from loraforge.kernels.jit import kernel

try:
    import triton.language as tl
except ImportError:
    tl = None


STYLES = {"llama": (0.0, False), "gemma": (1.0, True), "olmo2": (0.0, True)}  # style -> (offset, cast last)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str = "llama") -> torch.Tensor:
    """transformers' ``LlamaRMSNorm`` / ``Gemma2RMSNorm`` / ``Olmo2RMSNorm`` forward."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if style == "gemma":
        return (h * (1.0 + weight.float())).type_as(x)
    if style == "olmo2":
        return (weight * h).to(x.dtype)
    return weight * h.to(x.dtype)


@kernel()
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, offset, BLOCK: tl.constexpr, CAST_LAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    n = x * r
    if not CAST_LAST:
        n = n.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    tl.store(y_ptr + row * H + cols, (w * n).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, r)


@kernel()
def _rmsnorm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, H, offset, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    r = tl.load(rstd_ptr + row)
    n = x * r
    g = dy * w
    dx = r * (g - n * (tl.sum(g * n, axis=0) / H))
    tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _block(H: int) -> int:
    import triton

    return triton.next_power_of_2(H)


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm; gradients for ``x`` and (when it requires grad) ``weight``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, style: str = "llama") -> torch.Tensor:
        offset, cast_last = STYLES[style]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, H = x2.shape
        out_dtype = x.dtype if cast_last else torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty(rows, H, dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        _rmsnorm_fwd[(rows,)](x2, weight, y, rstd, H, eps, offset, BLOCK=_block(H), CAST_LAST=cast_last,
                              num_warps=_warps(H))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.offset = shape, offset
        return y.view(*shape[:-1], H)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, H = x2.shape
        dy2 = dy.reshape(rows, H).contiguous()
        dx = torch.empty_like(x2)
        _rmsnorm_bwd[(rows,)](dy2, x2, weight, rstd, dx, H, ctx.offset, BLOCK=_block(H), num_warps=_warps(H))
        dw = None
        if ctx.needs_input_grad[1]:
            n = (x2.float() * rstd[:, None]).to(x2.dtype).float()
            dw = (dy2.float() * n).sum(0).to(weight.dtype)
        return dx.view(ctx.shape), dw, None, None


def _warps(H: int) -> int:
    return 4 if H <= 2048 else 8 if H <= 8192 else 16


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str = "llama") -> torch.Tensor:
    """RMSNorm in ``style``'s convention: the Triton kernel where it runs, else :func:`rmsnorm_reference`."""
    if use_triton(x):
        return RMSNormFunction.apply(x, weight, eps, style)
    return rmsnorm_reference(x, weight, eps, style)
