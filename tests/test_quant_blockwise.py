"""Blockwise quantization: codes, absmax and double-quantization statistics byte-identical to
bitsandbytes' CPU path for NF4/FP4 (fresh random tensors of odd sizes, every block size and
input dtype), dequantized values identical, k-bit code books against a plain re-implementation,
and the packing layouts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers_quant import (  # noqa: F401
    bnb_dequantize_4bit,
    bnb_functional,
    eager_bnb,
    reference_dequantize,
    reference_quantize,
    rows_align,
)
from loraforge.errors import UserError
from loraforge.quant.blockwise import (
    BLOCKSIZES,
    dequantize_blockwise,
    dequantize_packed_4bit,
    pack_2bit,
    pack_4bit,
    quantize_blockwise,
    quantize_blockwise_8bit,
    unpack_2bit,
    unpack_4bit,
    zero_code,
)
from loraforge.quant.codebooks import dynamic_map, get_codebook
from loraforge.quant.double_quant import compress_absmax, decompress_absmax

pytestmark = pytest.mark.usefixtures("eager_bnb")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FEW = settings(max_examples=25, deadline=None)


def bytes_of(t: torch.Tensor) -> bytes:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def random_tensor(seed: int, rows: int, cols: int, dtype: torch.dtype, zero_blocks: bool, blocksize: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.rand((), generator=g) * 4
    if zero_blocks:  # an all-zero first block and an all-zero tail
        flat = x.view(-1)
        flat[:blocksize] = 0
        flat[-((flat.numel() % blocksize) or blocksize) :] = 0
    return x.to(dtype)


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    blocksize=st.sampled_from(BLOCKSIZES),
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    zero_blocks=st.booleans(),
)
def test_4bit_matches_bitsandbytes(seed, rows, cols, blocksize, dtype, quant_type, double_quant, zero_blocks):
    F = bnb_functional()
    x = random_tensor(seed, rows, cols, dtype, zero_blocks, blocksize)
    code = get_codebook(quant_type)
    ref_packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)

    codes, absmax = quantize_blockwise(x, code, blocksize)
    assert bytes_of(pack_4bit(codes, zero_code(code))) == bytes_of(ref_packed)
    if double_quant:
        nested = compress_absmax(absmax)
        assert bytes_of(nested.codes) == bytes_of(state.absmax)
        assert bytes_of(nested.absmax) == bytes_of(state.state2.absmax)
        assert bytes_of(nested.offset) == bytes_of(state.offset)
        assert bytes_of(nested.code) == bytes_of(state.state2.code)
        absmax = decompress_absmax(nested)
    else:
        assert bytes_of(absmax) == bytes_of(state.absmax)

    ours = dequantize_blockwise(codes, absmax, code, blocksize, x.shape, dtype)
    theirs = bnb_dequantize_4bit(ref_packed, state)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)
    if rows_align(x.shape, blocksize) or cols % 16:
        # bnb's C++ CPU kernel too (numerically identical: it returns -0.0 for FP4's code 8;
        # for a single row it may hand back the transposed shape, hence the reshape)
        assert torch.equal(ours, F.dequantize_4bit(ref_packed, state).reshape(x.shape))


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6000),
    blocksize=st.sampled_from([64, 256, 2048, 4096]),
    dtype=st.sampled_from(DTYPES),
    signed=st.booleans(),
    zero_blocks=st.booleans(),
)
def test_8bit_dynamic_matches_bitsandbytes(seed, n, blocksize, dtype, signed, zero_blocks):
    F = bnb_functional()
    x = random_tensor(seed, 1, n, dtype, zero_blocks, blocksize).view(-1)
    code = dynamic_map(signed)
    ref_codes, state = F.quantize_blockwise(x, code=code.clone(), blocksize=blocksize)
    codes, absmax = quantize_blockwise_8bit(x, code, blocksize)
    assert bytes_of(codes) == bytes_of(ref_codes)
    assert bytes_of(absmax) == bytes_of(state.absmax)
    ours = dequantize_blockwise(codes, absmax, code, blocksize, x.shape, dtype)
    assert torch.equal(ours, F.dequantize_blockwise(ref_codes, state))


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 3000),
    blocksize=st.sampled_from(BLOCKSIZES),
    dtype=st.sampled_from(DTYPES),
    name=st.sampled_from(["nf2", "nf3", "int2", "int4", "int8", "nf4", "fp4"]),
)
def test_kbit_codes_match_plain_reference(seed, n, blocksize, dtype, name):
    x = random_tensor(seed, 1, n, dtype, False, blocksize)
    code = get_codebook(name)
    codes, absmax = quantize_blockwise(x, code, blocksize)
    ref_codes, ref_absmax = reference_quantize(x, code, blocksize)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax, ref_absmax)
    ours = dequantize_blockwise(codes, absmax, code, blocksize, x.shape, dtype)
    assert torch.equal(ours, reference_dequantize(codes, absmax, code, blocksize, x.shape, dtype))


def test_all_zero_blocks():
    nf4 = get_codebook("nf4")
    codes, absmax = quantize_blockwise(torch.zeros(64 + 10), nf4, 64)
    assert codes.tolist() == [7] * 74
    assert bytes_of(pack_4bit(codes, zero_code(nf4))) == b"\x77" * 37
    assert absmax[0] == 0 and absmax[1] == torch.tensor(1e-38)  # bnb clamps a zero partial block
    assert not dequantize_blockwise(codes, absmax, nf4, 64, (74,)).any()
    assert zero_code(get_codebook("fp4")) == 0
    codes8, absmax8 = quantize_blockwise_8bit(torch.zeros(300), dynamic_map(), 256)
    assert not codes8.any() and not absmax8.any()
    # tiny values in a non-zero block: bnb's 65536-entry table sends them to 2.125e-5 (code 131)
    x = torch.tensor([1.0, 0.0, -1e-9, 3.1e-5])
    codes8, _ = quantize_blockwise_8bit(x, dynamic_map(), 64)
    ref, _ = bnb_functional().quantize_blockwise(x, code=dynamic_map(), blocksize=64)
    assert codes8.tolist() == ref.tolist() == [255, 131, 131, 132]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_exact_midpoints_round_to_the_lower_code_as_bitsandbytes(quant_type):
    F = bnb_functional()
    values = get_codebook(quant_type).sort().values
    mids = (values[:-1] + values[1:]) / 2
    x = torch.cat([torch.tensor([1.0]), mids, torch.nextafter(mids, torch.ones_like(mids))])
    codes, _ = quantize_blockwise(x, get_codebook(quant_type), 32)
    ref, _ = F.quantize_4bit(x, blocksize=32, quant_type=quant_type)
    assert bytes_of(pack_4bit(codes, zero_code(get_codebook(quant_type)))) == bytes_of(ref)
    order = get_codebook(quant_type).sort(stable=True).indices
    assert codes[1:16].tolist() == order[:15].tolist()  # a tie takes the lower neighbour
    assert codes[16:].tolist() == order[1:].tolist()  # one ulp above takes the upper one


def test_fp4_sign_of_tiny_values_follows_bitsandbytes_cpu():
    fp4 = get_codebook("fp4")
    x = torch.tensor([1.0, 0.0, -0.0, 1e-4, -1e-4, 0.5, -0.5, -1.0])
    codes, _ = quantize_blockwise(x, fp4, 32)
    # exact zeros -> code 0; a tiny positive -> code 8 (stable sort puts +0 before "-0")
    assert codes.tolist() == [3, 0, 0, 8, 0, 5, 13, 11]


def test_pack_4bit_layout_and_round_trip():
    assert pack_4bit(torch.tensor([1, 2, 3], dtype=torch.uint8)).tolist() == [0x12, 0x30]
    assert pack_4bit(torch.tensor([1, 2, 3], dtype=torch.uint8), pad_code=7).tolist() == [0x12, 0x37]
    for n in (1, 2, 7, 64, 1001):
        codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
        packed = pack_4bit(codes)
        assert packed.numel() == (n + 1) // 2
        assert torch.equal(unpack_4bit(packed, n), codes)
        absmax = torch.rand((n + 31) // 32)
        for dtype in DTYPES:
            assert torch.equal(
                dequantize_packed_4bit(packed, absmax, get_codebook("fp4"), 32, (n,), dtype),
                dequantize_blockwise(codes, absmax, get_codebook("fp4"), 32, (n,), dtype),
            )


def test_pack_2bit_layout_and_round_trip():
    assert pack_2bit(torch.tensor([1, 2, 3, 0, 1], dtype=torch.uint8)).tolist() == [0b01101100, 0b01000000]
    for n in (1, 3, 4, 5, 1003):
        codes = torch.randint(0, 4, (n,), dtype=torch.uint8)
        packed = pack_2bit(codes)
        assert packed.numel() == (n + 3) // 4
        assert torch.equal(unpack_2bit(packed, n), codes)


def test_chunked_path_equals_single_pass(monkeypatch):
    import loraforge.quant.blockwise as bw

    x = torch.randn(5000 * 3 + 17)
    code = get_codebook("nf4")
    whole = quantize_blockwise(x, code, 64)
    whole8 = quantize_blockwise_8bit(x, dynamic_map(), 256)
    monkeypatch.setattr(bw, "CHUNK_ELEMENTS", 1000)
    for a, b in zip(whole + whole8, quantize_blockwise(x, code, 64) + quantize_blockwise_8bit(x, dynamic_map(), 256)):
        assert torch.equal(a, b)
    deq = dequantize_blockwise(whole[0], whole[1], code, 64, x.shape)
    monkeypatch.setattr(bw, "CHUNK_ELEMENTS", 1 << 22)
    assert torch.equal(deq, dequantize_blockwise(whole[0], whole[1], code, 64, x.shape))


def test_bad_blocksize_and_dtype():
    with pytest.raises(UserError, match="power of two from 32 to 4096"):
        quantize_blockwise(torch.randn(10), get_codebook("nf4"), 48)
    with pytest.raises(UserError, match="float32/float16/bfloat16"):
        quantize_blockwise(torch.arange(10), get_codebook("nf4"), 64)
