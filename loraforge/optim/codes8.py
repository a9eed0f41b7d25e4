"""Blockwise 8-bit codes for optimizer states, by table lookup instead of binary search.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (arXiv:2110.02861): a block of 256
values keeps ``absmax = max |x|`` and each value the nearest entry of a sorted 256-value map
(bitsandbytes' dynamic maps), ``q = nearest(code, x / absmax)``, ties to the lower code; this is
exactly :func:`loraforge.quant.blockwise.quantize_blockwise` for these maps (a test checks it
byte for byte) and what bitsandbytes' CUDA kernel computes (``x / absmax`` by division, as there).

The nearest code of ``y`` in [-1, 1] is the number of map midpoints below ``y``. Instead of a
binary search per element (``torch.bucketize``: ~90 ns/element on one CPU core), the float32 bit
pattern of ``y`` without its low 15 bits (sign, exponent, 8 mantissa bits) names a bucket of
relative width 2^-8; the dynamic maps' midpoints are at least 0.7% apart, so a bucket holds at
most one midpoint (checked when the table is built) and

    q(y) = base[bucket] + (y > threshold[bucket])

with ``base`` the count of midpoints below the bucket and ``threshold`` the midpoint inside it
(+inf if none): two gathers from a 640 KB table and a comparison, ~10x faster on CPU.
"""

from __future__ import annotations

import numpy as np
import torch

_DROP = 15  # low mantissa bits ignored by the bucket index
_BUCKETS = 1 << (32 - _DROP)


class CodeTable:
    """Nearest-code lookup for one sorted 256-value map, on one device."""

    def __init__(self, code: torch.Tensor, device: torch.device | str = "cpu"):
        code = code.detach().float().cpu()
        if code.numel() != 256 or not bool((code[1:] >= code[:-1]).all()):
            raise ValueError("an 8-bit state map has 256 sorted values")
        mids = (code[:-1] + code[1:]) / 2
        first = torch.arange(_BUCKETS, dtype=torch.int64) << _DROP
        last = first | ((1 << _DROP) - 1)
        as_float = lambda bits: torch.from_numpy(bits.numpy().astype(np.uint32).view(np.float32))
        lo, hi = as_float(first), as_float(last)
        lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)  # negative buckets run backwards
        below_lo = torch.searchsorted(mids, lo, side="left")  # midpoints < lo
        below_hi = torch.searchsorted(mids, hi, side="left")
        finite = ~(torch.isnan(lo) | torch.isnan(hi))
        if bool((below_hi - below_lo > 1)[finite].any()):
            raise ValueError("map too fine for a 2^-8 bucket table")
        inside = below_hi > below_lo
        threshold = torch.where(inside, mids[below_lo.clamp(max=mids.numel() - 1)], torch.tensor(float("inf")))
        self.code = code.to(device)
        self.base = below_lo.to(torch.uint8).to(device)
        self.threshold = threshold.to(device)

    def nearest(self, y: torch.Tensor) -> torch.Tensor:
        """uint8 index of the nearest code (ties lower) for float32 ``y``."""
        bucket = (y.view(torch.int32) >> _DROP) & (_BUCKETS - 1)
        bucket = bucket.reshape(-1)
        up = (y.reshape(-1) > self.threshold.index_select(0, bucket)).to(torch.uint8)
        return self.base.index_select(0, bucket).add_(up).view(y.shape)

    def quantize(self, x: torch.Tensor, codes_out: torch.Tensor, absmax_out: torch.Tensor, blocksize: int) -> None:
        """Quantize flat float32 ``x`` in blocks into ``codes_out`` (uint8) and ``absmax_out`` (fp32)."""
        n = x.numel()
        full = n - n % blocksize
        if full:
            blocks = x[:full].view(-1, blocksize)
            absmax = blocks.abs().amax(dim=1)
            absmax_out[: full // blocksize] = absmax
            scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero block -> code of 0
            codes_out[:full] = self.nearest(blocks / scale.unsqueeze(1)).view(-1)
        if full < n:
            tail = x[full:]
            absmax = tail.abs().amax()
            absmax_out[-1] = absmax
            codes_out[full:] = self.nearest(tail / torch.where(absmax > 0, absmax, torch.ones_like(absmax)))

    def dequantize(self, codes: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
        """float32 ``code[codes] * absmax`` per block, flat."""
        values = self.code.index_select(0, codes.reshape(-1).int())
        n = values.numel()
        full = n - n % blocksize
        if full:
            values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].unsqueeze(1))
        if full < n:
            values[full:].mul_(absmax[-1])
        return values
