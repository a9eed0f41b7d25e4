"""Shared pieces of the quantization tests: bitsandbytes (the reference, CPU backend) and
straightforward re-implementations that the tests compare loraforge against."""

from __future__ import annotations

import math

import pytest
import torch


def bnb_functional():
    """``bitsandbytes.functional`` (the tests' reference), skipping when it is not installed."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    return F


@pytest.fixture(scope="module")
def eager_bnb():
    """bitsandbytes wraps some CPU fallbacks in torch.compile; run them eagerly in this module
    (same arithmetic, no compilation per shape), then restore the setting."""
    import torch._dynamo

    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = before


def nearest_by_midpoints(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest sorted-code value: the number of float32 midpoints strictly below x."""
    values, order = torch.sort(code, stable=True)
    mids = (values[:-1] + values[1:]) / 2
    return order[(x.unsqueeze(-1) > mids).sum(-1)].to(torch.uint8)


def reference_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Blockwise absmax quantization written plainly, block by block (bitsandbytes' CPU rules:
    multiply by 1/absmax in full blocks, divide in the partial last block, clamp to [-1, 1])."""
    flat = x.reshape(-1).float()
    codes, absmax = [], []
    for start in range(0, flat.numel(), blocksize):
        block = flat[start : start + blocksize]
        amax = block.abs().max().clamp(min=1e-38)
        if block.numel() == blocksize:
            scaled = block * (1.0 / amax)
            absmax.append(block.abs().max())
        else:
            scaled = block / amax
            absmax.append(amax)
        codes.append(nearest_by_midpoints(scaled.clamp(-1, 1), code))
    return torch.cat(codes), torch.stack(absmax)


def reference_dequantize(codes, absmax, code, blocksize, shape, dtype):
    n = math.prod(shape)
    scales = absmax.float().repeat_interleave(blocksize)[:n]
    return (code.float()[codes.long()][:n] * scales).to(dtype).reshape(shape)


def bnb_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization as its portable PyTorch backend (and CUDA) computes it.

    Its AVX-512 CPU kernel, which ``bitsandbytes.functional.dequantize_4bit`` picks on such
    machines, indexes the block scales per row: when a row is a multiple of 16 elements but not of
    the block size, blocks that straddle rows get the wrong scale. Compare with that kernel only
    where rows align with blocks (:func:`rows_align`), and with this function everywhere.
    """
    F = bnb_functional()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = F.get_4bit_type(state.quant_type, device="cpu")
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), code, state.blocksize, state.shape, state.dtype)


def rows_align(shape, blocksize: int) -> bool:
    return shape[-1] % blocksize == 0
