"""RMSNorm, SwiGLU / GeGLU and RoPE: the Triton kernels (interpreted on CPU) forward and backward
against float64 autograd of the PyTorch references (which are transformers' formulas), and the
references against transformers' own modules (Llama, Gemma 2, OLMo 2 norms; Phi-3's partial RoPE).

Tolerances (relative error ||out - ref|| / ||ref||): float32 <= 1e-5; bfloat16 inputs <= 2e-2
(Triton's interpreter truncates to bfloat16 where the GPU rounds to nearest, so bf16 results are
compared at bf16 precision, not bit for bit).
"""

from __future__ import annotations

import pytest
import torch
from helpers_kernels import rel_err, triton_interpret  # noqa: F401

from loraforge.kernels.rmsnorm import RMSNormFunction, rmsnorm, rmsnorm_reference
from loraforge.kernels.rope import RoPEFunction, apply_rope, rope_reference
from loraforge.kernels.swiglu import SwiGLUFunction, swiglu_backward_in_place, swiglu_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _grads(fn, inputs, dy):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, [t for t in inputs if t.requires_grad], dy)


def _f64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm(triton_interpret, dtype):
    x = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)  # H = 40: a masked tail of the block
    w = (1 + 0.1 * torch.randn(40, dtype=dtype)).requires_grad_()
    dy = torch.randn(3, 5, 40, dtype=dtype)
    out, (dx, dw) = _grads(lambda a, b: RMSNormFunction.apply(a, b, 1e-5), (x, w), dy)
    ref, (rdx, rdw) = _grads(lambda a, b: rmsnorm_reference(a, b, 1e-5), _f64(x, w), dy.double())
    assert out.dtype == dtype
    for got, want in ((out, ref), (dx, rdx), (dw, rdw)):
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("style", ["gemma", "olmo2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_styles(triton_interpret, dtype, style):
    x = torch.randn(6, 40, dtype=dtype, requires_grad=True)
    w = (0.3 * torch.randn(40, dtype=dtype)).requires_grad_()
    dy = torch.randn(6, 40, dtype=dtype)
    out, (dx, dw) = _grads(lambda a, b: RMSNormFunction.apply(a, b, 1e-6, style), (x, w), dy)
    ref, (rdx, rdw) = _grads(lambda a, b: rmsnorm_reference(a, b, 1e-6, style), _f64(x, w), dy.double())
    assert out.dtype == dtype
    for got, want in ((out, ref), (dx, rdx), (dw, rdw)):
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(triton_interpret, dtype, act):
    g = (3 * torch.randn(7, 50, dtype=dtype)).requires_grad_()
    u = torch.randn(7, 50, dtype=dtype, requires_grad=True)
    dh = torch.randn(7, 50, dtype=dtype)
    out, grads = _grads(lambda a, b: SwiGLUFunction.apply(a, b, act), (g, u), dh)
    ref, rgrads = _grads(lambda a, b: swiglu_reference(a, b, act), _f64(g, u), dh.double())
    for got, want in ((out, ref), *zip(grads, rgrads)):
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_in_place(dtype, act):
    """The PyTorch path's backward writes dg over g and du over u, here the two column halves of
    one [rows, 2I] product (Phi-3's gate_up_proj), as float64 autograd of the reference."""
    gu = torch.cat([3 * torch.randn(7, 50), torch.randn(7, 50)], dim=1).to(dtype)
    dh = torch.randn(7, 50, dtype=dtype)
    halves64 = [t.double().requires_grad_() for t in gu.chunk(2, dim=1)]
    _, (want_dg, want_du) = _grads(lambda a, b: swiglu_reference(a, b, act), halves64, dh.double())
    g, u = gu.chunk(2, dim=1)
    swiglu_backward_in_place(dh, g, u, act)
    assert rel_err(g, want_dg) < TOL[dtype] and rel_err(u, want_du) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope(triton_interpret, dtype):
    B, H, S, D = 2, 3, 5, 16
    q = torch.randn(B, S, H, D, dtype=dtype).transpose(1, 2).requires_grad_()  # strided, as attention makes it
    angles = torch.rand(B, S, D // 2) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    dy = torch.randn(B, H, S, D, dtype=dtype)
    out, (dq,) = _grads(lambda t: RoPEFunction.apply(t, cos, sin), (q,), dy)
    ref, (rdq,) = _grads(lambda t: rope_reference(t, cos.double(), sin.double()), _f64(q), dy.double())
    assert rel_err(out, ref) < TOL[dtype] and rel_err(dq, rdq) < TOL[dtype]


def test_rope_matches_transformers(triton_interpret):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    cos, sin = torch.randn(1, 6, 8), torch.randn(1, 6, 8)  # any values: cos1 != cos2 checks the halves
    for got, want in zip(apply_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert rel_err(got, want) < 1e-6


def test_partial_rope_matches_phi3(triton_interpret):
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    q, k = torch.randn(1, 4, 6, 8).requires_grad_(), torch.randn(1, 2, 6, 8)
    cos, sin = torch.randn(1, 6, 4), torch.randn(1, 6, 4)  # rotary dim 4 of 8
    got, want = apply_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6
    dq = torch.randn_like(q)
    assert rel_err(torch.autograd.grad(got[0], q, dq)[0], torch.autograd.grad(want[0], q, dq)[0]) < 1e-6


@pytest.mark.parametrize("module, style", [("llama.modeling_llama.LlamaRMSNorm", "llama"),
                                           ("gemma2.modeling_gemma2.Gemma2RMSNorm", "gemma"),
                                           ("olmo2.modeling_olmo2.Olmo2RMSNorm", "olmo2")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(triton_interpret, module, style, dtype):
    import importlib

    path, name = module.rsplit(".", 1)
    norm = getattr(importlib.import_module(f"transformers.models.{path}"), name)(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 24, dtype=dtype)
    got, want = rmsnorm_reference(x, norm.weight, 1e-6, style), norm(x)
    assert got.dtype == want.dtype and torch.equal(got, want)  # the reference is transformers' formula, bit for bit
    kernel = rmsnorm(x, norm.weight, 1e-6, style)  # the Triton kernel, interpreted
    assert kernel.dtype == want.dtype and rel_err(kernel, want) < TOL[dtype]


def test_dispatch_rules(monkeypatch):
    from loraforge.kernels import dispatch

    cpu = torch.empty(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LORAFORGE_KERNELS", raising=False)
    assert not dispatch.use_triton(cpu)  # CPU tensors: the reference
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton(cpu) == dispatch.triton_importable()  # CI: the kernels, interpreted
    monkeypatch.setenv("LORAFORGE_KERNELS", "reference")
    assert not dispatch.use_triton(cpu)
