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
