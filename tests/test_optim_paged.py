"""Paged optimizers give the same updates as their unpaged twins, on CPU and (when present) CUDA."""

from __future__ import annotations

import pytest
import torch

from loraforge.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _params(device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    big = (400, 300) if device == "cuda" else (70, 100)  # CUDA: >= 1e5 elements, so paged
    shapes = [big, (64, 80), (50,)]  # (paged,) 8-bit unpaged, 32-bit small
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def _run(make, init, steps=4, groups=False, seed=1):
    params = [torch.nn.Parameter(t.clone()) for t in init]
    spec = [{"params": params[:1], "lr": 2e-3}, {"params": params[1:], "weight_decay": 0.0}] if groups else params
    opt = make(spec)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        opt.step()
    return params, opt


def _assert_same(a, b):
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("groups", [False, True])
def test_paged_adamw_is_torch_adamw_on_cpu(groups):
    init = _params()
    kw = dict(lr=1e-3, weight_decay=0.1)
    ours, opt = _run(lambda ps: PagedAdamW(ps, **kw), init, groups=groups)
    ref, ref_opt = _run(lambda ps: torch.optim.AdamW(ps, **kw), init, groups=groups)
    _assert_same(ours, ref)
    for p, q in zip(ours, ref):
        assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("groups", [False, True])
def test_paged_adamw8bit_is_adamw8bit_on_cpu(groups):
    init = _params()
    kw = dict(lr=1e-3, weight_decay=0.1)
    ours, opt = _run(lambda ps: PagedAdamW8bit(ps, **kw), init, groups=groups)
    ref, ref_opt = _run(lambda ps: AdamW8bit(ps, **kw), init, groups=groups)
    _assert_same(ours, ref)
    for p, q in zip(ours, ref):
        for key, value in ref_opt.state[q].items():
            mine = opt.state[p][key]
            assert torch.equal(mine, value) if torch.is_tensor(value) else mine == value


@cuda
@pytest.mark.parametrize("fused", [False, True])
def test_paged_adamw_on_cuda_equals_torch_and_keeps_states_pinned(fused):
    init = _params("cuda")
    kw = dict(lr=1e-3, weight_decay=0.1, fused=fused)
    ours, opt = _run(lambda ps: PagedAdamW(ps, **kw), init, groups=True)
    ref, _ = _run(lambda ps: torch.optim.AdamW(ps, **kw), init, groups=True)
    torch.cuda.synchronize()
    _assert_same(ours, ref)
    big, small = ours[0], ours[1]
    assert not opt.state[big]["exp_avg"].is_cuda and opt.state[big]["exp_avg"].is_pinned()
    assert opt.state[small]["exp_avg"].is_cuda


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_adamw8bit_on_cuda_equals_unpaged(dtype):
    init = _params("cuda", dtype)
    kw = dict(lr=1e-3, weight_decay=0.1)
    ours, opt = _run(lambda ps: PagedAdamW8bit(ps, **kw), init)
    ref, ref_opt = _run(lambda ps: AdamW8bit(ps, **kw), init)
    torch.cuda.synchronize()
    _assert_same(ours, ref)
    state = opt.state_dict()["state"][0]
    assert torch.equal(state["state1"].cuda(), ref_opt.state[ref[0]]["state1"])
    assert opt.state[ours[0]]["state1"].is_pinned() and not opt.state[ours[0]]["absmax1"].is_cuda


@cuda
def test_paged_state_dict_resumes_on_cuda():
    init = _params("cuda")
    params, opt = _run(lambda ps: PagedAdamW8bit(ps, lr=1e-3), init, steps=2)
    saved = opt.state_dict()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = PagedAdamW8bit(twin, lr=1e-3)
    resumed.load_state_dict(saved)
    assert resumed.state[twin[0]]["state1"].is_pinned()
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        for p, q in zip(params, twin):
            p.grad = torch.randn(p.shape, generator=gen).cuda()
            q.grad = p.grad.clone()
        opt.step()
        resumed.step()
    torch.cuda.synchronize()
    _assert_same(params, twin)
