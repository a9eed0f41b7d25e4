"""Double quantization of the block scales (QLoRA, arXiv:2305.14314, sec. 3, "Double Quantization").

The float32 absmax of every 4-bit block is itself quantized, as bitsandbytes does it:
``offset = mean(absmax)``; ``absmax - offset`` is quantized to 8 bits blockwise (blocks of 256)
with the signed dynamic map, keeping one float32 ``nested_absmax`` per 256 scales; back:
``absmax = code[q] * nested_absmax + offset`` (float32). At block 64 this brings the scales from
32/64 = 0.5 to 8/64 + 32/(64 * 256) = 0.127 bits per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraforge.quant.blockwise import dequantize_blockwise, quantize_blockwise_8bit
from loraforge.quant.codebooks import dynamic_map

NESTED_BLOCKSIZE = 256


@dataclass
class NestedAbsmax:
    """8-bit block scales: ``codes`` uint8 [nblocks], ``absmax`` float32 [ceil(nblocks / 256)],
    ``offset`` float32 scalar tensor, ``code`` the 256-value map, ``blocksize`` (256)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    blocksize: int = NESTED_BLOCKSIZE


def compress_absmax(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> NestedAbsmax:
    """Quantize float32 block scales to 8 bits around their mean."""
    absmax = absmax.float()
    offset = absmax.mean()
    code = dynamic_map(signed=True).to(absmax.device)
    codes, nested = quantize_blockwise_8bit(absmax - offset, code, blocksize)
    return NestedAbsmax(codes=codes, absmax=nested, offset=offset, code=code, blocksize=blocksize)


def decompress_absmax(nested: NestedAbsmax) -> torch.Tensor:
    """The float32 block scales back: ``code[q] * nested_absmax + offset``."""
    values = dequantize_blockwise(
        nested.codes, nested.absmax, nested.code, nested.blocksize, (nested.codes.numel(),), torch.float32
    )
    return values + nested.offset.to(values.device, torch.float32)
