"""LLM.int8 (quant.int8_rowwise) against bitsandbytes' CPU backend, which is imported here only:
the int8 codes and row scales of a weight are the very bytes ``Int8Params`` makes, and a layer's
output and input gradient are bit for bit those of ``Linear8bitLt`` (eval mode: ``MatMul8bitLt``,
the mixed-precision decomposition) for float32, bfloat16 and float16 inputs, with and without
outlier columns and with the decomposition off (threshold 0)."""

from __future__ import annotations

import logging

import pytest
import torch

from loraforge.errors import UserError
from loraforge.quant.int8_rowwise import (
    Int8Linear,
    dequantize_rowwise,
    int8_matmul,
    quantize_rowwise,
)

bnb = pytest.importorskip("bitsandbytes")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bnb_layer(linear: torch.nn.Linear, threshold: float):
    ref = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              has_fp16_weights=False, threshold=threshold)
    ref.load_state_dict(linear.state_dict())
    return ref.to("cpu").eval()  # Int8Params quantizes on the move


def inputs_with_outliers(dtype, *shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    x[..., 3] *= 20  # an outlier feature column, as LLM.int8 finds in large models
    x.view(-1, shape[-1])[0, 7] = 9.0  # and a single outlier
    return x.to(dtype)


@pytest.fixture(autouse=True)
def _quiet_bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weights_and_scales_are_bitsandbytes_bytes(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(80, 48).to(dtype)
    with torch.no_grad():
        linear.weight[5] *= 300  # a row far outside float16's fine range
    ref = bnb_layer(linear, 6.0)
    ours = Int8Linear.from_linear(linear)
    assert ours.qweight.dtype == torch.int8 and ours.scb.dtype == torch.float32
    assert torch.equal(ours.qweight, ref.weight.data) and torch.equal(ours.scb, ref.weight.SCB)
    # dequantization as bitsandbytes (and PEFT's merge) computes it
    expected = bnb.functional.int8_vectorwise_dequant(ref.weight.data, ref.weight.SCB)
    assert torch.equal(ours.dequantize(torch.float32), expected)
    assert ours.compute_dtype == dtype and ours.dequantize().dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 80), (2, 5, 80)], ids=["one-row", "batch"])
def test_forward_and_input_gradient_equal_bitsandbytes(dtype, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(80, 48).to(dtype)
    ref, ours = bnb_layer(linear, 6.0), Int8Linear.from_linear(linear, threshold=6.0)
    x = inputs_with_outliers(dtype, *shape)
    assert quantize_rowwise(x.view(-1, 80), 6.0)[2].numel() > 0  # the decomposition is exercised
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    assert y_ours.dtype == dtype and torch.equal(y_ours, y_ref)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_ours.backward(grad)
    assert torch.equal(x_ours.grad, x_ref.grad)

    ref.state.threshold = ours.threshold = 0.0  # no decomposition: every column in int8
    assert torch.equal(ours(x), ref(x))
    full = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    # the outlier columns are what int8 alone gets wrong
    err_mixed = (int8_matmul(x, ours.qweight, ours.scb, ours.bias, 6.0).float() - full).abs().max()
    err_int8 = (int8_matmul(x, ours.qweight, ours.scb, ours.bias, 0.0).float() - full).abs().max()
    assert err_mixed < err_int8


def test_autocast_does_not_round_the_integer_product():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(256, 32))
    x = inputs_with_outliers(torch.float32, 4, 256) * 30  # int32 sums far beyond bfloat16's 8 bits
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_activation_quantization_equals_bitsandbytes():
    x = inputs_with_outliers(torch.float16, 6, 32)
    for threshold in (0.0, 6.0):
        codes, scales, cols = quantize_rowwise(x, threshold)
        ref_codes, ref_scales, ref_cols = bnb.functional.int8_vectorwise_quant(x.clone(), threshold)
        assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
        assert (cols is None) == (ref_cols is None)
        if cols is not None:
            assert torch.equal(cols, ref_cols) and 3 in cols.tolist() and 7 in cols.tolist()


def test_round_trip_error_is_half_a_step_per_row():
    w16 = torch.randn(16, 64).to(torch.float16).float()  # bitsandbytes quantizes the float16 weight
    codes, scb, _ = quantize_rowwise(w16)
    step = w16.abs().amax(dim=1, keepdim=True) / 127
    error = (dequantize_rowwise(codes, scb) - w16).abs()
    assert (error <= step * (0.5 + 1e-5)).all() and (error > step / 4).any()


def test_layer_state_and_casts():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(32, 8))
    assert layer.bits_per_parameter() == 8 + 32 / 32
    assert not any(p.requires_grad for p in layer.parameters())
    layer.half()
    assert layer.qweight.dtype == torch.int8 and layer.scb.dtype == torch.float32 and layer.bias.dtype == torch.float16
    again = Int8Linear.from_quantized(layer.qweight, layer.scb, bias=layer.bias, threshold=layer.threshold)
    x = torch.randn(3, 32)
    assert torch.equal(again(x), Int8Linear.from_quantized(layer.qweight, layer.scb, bias=layer.bias)(x))
    assert "llm_int8" in repr(layer) and "threshold=6.0" in repr(layer)
    with pytest.raises(UserError, match="int8"):
        Int8Linear.from_quantized(layer.qweight.float(), layer.scb)
    with pytest.raises(UserError, match="SCB"):
        Int8Linear.from_quantized(layer.qweight, layer.scb[:-1])
    with pytest.raises(UserError, match=">= 0"):
        Int8Linear(4, 4, threshold=-1.0)
