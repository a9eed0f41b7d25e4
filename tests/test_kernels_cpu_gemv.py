"""The compiled 4-bit CPU kernel (loraforge/kernels/cpu_gemv.py): the fused decode product equals
``F.linear`` on the reference-dequantized weight to float32 rounding (odd shapes, both scale
formats, NF4 and FP4, bias), its dequantization gives the reference's bits, QuantLinear takes the
fused path exactly where it should, a whole 4-bit Llama with a LoRA adapter gives the reference
path's logits and greedy tokens, and a missing compiler falls back with one notice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraforge.kernels import cpu_gemv, dispatch
from loraforge.kernels.dequant import dequantize_4bit_reference, packed_from_layer
from loraforge.kernels.lora_linear import _BUFFERS, release_buffers
from loraforge.quant import QuantLinear, quantize_model

from helpers_kernels import reference_kernels  # noqa: F401

pytestmark = pytest.mark.skipif(cpu_gemv.library() is None, reason="no C compiler: the kernel cannot be built")


def quant_layer(n, k, quant_type="nf4", blocksize=64, double_quant=True, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias)
    return QuantLinear.from_linear(linear, quant_type, blocksize=blocksize, double_quant=double_quant)


# (N, K, blocksize): K % 32 == 0 takes the vector path (blocks aligned to rows or not), else the
# scalar one (rows starting in a low nibble, a partial last block)
SHAPES = [(1536, 576, 64), (33, 96, 64), (40, 96, 32), (7, 70, 32), (5, 33, 64), (64, 4096 + 32, 4096)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16])
def test_fused_product_equals_linear_on_the_reference_weight(shape, double_quant, rows):
    n, k, blocksize = shape
    layer = quant_layer(n, k, blocksize=blocksize, double_quant=double_quant)
    w = packed_from_layer(layer)
    x = torch.randn(rows, k)
    weight = dequantize_4bit_reference(w)
    exact = F.linear(x.double(), weight.double(), layer.bias.double())
    fused = cpu_gemv.gemv_4bit_cpu(x, w, layer.bias)
    blas = F.linear(x, weight, layer.bias)
    # float32 rounding of a length-K sum: both within a few ulps of sum |x w| of the exact product
    bound = 1e-6 * (x.abs().double() @ weight.abs().double().T) + 1e-7
    assert fused.dtype == torch.float32 and fused.shape == (rows, n)
    assert bool(((fused.double() - exact).abs() <= bound).all())
    assert bool(((blas.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fused_product_for_fp4_and_a_batched_strided_input(quant_type):
    layer = quant_layer(48, 128, quant_type=quant_type, bias=False)
    w = packed_from_layer(layer)
    x = torch.randn(2, 3, 256)[..., ::2]  # [2, 3, 128], last stride 2
    out = cpu_gemv.gemv_4bit_cpu(x, w)
    torch.testing.assert_close(out, F.linear(x, dequantize_4bit_reference(w)), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 3, 48)


@pytest.mark.parametrize("shape", [(33, 7, 32), (24, 96, 64), (1536, 576, 64), (3, 1001, 128)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantization_gives_the_reference_bits(shape, double_quant):
    n, k, blocksize = shape
    w = packed_from_layer(quant_layer(n, k, blocksize=blocksize, double_quant=double_quant))
    out = torch.empty(n, k)
    cpu_gemv.dequantize_4bit_cpu(w, out)
    assert torch.equal(out, dequantize_4bit_reference(w))
    out16 = torch.empty(n, k, dtype=torch.bfloat16)
    cpu_gemv.dequantize_4bit_cpu(w, out16)  # rounded as torch rounds float32 to bfloat16
    assert torch.equal(out16, dequantize_4bit_reference(w).to(torch.bfloat16))


def test_quant_linear_takes_the_fused_path_only_for_few_rows_without_grad(monkeypatch):
    layer = quant_layer(40, 96)
    calls = []
    real = cpu_gemv.DecodePlan.__call__
    monkeypatch.setattr(cpu_gemv.DecodePlan, "__call__", lambda self, x: calls.append(x.shape) or real(self, x))
    with torch.no_grad():
        rows = cpu_gemv.MAX_ROWS
        x = torch.randn(2, rows // 2, 96)  # MAX_ROWS rows: fused
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-5)
        layer(torch.randn(rows + 1, 96))  # one more: dequantize + one GEMM
        assert layer(torch.randn(0, 96)).shape == (0, 40)  # no rows: nothing to fuse
        layer(torch.randn(2, 96).bfloat16())  # compute dtype float32: fused after the cast
    assert calls == [(2, rows // 2, 96), (2, 96)]
    x = torch.randn(3, 96, requires_grad=True)
    out = layer(x)  # a gradient is wanted: the autograd path
    out.sum().backward()
    assert len(calls) == 2 and x.grad is not None
    bf16 = QuantLinear.from_linear(torch.nn.Linear(96, 40), "nf4", compute_dtype=torch.bfloat16)
    with torch.no_grad():
        bf16(torch.randn(1, 96))
    assert len(calls) == 2  # bfloat16 compute keeps the reference


def test_reference_mode_turns_the_kernel_off(reference_kernels, monkeypatch):  # noqa: F811
    monkeypatch.setattr(cpu_gemv.DecodePlan, "__call__", lambda *a: pytest.fail("fused path used"))
    layer = quant_layer(40, 96)
    with torch.no_grad():
        x = torch.randn(1, 96)
        assert torch.equal(layer(x), F.linear(x, layer.dequantize(), layer.bias))


def test_large_rows_dequantize_into_one_reused_buffer():
    release_buffers()
    a, b = quant_layer(64, 128, seed=1), quant_layer(96, 64, seed=2)
    with torch.no_grad():
        for layer in (a, b, a):
            x = torch.randn(cpu_gemv.MAX_ROWS + 8, layer.in_features)
            assert torch.equal(layer(x), F.linear(x, layer.dequantize(), layer.bias))
    assert len(_BUFFERS) == 1
    (buffer,) = _BUFFERS.values()
    assert buffer.numel() == 64 * 128  # the largest layer's size, allocated once


def _lora_llama(tiny_llama):
    from loraforge.adapters import LoraConfig, attach

    model = quantize_model(tiny_llama(hidden_size=128, intermediate_size=224, vocab_size=256), "nf4",
                           blocksize=64, double_quant=True)
    adapted = attach(model, LoraConfig(r=8, alpha=16, targets="all-linear"))
    torch.manual_seed(1)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a trained-looking adapter, not a zero update
    return adapted.eval()


def test_4bit_llama_with_lora_gives_the_reference_logits_and_greedy_tokens(tiny_llama, monkeypatch):
    model = _lora_llama(tiny_llama)
    prompt = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        fused_logits = model(input_ids=prompt[:1]).logits  # 7 rows: fused everywhere
        fused_tokens = model.model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    monkeypatch.setenv("LORAFORGE_KERNELS", "reference")
    with torch.no_grad():
        ref_logits = model(input_ids=prompt[:1]).logits
        ref_tokens = model.model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert not torch.equal(fused_logits, ref_logits)  # two different computations ...
    torch.testing.assert_close(fused_logits, ref_logits, rtol=1e-5, atol=1e-5)  # ... to fp32 rounding
    assert torch.equal(fused_tokens, ref_tokens)


def test_missing_compiler_falls_back_with_one_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_gemv, "_compiler", lambda: None)
    monkeypatch.setattr(dispatch, "_SEEN", set())
    cpu_gemv._load.cache_clear()
    try:
        layer = quant_layer(40, 96)
        with torch.no_grad():
            x = torch.randn(1, 96)
            for _ in range(2):
                assert torch.equal(layer(x), F.linear(x, layer.dequantize(), layer.bias))
        err = capsys.readouterr().err
        assert err.count("no C compiler found") == 1
        assert cpu_gemv.library() is None and not list(tmp_path.glob("kernels/*.so"))
    finally:
        cpu_gemv._load.cache_clear()


def test_the_build_is_cached_per_source_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path))
    cpu_gemv._load.cache_clear()
    try:
        assert cpu_gemv.library() is not None
        (built,) = tmp_path.glob("kernels/gemv4bit_cpu-*.so")
        cpu_gemv._load.cache_clear()

        def no_compiler(*args, **kwargs):
            raise AssertionError("rebuilt although cached")

        monkeypatch.setattr(cpu_gemv.subprocess, "run", no_compiler)
        assert cpu_gemv.library() is not None
        assert list(tmp_path.glob("kernels/*.so")) == [built]
    finally:
        cpu_gemv._load.cache_clear()


def test_kept_kernel_arguments_follow_replaced_and_reloaded_buffers():
    a, b = quant_layer(40, 96, seed=1), quant_layer(40, 96, seed=2)
    x = torch.randn(1, 96)
    with torch.no_grad():
        expected = b(x)
        a(x)  # arguments kept for a's buffers
        a.load_state_dict(b.state_dict())  # copied in place: same addresses, new values
        torch.testing.assert_close(a(x), expected, rtol=0, atol=0)
        c = quant_layer(40, 96, seed=3)
        for name in ("qweight", "absmax", "nested_absmax", "offset"):
            setattr(a, name, getattr(c, name).clone())  # new tensors: new addresses
        torch.testing.assert_close(a(x), F.linear(x, c.dequantize(), a.bias), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a(x), expected, atol=1e-2)


# ----- the float32 small-row product (a decode step's head) ---------------------------------------

@pytest.mark.parametrize("shape", [(1536, 576), (49, 96), (7, 70), (1, 8), (2, 3)])  # odd N, K % 8 != 0
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 32])
@pytest.mark.parametrize("bias", [True, False])
def test_float32_product_equals_linear_to_rounding(shape, rows, bias):
    n, k = shape
    torch.manual_seed(rows)
    weight, x = torch.randn(n, k), torch.randn(rows, k)
    b = torch.randn(n) if bias else None
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    out = cpu_gemv.linear_f32_cpu(x, weight, b)
    bound = 1e-6 * (x.abs().double() @ weight.abs().double().T) + 1e-7
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    assert bool(((out.double() - exact).abs() <= bound).all())


def test_float32_product_of_a_batched_strided_input():
    weight = torch.randn(40, 64)
    x = torch.randn(2, 3, 128)[..., ::2]  # [2, 3, 64], last stride 2
    out = cpu_gemv.linear_f32_cpu(x, weight)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 3, 40)
    with pytest.raises(ValueError, match="float32"):
        cpu_gemv.linear_f32_cpu(x.double(), weight)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_gemv.linear_f32_cpu(x, torch.randn(64, 40).t())


def test_small_linear_takes_the_kernel_only_for_a_plain_float32_linear_without_grad(monkeypatch):
    calls = []
    real = cpu_gemv.linear_f32_cpu
    monkeypatch.setattr(cpu_gemv, "linear_f32_cpu", lambda x, w, b=None: calls.append(x.shape) or real(x, w, b))
    head = torch.nn.Linear(64, 300)
    rows = cpu_gemv.F32_MAX_ROWS
    with torch.no_grad():
        x = torch.randn(2, rows // 2, 64)
        torch.testing.assert_close(cpu_gemv.small_linear(head, x), head(x), rtol=1e-5, atol=1e-5)
        more = torch.randn(rows + 1, 64)
        assert torch.equal(cpu_gemv.small_linear(head, more), head(more))  # one row more: the module
        cpu_gemv.small_linear(head.bfloat16(), torch.randn(1, 64).bfloat16())  # bfloat16: the module
        head.float()
        handle = head.register_forward_hook(lambda *a: None)
        cpu_gemv.small_linear(head, torch.randn(1, 64))  # a hook: the module, so that it runs
        handle.remove()
    assert calls == [(2, rows // 2, 64)]
    x = torch.randn(1, 64, requires_grad=True)
    cpu_gemv.small_linear(head, x).sum().backward()  # a gradient is wanted: the module
    assert calls == [(2, rows // 2, 64)] and x.grad is not None


def test_small_linear_in_reference_mode_is_the_module(reference_kernels, monkeypatch):  # noqa: F811
    monkeypatch.setattr(cpu_gemv, "linear_f32_cpu", lambda *a: pytest.fail("kernel used"))
    head = torch.nn.Linear(64, 30)
    with torch.no_grad():
        x = torch.randn(1, 64)
        assert torch.equal(cpu_gemv.small_linear(head, x), head(x))
