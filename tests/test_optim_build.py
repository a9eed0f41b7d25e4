"""build_optimizer names and errors; optimizer_state_bytes."""

from __future__ import annotations

import math

import pytest
import torch

from loraforge.errors import UserError
from loraforge.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit, build_optimizer, optimizer_state_bytes


def _params():
    return [torch.nn.Parameter(torch.randn(s)) for s in [(64, 100), (5000,), (10, 10)]]


@pytest.mark.parametrize(
    "name, cls",
    [("adamw", torch.optim.AdamW), ("adamw8bit", AdamW8bit), ("paged_adamw", PagedAdamW), ("paged_adamw8bit", PagedAdamW8bit)],
)
def test_names(name, cls):
    opt = build_optimizer(name, _params(), lr=3e-4, weight_decay=0.01, betas=(0.8, 0.95), eps=1e-6)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (3e-4, 0.01, (0.8, 0.95), 1e-6)


def test_param_groups_are_accepted():
    a, b, c = _params()
    opt = build_optimizer("adamw8bit", [{"params": [a, b]}, {"params": [c], "lr": 1.0}], lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1.0]


def test_unknown_name_says_what_was_meant():
    with pytest.raises(UserError) as err:
        build_optimizer("adamw_8bit", _params(), lr=1e-3)
    assert err.value.where == "train.optimizer"
    assert 'did you mean "adamw8bit"' in str(err.value)
    assert "paged_adamw8bit" in str(err.value)


def test_state_bytes_8bit_is_about_two_bytes_per_parameter():
    params = _params()
    opt = build_optimizer("adamw8bit", params, lr=1e-3)
    big = 64 * 100 + 5000
    expected = 2 * big + 2 * 4 * (math.ceil(6400 / 256) + math.ceil(5000 / 256)) + 2 * 4 * 100
    assert optimizer_state_bytes(opt) == expected  # projected before the first step
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == expected  # counted from the real state tensors
    assert 2.0 < (expected - 800) / big < 2.05


def test_state_bytes_matches_bitsandbytes_state():
    bnb = pytest.importorskip("bitsandbytes")
    params = _params()
    ours = build_optimizer("adamw8bit", params, lr=1e-3)
    theirs = bnb.optim.AdamW8bit([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    for group in theirs.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    theirs.step()
    code_books = 2 * 256 * 4  # bnb keeps its two maps in the state (shared, counted once)
    assert optimizer_state_bytes(theirs) - code_books == optimizer_state_bytes(ours)


def test_state_bytes_adamw():
    params = _params()
    opt = build_optimizer("adamw", params, lr=1e-3)
    n = sum(p.numel() for p in params)
    projected = optimizer_state_bytes(opt)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert projected == optimizer_state_bytes(opt) == 8 * n + 4 * len(params)
