"""Code books: NF4/FP4 byte-identical to bitsandbytes, NF-k built the QLoRA way (NF2/NF3 as in
LoftQ), INT-k levels, the dynamic 8-bit maps, and name validation."""

from __future__ import annotations

import pytest
import torch

from helpers_quant import bnb_functional
from loraforge.errors import UserError
from loraforge.quant.codebooks import (
    FP4,
    NF4,
    QUANT_TYPES,
    dynamic_map,
    get_codebook,
    int_codebook,
    nf_codebook,
    quant_type,
)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def test_nf4_and_fp4_are_bitsandbytes_tables():
    F = bnb_functional()
    assert same_bytes(NF4, F.get_4bit_type("nf4", device="cpu"))
    assert same_bytes(FP4, F.get_4bit_type("fp4", device="cpu"))


def test_nf4_is_rebuilt_from_normal_quantiles():
    assert same_bytes(nf_codebook(4), NF4)


def test_nf2_nf3_match_loftq_values():
    assert nf_codebook(2).tolist() == [-1.0, 0.0, 0.33791524171829224, 1.0]
    nf3 = torch.tensor([-1, -0.4786292, -0.2171418, 0, 0.1609302, 0.3379152, 0.5626170, 1])
    torch.testing.assert_close(nf_codebook(3), nf3, rtol=0, atol=1e-7)
    for bits in range(2, 9):
        book = nf_codebook(bits)
        assert book.numel() == 2**bits and book[0] == -1 and book[-1] == 1
        assert (book == 0).sum() == 1 and bool((book[1:] > book[:-1]).all())


def test_int_codebook_is_uniform():
    assert int_codebook(2).tolist() == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0])
    assert same_bytes(int_codebook(4), torch.linspace(-1, 1, 16))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes(signed):
    F = bnb_functional()
    ours = dynamic_map(signed)
    assert same_bytes(ours, F.create_dynamic_map(signed=signed))
    assert ours.numel() == 256 and bool((ours[1:] > ours[:-1]).all())
    if signed:
        assert ours[0] == torch.tensor(-0.99296875)


def test_get_codebook_names_and_storage():
    for name in QUANT_TYPES:
        assert get_codebook(name).numel() == 2 ** quant_type(name).bits
    assert quant_type("nf3").storage_bits == 4
    assert quant_type("int2").storage_bits == 2
    assert quant_type("int8").storage_bits == 8


def test_unknown_quant_type_suggests_the_closest():
    with pytest.raises(UserError, match=r'unknown quant type .nf44.*did you mean "nf4"'):
        get_codebook("nf44")
