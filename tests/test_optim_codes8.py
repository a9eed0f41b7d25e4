"""The optimizer's table-lookup 8-bit codes equal loraforge.quant's blockwise quantization."""

from __future__ import annotations

import pytest
import torch

from loraforge.optim.codes8 import CodeTable
from loraforge.quant.blockwise import dequantize_blockwise, quantize_blockwise
from loraforge.quant.codebooks import dynamic_map


@pytest.mark.parametrize("signed", [True, False])
def test_codes_equal_quant_blockwise(signed):
    code = dynamic_map(signed=signed)
    table = CodeTable(code)
    gen = torch.Generator().manual_seed(0)
    n = 256 * 40 + 77  # a partial last block
    x = torch.randn(n, generator=gen) * torch.logspace(-9, 0, n)[torch.randperm(n, generator=gen)]
    if not signed:
        x = x.abs()
    x[256:512] = 0.0  # an all-zero block
    x[1024:1280] = code[torch.randint(0, 256, (256,), generator=gen)] * 3.0  # exact codes ...
    x[1280:1536] = ((code[1:] + code[:-1]) / 2)[torch.randint(0, 255, (256,), generator=gen)]  # ... and ties
    x[1280] = 1.0
    x[2000] = -0.0
    codes, absmax = torch.empty(n, dtype=torch.uint8), torch.empty(41)
    table.quantize(x, codes, absmax, 256)
    want_codes, want_absmax = quantize_blockwise(x, code, 256)
    assert torch.equal(absmax[:-1], want_absmax[:-1]) and absmax[-1] == want_absmax[-1]
    assert torch.equal(codes, want_codes)
    # nearest code, ties to the lower one, spelled out
    y = x[:1536].view(-1, 256) / absmax[:6].clamp(min=1e-38).unsqueeze(1)
    below = ((code[1:] + code[:-1]) / 2 < y.reshape(-1, 1)).sum(dim=1)
    assert torch.equal(codes[:1536].long(), below)
    got = table.dequantize(codes, absmax, 256)
    assert torch.equal(got, dequantize_blockwise(codes, absmax, code, 256, (n,), torch.float32))
