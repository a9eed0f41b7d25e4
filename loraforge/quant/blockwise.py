"""Blockwise absmax quantization (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization", arXiv:2110.02861; QLoRA, arXiv:2305.14314) and code packing.

The tensor is flattened row-major and cut into blocks of ``blocksize`` elements (the last one may
be partial). Each block keeps ``absmax_b = max |x|`` in float32 and every element the index of a
code book value: ``q = nearest(code, x * (1 / absmax_b))``; dequantization is
``code[q] * absmax_b`` in float32, then a cast (round to nearest even).

Rounding follows bitsandbytes' CPU paths byte for byte:

- :func:`quantize_blockwise` (the 4-bit path, any code book): the nearest code by the float32
  midpoints of the sorted code book, ties to the lower code (FP4 is unsorted: its codes are sorted
  stably, so a positive value below the first midpoint gets code 8, an exact zero code 0). An
  all-zero block gets the code nearest 0 (NF4: 7). The last, partial block divides by its absmax
  instead of multiplying by the reciprocal, and an all-zero partial block stores absmax 1e-38.
- :func:`quantize_blockwise_8bit` (the 8-bit dynamic-map path used by double quantization and
  8-bit optimizer states): bitsandbytes' C++ kernel rounds through a 65536-entry table:
  ``lut[i] = nearest(code, 2i/65535 - 1)`` and ``q = lut[trunc(fma((x + 1) / 2, 65535, 0.5))]``
  with ``x = clamp(x * (1 / absmax), -1, 1)``; an all-zero block gets code 0. The table's grid
  step (2/65535) is coarser than the dynamic map near zero, so e.g. an exact 0 in a non-zero
  block gets the signed map's code 131 (2.125e-5), as in bitsandbytes.

Work is done in chunks of whole blocks so that large tensors never need more than a few
megabytes of temporaries.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from loraforge.errors import UserError

BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32 .. 4096
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK_ELEMENTS = 1 << 22
_MIN_ABSMAX = 1e-38  # bitsandbytes clamps absmax before taking its reciprocal


def check_blocksize(blocksize: int, where: str = "blocksize") -> int:
    if blocksize not in BLOCKSIZES:
        raise UserError(
            f"block size must be a power of two from 32 to 4096, got {blocksize!r}", where=where
        )
    return blocksize


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in FLOAT_DTYPES:
        raise UserError(f"can only quantize float32/float16/bfloat16 tensors, got {x.dtype}", where="tensor")
    return x.reshape(-1)


def _chunks(n: int, blocksize: int):
    """(start, end) element ranges of whole blocks, about CHUNK_ELEMENTS long."""
    step = max(1, CHUNK_ELEMENTS // blocksize) * blocksize
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _sorted_code(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints of the stably sorted code book and the permutation back to code indices."""
    values, order = torch.sort(code.float().cpu(), stable=True)
    return (values[:-1] + values[1:]) / 2, order


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to indices into ``code`` with one absmax per block.

    Returns ``(codes, absmax)``: uint8 ``[n]`` and float32 ``[ceil(n / blocksize)]``.
    """
    check_blocksize(blocksize)
    flat = _check_input(x)
    n = flat.numel()
    mids, order = _sorted_code(code)
    mids = mids.to(flat.device)
    if torch.equal(order, torch.arange(order.numel())):
        order = None  # sorted code book (NF-k, INT-k): the bucket is the code
    else:
        order = order.to(device=flat.device, dtype=torch.uint8)

    def to_codes(scaled: torch.Tensor) -> torch.Tensor:
        bucket = torch.bucketize(scaled, mids, out_int32=True)
        return bucket if order is None else order[bucket]

    codes = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=flat.device)
    full = n - n % blocksize
    for start, end in _chunks(full, blocksize):
        block = flat[start:end].float().view(-1, blocksize)
        amax = block.abs().amax(dim=1)
        scaled = (block * (1.0 / amax.clamp(min=_MIN_ABSMAX)).unsqueeze(1)).clamp_(-1, 1)
        codes[start:end] = to_codes(scaled.view(-1))
        absmax[start // blocksize : end // blocksize] = amax
    if full < n:
        tail = flat[full:].float()
        amax = tail.abs().amax().clamp(min=_MIN_ABSMAX)
        codes[full:] = to_codes((tail / amax).clamp_(-1, 1))
        absmax[-1] = amax
    return codes, absmax


@lru_cache(maxsize=8)
def _lut_for(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    mids = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(65536, dtype=torch.float32)
    grid = (grid + grid) / 65535.0 - 1.0
    return torch.searchsorted(mids, grid, side="left").to(torch.uint8)


def _lookup_table(code: torch.Tensor) -> torch.Tensor:
    """``lut[i]`` = the nearest code (ties lower) to the grid point ``2i/65535 - 1``."""
    code = code.detach().float().cpu().contiguous()
    if code.numel() != 256:
        raise UserError(f"an 8-bit code book has 256 values, got {code.numel()}", where="code")
    return _lut_for(code.numpy().tobytes())


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a sorted 256-value map, exactly as bitsandbytes' CPU kernel.

    Returns ``(codes, absmax)``: uint8 ``[n]`` and float32 ``[ceil(n / blocksize)]``.
    """
    if blocksize <= 0:
        raise UserError(f"block size must be positive, got {blocksize}", where="blocksize")
    flat = _check_input(x)
    n = flat.numel()
    lut = _lookup_table(code).to(flat.device)
    codes = torch.empty(n, dtype=torch.uint8, device=flat.device)
    nblocks = math.ceil(n / blocksize)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=flat.device)
    for start, end in _chunks(n, blocksize):
        chunk = flat[start:end].float()
        pad = (-chunk.numel()) % blocksize
        blocks = torch.nn.functional.pad(chunk, (0, pad)).view(-1, blocksize)
        amax = blocks.abs().amax(dim=1)
        scaled = (blocks * (1.0 / amax).unsqueeze(1)).clamp_(-1, 1)
        half = (scaled + 1.0) * 0.5
        # fma(half, 65535, 0.5) rounded once to float32: exact in float64, then one rounding
        index = (half.double() * 65535.0 + 0.5).float().long().bitwise_and_(0xFFFF)
        q = lut[index]
        q[amax == 0] = 0
        codes[start:end] = q.view(-1)[: end - start]
        absmax[start // blocksize : start // blocksize + amax.numel()] = amax
    return codes, absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``code[codes] * absmax`` per block in float32, cast to ``dtype`` and shaped ``shape``."""
    n = math.prod(shape)
    flat = codes.reshape(-1)
    if flat.numel() < n:
        raise UserError(f"{flat.numel()} codes cannot fill a tensor of shape {tuple(shape)}", where="codes")
    if absmax.numel() < math.ceil(n / blocksize):
        raise UserError(f"{absmax.numel()} scales are too few for {n} values in blocks of {blocksize}", where="absmax")
    code = code.to(device=flat.device, dtype=torch.float32)
    absmax = absmax.float()
    out = torch.empty(n, dtype=dtype, device=flat.device)
    full = n - n % blocksize
    for start, end in _chunks(full, blocksize):
        values = code[flat[start:end].long()].view(-1, blocksize)
        scales = absmax[start // blocksize : end // blocksize].unsqueeze(1)
        torch.mul(values, scales, out=out[start:end].view(-1, blocksize))  # fp32 product, one cast
    if full < n:
        out[full:] = code[flat[full:n].long()] * absmax[full // blocksize]
    return out.view(shape)


def dequantize_packed_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`dequantize_blockwise` straight from :func:`pack_4bit` bytes: each byte indexes a
    256 x 2 table of (high, low) code values, so the codes are never unpacked."""
    n = math.prod(shape)
    flat = packed.reshape(-1)
    if flat.numel() * 2 < n or absmax.numel() < math.ceil(n / blocksize):
        raise UserError(f"{flat.numel()} bytes / {absmax.numel()} scales cannot fill shape {tuple(shape)}", where="codes")
    code = code.to(device=flat.device, dtype=torch.float32)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # byte -> (hi, lo)
    absmax = absmax.float()
    out = torch.empty(n, dtype=dtype, device=flat.device)
    full = n - n % blocksize
    for start, end in _chunks(full, blocksize):
        values = torch.index_select(pairs, 0, flat[start // 2 : end // 2].int()).view(-1, blocksize)
        scales = absmax[start // blocksize : end // blocksize].unsqueeze(1)
        torch.mul(values, scales, out=out[start:end].view(-1, blocksize))  # fp32 product, one cast
    if full < n:
        tail = torch.index_select(pairs, 0, flat[full // 2 :].int()).view(-1)[: n - full]
        out[full:] = tail * absmax[full // blocksize]
    return out.view(shape)


def zero_code(code: torch.Tensor) -> int:
    """The code :func:`quantize_blockwise` gives 0.0 (NF4: 7, FP4: 0): bitsandbytes pads with it."""
    return int(quantize_blockwise(torch.zeros(1), code, BLOCKSIZES[0])[0][0])


def pack_4bit(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Two codes per byte, element 2i in the high nibble; an odd count is padded with ``pad_code``
    (bitsandbytes quantizes a 0.0 there: pass ``zero_code(code)`` to match its bytes)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad_code)])
    return (flat[0::2] << 4) | (flat[1::2] & 0xF)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` codes of a :func:`pack_4bit` byte string."""
    flat = packed.reshape(-1)
    out = torch.empty(flat.numel() * 2, dtype=torch.uint8, device=flat.device)
    out[0::2] = flat >> 4
    out[1::2] = flat & 0xF
    return out[:n]


def pack_2bit(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Four codes per byte, element 4i in the two highest bits; the count is padded with ``pad_code``."""
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_full((pad,), pad_code)])
    quads = (flat & 0x3).view(-1, 4)
    return (quads[:, 0] << 6) | (quads[:, 1] << 4) | (quads[:, 2] << 2) | quads[:, 3]


def unpack_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` codes of a :func:`pack_2bit` byte string."""
    flat = packed.reshape(-1)
    out = torch.empty(flat.numel(), 4, dtype=torch.uint8, device=flat.device)
    for j, shift in enumerate((6, 4, 2, 0)):
        out[:, j] = (flat >> shift) & 0x3
    return out.view(-1)[:n]


def pack_codes(codes: torch.Tensor, storage_bits: int, pad_code: int = 0) -> torch.Tensor:
    """Pack codes at 2, 4 or 8 bits per code (8: the codes themselves)."""
    if storage_bits == 2:
        return pack_2bit(codes, pad_code)
    if storage_bits == 4:
        return pack_4bit(codes, pad_code)
    return codes.reshape(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, n: int, storage_bits: int) -> torch.Tensor:
    if storage_bits == 2:
        return unpack_2bit(packed, n)
    if storage_bits == 4:
        return unpack_4bit(packed, n)
    return packed.reshape(-1)[:n]
