"""Optimizer state dicts round-trip through torch.save and resume bit-identically."""

from __future__ import annotations

import io

import pytest
import torch

from loraforge.optim import OPTIMIZERS, build_optimizer


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(80, 96), (3000,), (7, 9)]]


def _steps(params, opt, gen, n):
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_continues_bit_identically(name, dtype):
    params = _params(dtype)
    opt = build_optimizer(name, params, lr=1e-3, weight_decay=0.1)
    _steps(params, opt, torch.Generator().manual_seed(1), 3)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = build_optimizer(name, twin, lr=1e-3, weight_decay=0.1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))

    for p, q in zip(params, twin):  # same dtypes as saved: 8-bit codes stay uint8, absmax fp32
        for key, value in opt.state[p].items():
            loaded = resumed.state[q][key]
            if torch.is_tensor(value):
                assert loaded.dtype == value.dtype and torch.equal(loaded, value), key
            else:
                assert loaded == value

    _steps(params, opt, torch.Generator().manual_seed(2), 3)
    _steps(twin, resumed, torch.Generator().manual_seed(2), 3)
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(resumed.state[q][key], value), key
