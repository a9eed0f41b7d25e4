"""4-bit dequantization and the fused 4-bit gemv: the Triton kernels (run by Triton's interpreter
on CPU) against loraforge's QuantLinear.dequantize and against bitsandbytes' own dequantize_4bit
on bitsandbytes-quantized data (NF4 / FP4, float32 or double-quantized scales, sizes that end in
a partial block and an odd element count).

Tolerances: dequantization is exact (bit-identical) in float32 and float16; bfloat16 is within one
bf16 ulp because Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest
even, as PyTorch does). The gemv accumulates in float32: relative error <= 1e-5 against a float64
product; with bfloat16 activations <= 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from helpers_kernels import reference_kernels, rel_err, triton_interpret  # noqa: F401

from loraforge.kernels.dequant import Packed4bit, dequantize_4bit, dequantize_4bit_reference, packed_from_layer
from loraforge.kernels.gemv4bit import gemv_4bit, gemv_4bit_reference
from loraforge.quant.linear import QuantLinear


def _layer(out_f, in_f, quant_type, double_quant, seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    return QuantLinear.from_linear(lin, quant_type=quant_type, blocksize=64, double_quant=double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_kernel_matches_quantlinear(triton_interpret, quant_type, double_quant):
    layer = _layer(37, 301, quant_type, double_quant, seed=hash((quant_type, double_quant)) % 1000)  # odd count
    w = packed_from_layer(layer)
    expected = layer.dequantize(torch.float32)
    assert torch.equal(dequantize_4bit_reference(w, torch.float32), expected)
    out = torch.full(w.shape, float("nan"))
    assert torch.equal(dequantize_4bit(w, torch.float32, out=out), expected)
    assert torch.equal(dequantize_4bit(w, torch.float16), expected.half())
    bf16 = dequantize_4bit(w, torch.bfloat16).float()
    ulp = expected.abs() * 2.0**-7
    assert ((bf16 - expected).abs() <= ulp).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_kernel_matches_bitsandbytes(triton_interpret, double_quant):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(7)
    weight = torch.randn(48, 128)
    packed, state = bnb_f.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    expected = bnb_f.dequantize_4bit(packed, state)
    w = Packed4bit(packed=packed.view(-1), absmax=state.absmax, code=state.code, blocksize=64, shape=(48, 128))
    if double_quant:
        w.nested_absmax, w.offset = state.state2.absmax, state.offset
        w.nested_code, w.nested_blocksize = state.state2.code, state.state2.blocksize
    assert torch.equal(dequantize_4bit(w, torch.float32), expected)


@pytest.mark.parametrize("rows,double_quant", [(1, True), (5, False)])
def test_gemv_kernel(triton_interpret, rows, double_quant):
    layer = _layer(40, 256, "nf4", double_quant, seed=rows)
    w = packed_from_layer(layer)
    x = torch.randn(rows, 256)
    bias = torch.randn(40)
    expected = x.double() @ layer.dequantize(torch.float64).t() + bias.double()
    assert rel_err(gemv_4bit(x, w, bias), expected) < 1e-5
    assert rel_err(gemv_4bit(x.bfloat16(), w, bias), expected) < 1e-2
    assert rel_err(gemv_4bit_reference(x, w, bias), expected) < 1e-5


def test_gemv_outside_the_kernel_domain_uses_dequant_and_matmul(triton_interpret):
    layer = _layer(8, 96, "nf4", True, seed=3)  # K = 96 is not a multiple of the block size
    w = packed_from_layer(layer)
    x = torch.randn(20, 96)  # and 20 rows > 16
    assert rel_err(gemv_4bit(x, w), x.double() @ layer.dequantize(torch.float64).t()) < 1e-5


def test_reference_path_needs_no_triton(reference_kernels):
    layer = _layer(16, 64, "fp4", True, seed=5)
    w = packed_from_layer(layer)
    assert torch.equal(dequantize_4bit(w, torch.float32), layer.dequantize(torch.float32))
