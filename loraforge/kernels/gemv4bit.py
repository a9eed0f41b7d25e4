"""Fused 4-bit dequantization + matrix product for few rows (decode: M = 1..16).

    y[m, n] = sum_k x[m, k] * code4[q[n, k]] * absmax[(n * K + k) // blocksize]      (+ bias)

The weight ``[N, K]`` is stored as in :mod:`loraforge.kernels.dequant` (row-major nibbles, element
2i high). At small M the product is bound by reading the weight, so the kernel streams the packed
bytes once (4.125 to 4.5 bits per weight instead of 16) and never writes a dequantized copy:
each program owns ``BLOCK_N`` output columns and a ``1 / SPLIT_K`` slice of K, loads packed tiles
``[BLOCK_N, BLOCK_K / 2]`` (contiguous along K: coalesced), expands the high and low nibbles
into the even and odd weight columns, and multiplies them with the matching even and odd columns
of x (so no interleave is needed), accumulating in float32 (``tl.dot`` with M padded to 16);
partial sums of the K slices are added with atomics into a float32 buffer, cast once at the end.
Float32 activations use an IEEE float32 dot (no TF32), and so does the interpreter for every
dtype (its bf16 dot is not exact).

:func:`gemv_4bit` takes ``x [..., K]`` with at most :data:`MAX_ROWS` rows and K a multiple of the
block size; anything else goes through the reference (dequantize, then ``F.linear``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loraforge.kernels.dequant import Packed4bit, dequantize_4bit, dequantize_4bit_reference
from loraforge.kernels.dispatch import interpreting, use_triton
from loraforge.kernels.jit import kernel

try:
    import triton.language as tl
except ImportError:
    tl = None

MAX_ROWS = 16


def gemv_4bit_reference(x: torch.Tensor, w: Packed4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(w)^T + bias`` in float32, returned in ``x.dtype``."""
    weight = dequantize_4bit_reference(w, torch.float32)
    out = F.linear(x.float(), weight, None if bias is None else bias.float())
    return out.to(x.dtype)


@kernel(
    configs=[
        {"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3},
        {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3},
        {"BLOCK_N": 64, "BLOCK_K": 512, "SPLIT_K": 2, "num_warps": 8, "num_stages": 3},
        {"BLOCK_N": 128, "BLOCK_K": 256, "SPLIT_K": 2, "num_warps": 8, "num_stages": 4},
        {"BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 8, "num_warps": 4, "num_stages": 4},
    ],
    key=["M", "N", "K"],
)
def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_ptr, nested_code_ptr, offset_ptr, acc_ptr,
                 M, N, K, stride_xm,
                 BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOUBLE: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, 16)                                   # M padded to the mma minimum
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    pair = tl.arange(0, HALF)                                 # byte j holds k = 2j (high), 2j + 1 (low)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        kk = k0 + 2 * pair                                    # even k of each byte
        k_ok = kk < K
        byte = cols[:, None].to(tl.int64) * (K // 2) + (kk // 2)[None, :]
        mask = col_ok[:, None] & k_ok[None, :]
        q = tl.load(packed_ptr + byte, mask=mask, other=0)
        block = (cols[:, None].to(tl.int64) * K + kk[None, :]) // BLOCKSIZE
        if DOUBLE:
            c = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + c) * tl.load(nested_ptr + block // NESTED, mask=mask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        w_even = tl.load(code_ptr + (q >> 4).to(tl.int32)) * scale      # [BLOCK_N, HALF]
        w_odd = tl.load(code_ptr + (q & 0xF).to(tl.int32)) * scale
        x_mask = (rows[:, None] < M) & k_ok[None, :]
        x_even = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] + 1, mask=x_mask, other=0.0)
        if DOT_F32:
            acc += tl.dot(x_even.to(tl.float32), tl.trans(w_even), input_precision="ieee")
            acc += tl.dot(x_odd.to(tl.float32), tl.trans(w_odd), input_precision="ieee")
        else:
            acc += tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)))
            acc += tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)))
    out_mask = (rows[:, None] < M) & col_ok[None, :]
    tl.atomic_add(acc_ptr + rows[:, None] * N + cols[None, :], acc, mask=out_mask)


def gemv_4bit_triton(x: torch.Tensor, w: Packed4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    import triton

    w.check()
    N, K = w.shape
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    acc = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    if w.double_quant:
        nested, nested_code, offset = w.nested_absmax, w.nested_code.float(), w.offset.float().reshape(1)
    else:
        nested = nested_code = offset = w.absmax
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    _gemv_kernel[grid](x2, w.packed.reshape(-1), w.absmax, w.code.float(), nested, nested_code, offset, acc,
                       M, N, K, x2.stride(0), BLOCKSIZE=w.blocksize, NESTED=w.nested_blocksize,
                       DOUBLE=w.double_quant, DOT_F32=interpreting() or x2.dtype == torch.float32,
                       enable_fp_fusion=False)
    if bias is not None:
        acc += bias.float()
    return acc.to(x.dtype).reshape(*x.shape[:-1], N)


def supports(x: torch.Tensor, w: Packed4bit) -> bool:
    """The kernel's domain: at most 16 rows, K even and a multiple of the block size."""
    K = w.shape[-1]
    rows = math.prod(x.shape[:-1])
    return len(w.shape) == 2 and 0 < rows <= MAX_ROWS and K % 2 == 0 and K % w.blocksize == 0


def gemv_4bit(x: torch.Tensor, w: Packed4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(w)^T + bias`` (no gradient): fused kernel for decode shapes, else dequantize
    (Triton where available) and one ``F.linear``."""
    if use_triton(x) and supports(x, w):
        return gemv_4bit_triton(x, w, bias)
    if use_triton(x):
        weight = dequantize_4bit(w, x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    return gemv_4bit_reference(x, w, bias)
