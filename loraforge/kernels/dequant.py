"""Dequantization of bitsandbytes-layout 4-bit weights (NF4 / FP4; QLoRA, arXiv:2305.14314).

Storage (see ``loraforge.quant``): the weight flattened row-major, two 4-bit codes per byte
(element 2i in the HIGH nibble, 2i+1 in the low one), one scale per ``blocksize`` elements.
A scale is either float32, or double-quantized (QLoRA sec. 3): a uint8 code ``c_b`` into the
signed dynamic map, one float32 ``nested_absmax`` per 256 scales, and the mean ``offset``:

    absmax_b = map8[c_b] * nested_absmax[b // 256] + offset          (float32)
    w_i      = code4[q_i] * absmax_{i // blocksize}                   (float32, cast once)

:func:`dequantize_4bit` runs the Triton kernel where :func:`~loraforge.kernels.dispatch.use_triton`
says so, the compiled C kernel of :mod:`loraforge.kernels.cpu_gemv` on the CPU when it is built,
and :func:`dequantize_4bit_reference` (plain PyTorch) elsewhere; all give the same bits.
The kernel is one launch: each program expands ``BLOCK`` packed bytes (``2 * BLOCK`` weights,
many quantization blocks), unpacks nibbles with shifts, gathers the 16-entry code book and the
per-block scale (decompressing double-quantized scales on the fly), and casts once at the store;
the pair of nibbles is interleaved with ``tl.join`` so that the store is one contiguous vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraforge.errors import UserError
from loraforge.kernels.dispatch import use_triton
from loraforge.kernels.jit import kernel

try:
    import triton.language as tl
except ImportError:  # the reference path needs no triton
    tl = None


@dataclass
class Packed4bit:
    """A packed 4-bit weight and its scales (the buffers of a ``QuantLinear``).

    ``absmax`` is float32 ``[nblocks]``, or uint8 codes with ``nested_absmax``, ``offset`` and
    ``nested_code`` (double quantization, nested blocks of ``nested_blocksize``)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, ...]
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def check(self) -> "Packed4bit":
        n = self.numel
        if self.packed.dtype != torch.uint8 or self.packed.numel() < (n + 1) // 2:
            raise UserError(f"expected at least {(n + 1) // 2} packed uint8 bytes for shape {self.shape}, "
                            f"got {self.packed.numel()} of {self.packed.dtype}", where="packed")
        if self.blocksize % 2 or self.absmax.numel() < math.ceil(n / self.blocksize):
            raise UserError(f"{self.absmax.numel()} scales do not cover {n} values in blocks of {self.blocksize}",
                            where="absmax")
        if self.double_quant and (self.nested_absmax is None or self.offset is None or self.nested_code is None):
            raise UserError("uint8 (double-quantized) scales need nested_absmax, offset and nested_code",
                            where="absmax")
        if self.code.numel() != 16:
            raise UserError(f"a 4-bit code book has 16 values, got {self.code.numel()}", where="code")
        return self


def packed_from_layer(layer) -> Packed4bit | None:
    """The :class:`Packed4bit` view of a 4-bit ``QuantLinear`` (buffers ``qweight``, ``absmax``,
    ``quant_map`` and, double-quantized, ``nested_absmax``, ``offset``, ``nested_quant_map``);
    ``None`` for any other layer (k-bit types other than 4 -- nf3 is stored in nibbles too, with
    an 8-value code book --, or a layer without those buffers)."""
    qtype = getattr(layer, "qtype", None)
    if getattr(qtype, "storage_bits", None) != 4 or not hasattr(layer, "qweight") or layer.quant_map.numel() != 16:
        return None
    double = bool(getattr(layer, "double_quant", False))
    return Packed4bit(
        packed=layer.qweight, absmax=layer.absmax, code=layer.quant_map, blocksize=layer.blocksize,
        shape=(layer.out_features, layer.in_features),
        nested_absmax=layer.nested_absmax if double else None,
        offset=layer.offset if double else None,
        nested_code=layer.nested_quant_map if double else None,
    )


def block_scales_reference(w: Packed4bit) -> torch.Tensor:
    """float32 scale per block (double-quantized scales decompressed)."""
    if not w.double_quant:
        return w.absmax.float()
    nested = w.nested_absmax.float().repeat_interleave(w.nested_blocksize)[: w.absmax.numel()]
    return w.nested_code.float()[w.absmax.long()] * nested + w.offset.float()


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """``[256]`` 8-byte entries: byte ``b`` -> the float32 pair ``(code[b >> 4], code[b & 15])``
    (high nibble first), stored as int64 so that one ``index_select`` moves both values."""
    code = code.float()
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous().view(torch.int64).view(-1)


def dequantize_4bit_reference(w: Packed4bit, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain PyTorch (the CPU path): one lookup per byte in a 256-entry table of code pairs, the
    block scales broadcast over ``[nblocks, blocksize]`` in place, one cast."""
    w.check()
    n = w.numel
    nbytes = (n + 1) // 2
    table = _pair_table(w.code).to(w.packed.device)
    values = torch.index_select(table, 0, w.packed.reshape(-1)[:nbytes].int()).view(torch.float32)[:n]
    scales = block_scales_reference(w)
    full = n - n % w.blocksize
    values[:full].view(-1, w.blocksize).mul_(scales[: full // w.blocksize, None])
    if full < n:
        values[full:].mul_(scales[full // w.blocksize])
    return values.to(dtype).view(w.shape)


@kernel(
    configs=[
        {"BLOCK": 1024, "num_warps": 4},
        {"BLOCK": 2048, "num_warps": 4},
        {"BLOCK": 2048, "num_warps": 8},
        {"BLOCK": 4096, "num_warps": 8},
    ],
    key=["nbytes"],
)
def _dequant_kernel(packed_ptr, absmax_ptr, code_ptr, nested_ptr, nested_code_ptr, offset_ptr, out_ptr,
                    n, nbytes,
                    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOUBLE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = byte < nbytes
    q = tl.load(packed_ptr + byte, mask=in_range, other=0)
    hi = tl.load(code_ptr + (q >> 4).to(tl.int32))          # element 2i
    lo = tl.load(code_ptr + (q & 0xF).to(tl.int32))         # element 2i + 1
    block = (byte * 2) // BLOCKSIZE                         # both nibbles share a block (even blocksize)
    if DOUBLE:
        c = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + c) * tl.load(nested_ptr + block // NESTED, mask=in_range, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    values = tl.reshape(tl.join(hi * scale, lo * scale), [2 * BLOCK])
    element = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + element, values.to(out_ptr.dtype.element_ty), mask=element < n)


def dequantize_4bit_triton(w: Packed4bit, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel; ``out`` (contiguous, ``w.shape``, ``dtype``) is reused when given."""
    import triton

    w.check()
    n = w.numel
    nbytes = (n + 1) // 2
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=w.packed.device)
    if w.double_quant:
        nested, nested_code, offset = w.nested_absmax, w.nested_code.float(), w.offset.float().reshape(1)
    else:  # unused pointers: pass the scale tensor so every argument is a valid pointer
        nested = nested_code = offset = w.absmax
    grid = lambda meta: (triton.cdiv(nbytes, meta["BLOCK"]),)  # noqa: E731
    _dequant_kernel[grid](w.packed.reshape(-1), w.absmax, w.code.float(), nested, nested_code, offset, out,
                          n, nbytes, BLOCKSIZE=w.blocksize, NESTED=w.nested_blocksize, DOUBLE=w.double_quant,
                          enable_fp_fusion=False)  # map8 * nested + offset unfused: the same bits as PyTorch
    return out


def dequantize_4bit(w: Packed4bit, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[*shape]`` weight in ``dtype``: the Triton kernel where it runs, the compiled CPU kernel
    (:mod:`loraforge.kernels.cpu_gemv`; straight into ``out`` in float32 or bfloat16) on the CPU, else the
    reference. All give the same bits."""
    if use_triton(w.packed):
        return dequantize_4bit_triton(w, dtype, out)
    from loraforge.kernels import cpu_gemv  # imports this module

    if w.packed.device.type == "cpu" and cpu_gemv.library() is not None:
        written = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        direct = out is not None and written == dtype and out.is_contiguous()
        target = out if direct else torch.empty(w.shape, dtype=written)
        cpu_gemv.dequantize_4bit_cpu(w, target)
        if direct:
            return out
        return target.to(dtype) if out is None else out.copy_(target)
    result = dequantize_4bit_reference(w, dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result


def dequantize_layer(layer, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[out, in]`` weight of a frozen linear layer in ``dtype``: an ``nn.Linear``'s weight,
    a 4-bit ``QuantLinear`` through :func:`dequantize_4bit`, or any other layer's ``dequantize``."""
    if isinstance(layer, torch.nn.Linear):
        return layer.weight.to(dtype)
    packed = packed_from_layer(layer)
    if packed is None:
        return layer.dequantize(dtype)
    return dequantize_4bit(packed, dtype, out)
