"""QuantLinear: forward/backward equal F.linear with the dequantized weight, gradients reach the
input only, no full-precision copy is kept, dtype casts leave the quantized state intact, the
memory figures (4.5 / ~4.127 bits per parameter at block 64), and quantize_model on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers_quant import bnb_dequantize_4bit, bnb_functional, eager_bnb  # noqa: F401
from loraforge.errors import UserError
from loraforge.quant import QuantLinear, get_codebook, quantize_model

pytestmark = pytest.mark.usefixtures("eager_bnb")

KBIT = ["nf4", "fp4", "nf2", "nf3", "int2", "int4", "int8"]


def make_linear(in_f=96, out_f=40, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("quant_type", KBIT)
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_backward_equal_linear_on_dequantized_weight(quant_type, double_quant):
    linear = make_linear(in_f=70, out_f=33)
    layer = QuantLinear.from_linear(linear, quant_type, blocksize=32, double_quant=double_quant)
    weight = layer.dequantize()
    assert weight.shape == (33, 70)

    x = torch.randn(3, 5, 70, requires_grad=True)
    out = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = F.linear(x_ref, weight, linear.bias.detach())
    assert torch.equal(out, ref)

    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.bias.grad is None


def test_quantization_error_is_bounded_by_the_code_spacing():
    linear = make_linear(in_f=256, out_f=64)
    for quant_type in ["int8", "nf4", "nf2", "fp4"]:
        values = get_codebook(quant_type).sort().values
        worst = (values[1:] - values[:-1]).max() / 2  # no value is further than half the widest gap
        layer = QuantLinear.from_linear(linear, quant_type, blocksize=64, double_quant=False)
        blocks = linear.weight.detach().reshape(-1, 64)
        err = (layer.dequantize().reshape(-1, 64) - blocks).abs().amax(1)
        assert bool((err <= worst * blocks.abs().amax(1) + 1e-7).all()), quant_type


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_features", [128, 96])
def test_dequantize_matches_bitsandbytes(quant_type, dtype, in_features):
    Fb = bnb_functional()
    linear = make_linear(in_f=in_features, out_f=24, dtype=dtype)
    layer = QuantLinear.from_linear(linear, quant_type, blocksize=64, double_quant=True)
    packed, state = Fb.quantize_4bit(linear.weight.data, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(layer.qweight, packed.view(-1))
    assert torch.equal(layer.dequantize(dtype), bnb_dequantize_4bit(packed, state))
    if in_features % 64 == 0:  # see bnb_dequantize_4bit for bnb's AVX-512 kernel on unaligned rows
        assert torch.equal(layer.dequantize(dtype), Fb.dequantize_4bit(packed, state))


def test_compute_dtype_and_input_dtype():
    linear = make_linear()
    layer = QuantLinear.from_linear(linear, "nf4", compute_dtype=torch.bfloat16)
    x = torch.randn(4, 96)
    out = layer(x)
    assert out.dtype == torch.float32
    ref = F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), linear.bias.detach().bfloat16()).float()
    assert torch.equal(out, ref)


def test_no_full_precision_copy_and_dtype_casts_keep_the_state():
    linear = make_linear(in_f=128, out_f=64)
    layer = QuantLinear.from_linear(linear, "nf4", blocksize=64, double_quant=True)
    n = 128 * 64
    tensors = dict(layer.named_buffers()) | dict(layer.named_parameters())
    assert all(t.numel() < n // 2 + 1 for t in tensors.values())
    assert all(t.is_floating_point() is False or t.numel() <= 256 for name, t in tensors.items())
    before = layer.dequantize()
    layer.half()
    assert layer.nested_absmax.dtype == torch.float32 and layer.quant_map.dtype == torch.float32
    assert layer.bias.dtype == torch.float16
    assert torch.equal(layer.dequantize(torch.float32), before)


def test_bits_per_parameter():
    linear = nn.Linear(4096, 1024, bias=False)
    n = 4096 * 1024
    plain = QuantLinear.from_linear(linear, "nf4", blocksize=64, double_quant=False)
    assert plain.bits_per_parameter() == 4.5
    nested = QuantLinear.from_linear(linear, "nf4", blocksize=64, double_quant=True)
    expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / n
    assert nested.bits_per_parameter() == pytest.approx(expected, rel=1e-12)
    assert nested.bits_per_parameter() == pytest.approx(4.127, abs=5e-4)
    two_bit = QuantLinear.from_linear(nn.Linear(256, 64), "nf2", blocksize=64, double_quant=False)
    assert two_bit.bits_per_parameter() == 2.5
    assert two_bit.qweight.numel() == 256 * 64 // 4


def test_from_quantized_rebuilds_the_layer_and_checks_sizes():
    layer = QuantLinear.from_linear(make_linear(), "fp4", blocksize=32, double_quant=True)
    from loraforge.quant.double_quant import NestedAbsmax

    nested = NestedAbsmax(layer.absmax, layer.nested_absmax, layer.offset, layer.nested_quant_map)
    again = QuantLinear.from_quantized(
        layer.qweight, layer.absmax, in_features=96, out_features=40, quant_type="fp4",
        blocksize=32, nested=nested, bias=layer.bias,
    )
    assert torch.equal(again.dequantize(), layer.dequantize())
    with pytest.raises(UserError, match="expected 1920 values"):
        QuantLinear.from_quantized(layer.qweight[:-1], layer.absmax, in_features=96, out_features=40,
                                   quant_type="fp4", blocksize=32, nested=nested)


def test_state_dict_round_trip_through_module_api():
    layer = QuantLinear.from_linear(make_linear(), "nf3", blocksize=64, double_quant=True)
    fresh = QuantLinear(96, 40, bias=True, quant_type="nf3", blocksize=64, double_quant=True)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantize(), layer.dequantize())


def test_repr_names_the_format():
    text = repr(QuantLinear.from_linear(make_linear(), "nf4", blocksize=128, double_quant=False))
    assert "quant_type=nf4" in text and "blocksize=128" in text and "double_quant=False" in text


def test_quantize_model_replaces_linears_but_lm_head(tiny_llama):
    model = tiny_llama()
    reference = tiny_llama()  # same seed: identical weights
    quantize_model(model, "nf4", blocksize=64, double_quant=True)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    linears = {n for n, m in reference.named_modules() if isinstance(m, nn.Linear)}
    assert names == linears - {"lm_head"}
    assert type(model.lm_head) is nn.Linear
    # the reference gets the dequantized weights: logits must agree
    for name in names:
        reference.get_submodule(name).weight.data = model.get_submodule(name).dequantize()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_quantize_model_rejects_unknown_type(tiny_llama):
    with pytest.raises(UserError, match="did you mean"):
        quantize_model(tiny_llama(), "nf5x")
