"""A frozen linear layer on a blockwise-quantized weight (QLoRA, arXiv:2305.14314, eq. 5):

    Y = X dequant(c1, c2, W_k) + b,   dequant(c1, c2, W) = dequant(dequant(c1, c2), W_k)

The weight lives only as packed k-bit codes plus block scales (optionally double-quantized).
How a forward computes the product (the result is the same to float32 rounding):

- few rows (decode, short prefills: at most ``cpu_gemv.MAX_ROWS``) of float32 input on the CPU, no
  gradient wanted, 4-bit codes: the fused kernel of :mod:`loraforge.kernels.cpu_gemv`, which reads
  the packed codes and scales once and never materialises the weight;
- otherwise (long prefills, training, other devices and bit widths): the weight is dequantized to the
  compute dtype (4-bit: into one buffer shared by all layers and reused from call to call, see
  :func:`loraforge.kernels.lora_linear.base_weight`) for one matmul, in forward and again in
  backward.

Gradients flow to the input only: the base weight is frozen, as in QLoRA, where only the
adapters on top of it train.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.errors import UserError
from loraforge.kernels import cpu_gemv
from loraforge.kernels.dequant import packed_from_layer
from loraforge.kernels.lora_linear import base_weight
from loraforge.quant.blockwise import (
    check_blocksize,
    dequantize_blockwise,
    dequantize_packed_4bit,
    pack_codes,
    quantize_blockwise,
    unpack_codes,
    zero_code,
)
from loraforge.quant.codebooks import dynamic_map, get_codebook, quant_type as parse_quant_type
from loraforge.quant.double_quant import NESTED_BLOCKSIZE, NestedAbsmax, compress_absmax, decompress_absmax


class _DequantizedMatmul(torch.autograd.Function):
    """``F.linear(x, W, bias)`` with ``W`` rebuilt from codes in forward and again in backward
    (4-bit: into the shared buffer, valid until the next layer's call), so no full-precision
    weight outlives the call. Returns a gradient for ``x`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear", bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, base_weight(layer, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ base_weight(ctx.layer, grad_out.dtype)
        return grad_x, None, None


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class QuantLinear(nn.Module):
    """Frozen k-bit linear layer: ``y = x W^T + b`` with ``W`` stored as blockwise codes.

    Buffers: ``qweight`` (packed codes, uint8), ``absmax`` (float32 scales, or uint8 codes with
    double quantization), ``nested_absmax`` and ``offset`` (double quantization only),
    ``quant_map`` (the code book) and ``nested_quant_map`` (the dynamic 8-bit map).
    Moving the module to another dtype leaves these untouched (only ``bias`` is cast).
    """

    _FLOAT_STATE = ("absmax", "nested_absmax", "offset", "quant_map", "nested_quant_map")
    _PLAN_STATE = ("qweight", *_FLOAT_STATE)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        weight_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.qtype = parse_quant_type(quant_type)
        self.in_features = in_features
        self.out_features = out_features
        self.quant_type = quant_type
        self.blocksize = check_blocksize(blocksize)
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype or compute_dtype
        n = in_features * out_features
        nblocks = math.ceil(n / blocksize)
        packed = math.ceil(n * self.qtype.storage_bits / 8)
        self.register_buffer("qweight", torch.zeros(packed, dtype=torch.uint8, device=device))
        self.register_buffer("quant_map", get_codebook(quant_type).to(device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(nblocks, dtype=torch.uint8, device=device))
            nested = math.ceil(nblocks / NESTED_BLOCKSIZE)
            self.register_buffer("nested_absmax", torch.zeros(nested, dtype=torch.float32, device=device))
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32, device=device))
            self.register_buffer("nested_quant_map", dynamic_map(signed=True).to(device))
        else:
            self.register_buffer("absmax", torch.zeros(nblocks, dtype=torch.float32, device=device))
            for name in ("nested_absmax", "offset", "nested_quant_map"):
                self.register_buffer(name, None)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=self.weight_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    # construction ---------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (its weight in fp32/fp16/bf16) into a new frozen layer."""
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype or weight.dtype,
            weight_dtype=weight.dtype,
            device=weight.device,
        )
        codes, absmax = quantize_blockwise(weight, layer.quant_map, blocksize)
        layer.qweight = pack_codes(codes, layer.qtype.storage_bits, zero_code(layer.quant_map))
        del codes
        layer._set_absmax(absmax)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().to(layer.bias.dtype))
        return layer

    @classmethod
    def from_quantized(
        cls,
        qweight: torch.Tensor,
        absmax: torch.Tensor,
        *,
        in_features: int,
        out_features: int,
        quant_type: str = "nf4",
        blocksize: int = 64,
        nested: NestedAbsmax | None = None,
        quant_map: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
        weight_dtype: torch.dtype | None = None,
    ) -> "QuantLinear":
        """Build a layer from stored codes and scales: ``absmax`` float32, or, with ``nested``,
        the uint8 codes of the double-quantized scales (``nested`` holds the rest)."""
        layer = cls(
            in_features,
            out_features,
            bias=bias is not None,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=nested is not None,
            compute_dtype=compute_dtype,
            weight_dtype=weight_dtype,
            device=qweight.device,
        )
        device = qweight.device
        layer._expect("qweight", qweight.reshape(-1), torch.uint8)
        layer.qweight = qweight.reshape(-1).contiguous()
        if quant_map is not None:
            layer._expect("quant_map", quant_map, torch.float32)
            layer.quant_map = quant_map.to(device).contiguous()
        if nested is None:
            layer._expect("absmax", absmax, torch.float32)
            layer.absmax = absmax.to(device).contiguous()
        else:
            layer._expect("absmax", absmax, torch.uint8)
            layer._expect("nested_absmax", nested.absmax, torch.float32)
            if nested.blocksize != NESTED_BLOCKSIZE:
                raise UserError(f"nested block size must be {NESTED_BLOCKSIZE}, got {nested.blocksize}", where="nested_blocksize")
            layer.absmax = absmax.to(device).contiguous()
            layer.nested_absmax = nested.absmax.to(device).contiguous()
            layer.offset = nested.offset.reshape(()).to(device, torch.float32)
            layer.nested_quant_map = nested.code.to(device, torch.float32).contiguous()
        if bias is not None:
            layer.bias.data = bias.detach().to(device, layer.weight_dtype).clone()
        return layer

    def _expect(self, name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
        current = getattr(self, name)
        if value.dtype != dtype or value.numel() != current.numel():
            raise UserError(
                f"expected {current.numel()} values of {dtype} for a {self.out_features}x{self.in_features} "
                f"{self.quant_type} weight in blocks of {self.blocksize}, got {value.numel()} of {value.dtype}",
                where=name,
            )

    def _set_absmax(self, absmax: torch.Tensor) -> None:
        if self.double_quant:
            nested = compress_absmax(absmax)
            self.absmax, self.nested_absmax, self.offset = nested.codes, nested.absmax, nested.offset
        else:
            self.absmax = absmax

    # use ------------------------------------------------------------------------------------
    def block_absmax(self) -> torch.Tensor:
        """The float32 scale of every block (decompressed when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        nested = NestedAbsmax(self.absmax, self.nested_absmax, self.offset, self.nested_quant_map)
        return decompress_absmax(nested)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out_features, in_features]`` in ``dtype`` (default: the compute dtype)."""
        shape, dtype = (self.out_features, self.in_features), dtype or self.compute_dtype
        if self.qtype.storage_bits == 4:
            return dequantize_packed_4bit(self.qweight, self.block_absmax(), self.quant_map, self.blocksize, shape, dtype)
        codes = unpack_codes(self.qweight, math.prod(shape), self.qtype.storage_bits)
        return dequantize_blockwise(codes, self.block_absmax(), self.quant_map, self.blocksize, shape, dtype)

    def _decode_plan(self) -> cpu_gemv.DecodePlan | None:
        """The fused CPU kernel's prepared call (None: the kernel is off, or this is not a 16-code
        4-bit CPU layer with its state in plain buffers), kept between calls and rebuilt whenever a
        buffer or the bias is replaced or moved. A float32 bias is added by the kernel itself."""
        if cpu_gemv.library() is None:
            return None
        state = (*map(self._buffers.get, self._PLAN_STATE), self._parameters.get("bias"))
        kept = self.__dict__.get("_plan")
        if kept is not None and all(map(operator.is_, kept[0], state)) and kept[1] == _address(state[0]):
            return kept[2]
        plan = None
        if state[0] is not None and all(type(t) in (torch.Tensor, nn.Parameter) for t in state if t is not None):
            w = packed_from_layer(self)
            bias = state[-1]
            if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
                bias = None  # added after the call, in the compute dtype
            if w is not None and w.packed.device.type == "cpu" and len(w.shape) == 2:
                plan = cpu_gemv.DecodePlan(w, bias)
        self.__dict__["_plan"] = (state, _address(state[0]), plan)
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x if x.dtype == self.compute_dtype else x.to(self.compute_dtype)
        if (xc.dtype == torch.float32 and xc.device.type == "cpu"
                and 0 < xc.numel() <= cpu_gemv.MAX_ROWS * self.in_features
                and not (xc.requires_grad and torch.is_grad_enabled())):
            plan = self._decode_plan()
            if plan is not None:
                out = plan(xc)
                if plan.tensors[-1] is None and self.bias is not None:
                    out = out + self.bias.to(out.dtype)
                return out if out.dtype == x.dtype else out.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _DequantizedMatmul.apply(xc, self, bias).to(x.dtype)

    def bits_per_parameter(self) -> float:
        """Stored bits per weight: codes plus scales (nested scales and offset included; the shared
        code books and the bias are not counted). NF4 at block 64: 4.5, or ~4.127 double-quantized."""
        tensors = [self.qweight, self.absmax]
        if self.double_quant:
            tensors += [self.nested_absmax, self.offset]
        bits = sum(t.numel() * t.element_size() * 8 for t in tensors)
        return bits / (self.in_features * self.out_features)

    def _apply(self, fn, recurse=True):
        # A dtype cast (model.half(), .to(bfloat16)) must not touch the quantized state.
        kept = {name: self._buffers.get(name) for name in self._FLOAT_STATE}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers.get(name)
            if before is not None and after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"
        )
