"""bitsandbytes' state-dict layout: a QuantLinear's to_bnb_state_dict equals, key by key and byte
for byte, the state dict of a bitsandbytes Linear4bit quantized on CPU from the same weight; a
bitsandbytes-produced state dict loads into QuantLinear with identical dequantized weights and
outputs; and our state dict loads back into bitsandbytes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers_quant import bnb_dequantize_4bit, bnb_functional, eager_bnb, rows_align  # noqa: F401
from loraforge.errors import UserError
from loraforge.quant import QuantLinear, from_bnb_state_dict, to_bnb_state_dict

pytestmark = pytest.mark.usefixtures("eager_bnb")

CASES = [
    # quant_type, double_quant, bias, dtype, in_features, out_features, blocksize
    ("nf4", True, True, torch.float32, 96, 40, 64),  # rows straddle blocks
    ("nf4", False, False, torch.float32, 192, 40, 64),
    ("fp4", True, False, torch.bfloat16, 128, 24, 128),
    ("fp4", False, True, torch.float16, 64, 30, 32),
    ("nf4", True, True, torch.bfloat16, 33, 7, 256),  # odd element count, one partial block
]


def bnb_linear(linear: nn.Linear, quant_type: str, double_quant: bool, blocksize: int):
    bnb_functional()
    import bitsandbytes as bnb

    module = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=torch.float32, compress_statistics=double_quant, quant_type=quant_type,
        quant_storage=torch.uint8,
    )
    module.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, blocksize=blocksize,
        compress_statistics=double_quant, quant_type=quant_type, module=module,
    )
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return module.to("cpu")  # quantizes on CPU


def source_linear(in_f, out_f, bias, dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_equals_bitsandbytes_byte_for_byte(case):
    quant_type, dq, bias, dtype, in_f, out_f, blocksize = case
    linear = source_linear(in_f, out_f, bias, dtype)
    theirs = bnb_linear(linear, quant_type, dq, blocksize).state_dict(prefix="layer.")
    ours = to_bnb_state_dict(QuantLinear.from_linear(linear, quant_type, blocksize, dq), prefix="layer.")
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        mine = ours[key]
        assert (mine.dtype, tuple(mine.shape)) == (value.dtype, tuple(value.shape)), key
        assert mine.contiguous().view(torch.uint8).numpy().tobytes() == value.contiguous().view(torch.uint8).numpy().tobytes(), key
    meta = json.loads(bytes(ours[f"layer.weight.quant_state.bitsandbytes__{quant_type}"].tolist()).decode())
    assert meta["shape"] == [out_f, in_f] and meta["blocksize"] == blocksize
    assert ("nested_offset" in meta) == dq and ("layer.weight.nested_absmax" in ours) == dq
    assert ours["layer.weight.absmax"].dtype == (torch.uint8 if dq else torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_bitsandbytes_state_dict_loads_into_quantlinear(case):
    Fb = bnb_functional()
    quant_type, dq, bias, dtype, in_f, out_f, blocksize = case
    linear = source_linear(in_f, out_f, bias, dtype, seed=1)
    module = bnb_linear(linear, quant_type, dq, blocksize)
    layer = from_bnb_state_dict(module.state_dict(), "", in_f, out_f, compute_dtype=torch.float32)
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == (quant_type, blocksize, dq)
    assert layer.weight_dtype == dtype
    state = module.weight.quant_state
    assert torch.equal(layer.dequantize(dtype), bnb_dequantize_4bit(module.weight.data, state))
    if rows_align((out_f, in_f), blocksize) or in_f % 16:  # bnb's CPU kernels are right here
        assert torch.equal(layer.dequantize(dtype), Fb.dequantize_4bit(module.weight.data, state))
        # bnb rounds the weight to its stored dtype before the fp32 matmul; loraforge dequantizes
        # straight to the compute dtype: equal for fp32 weights, within bf16/fp16 rounding otherwise
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        x = torch.randn(3, in_f)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), module(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CASES[:3])
def test_our_state_dict_loads_into_bitsandbytes(case):
    Fb = bnb_functional()
    import bitsandbytes as bnb

    quant_type, dq, bias, dtype, in_f, out_f, blocksize = case
    layer = QuantLinear.from_linear(source_linear(in_f, out_f, bias, dtype, seed=2), quant_type, blocksize, dq)
    sd = to_bnb_state_dict(layer)
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert torch.equal(bnb_dequantize_4bit(weight.data, weight.quant_state), layer.dequantize(dtype))


def test_round_trip_keeps_every_buffer():
    layer = QuantLinear.from_linear(source_linear(96, 40, True, torch.bfloat16), "nf4", 64, True, torch.float32)
    again = from_bnb_state_dict(to_bnb_state_dict(layer, "q_proj."), "q_proj", 96, 40, compute_dtype=torch.float32)
    for (name, a), (_, b) in zip(layer.state_dict().items(), again.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert again.weight_dtype == torch.bfloat16


def test_bad_state_dicts_raise_user_errors():
    layer = QuantLinear.from_linear(source_linear(64, 8, False, torch.float32), "nf4", 64, False)
    sd = to_bnb_state_dict(layer, "m.")
    with pytest.raises(UserError, match="no bitsandbytes 4-bit state"):
        from_bnb_state_dict(sd, "other.", 64, 8)
    with pytest.raises(UserError, match=r"shape \[8, 64\], expected \[64, 8\]"):
        from_bnb_state_dict(sd, "m.", 8, 64)
    del sd["m.weight.absmax"]
    with pytest.raises(UserError, match="missing tensor"):
        from_bnb_state_dict(sd, "m.", 64, 8)
    with pytest.raises(UserError, match="nf4 or fp4 weights only"):
        to_bnb_state_dict(QuantLinear.from_linear(source_linear(64, 8, False, torch.float32), "nf3"))
