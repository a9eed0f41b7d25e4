"""LLM.int8() (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at
Scale", arXiv:2208.07339) as bitsandbytes computes it, and the frozen layer that holds its weights.

Weights are quantized once, row-wise (one scale per output feature, bitsandbytes' ``SCB``):

    SCB_i = max_j |W_ij|,   C_ij = round(127 W_ij / SCB_i)  (int8, ties to even)

A product ``Y = X W^T`` with the vector-wise quantized activation (one scale per token row) and the
mixed-precision decomposition: the feature columns ``O = {j : max_t |X_tj| >= threshold}`` (6.0 by
default; 0 turns the decomposition off) are multiplied in the input's precision with the
dequantized weight columns, the rest in int8 with int32 accumulation:

    X~ = X with its entries |X_tj| >= threshold zeroed,  s_t = max_j |X~_tj|,
    A_tj = round(127 X~_tj / s_t), then A[:, O] = 0 (with more than one row)
    Y  = (A C^T) * (s_t SCB_i) * 6.200124e-05 + b  +  X[:, O] (C[:, O] * SCB / 127)^T

The other entries of an outlier column still count towards ``s_t``, as in bitsandbytes, and
6.200124e-05 ~ 1/127^2 is its constant. Every step follows bitsandbytes 0.50's CPU backend byte for byte: the
weight and the activation are rounded through float16 before they are quantized (bitsandbytes'
``Int8Params`` and ``MatMul8bitLt`` cast both), the scale is taken over the float16 values with the
outliers already zeroed, the int32 product is exact integer arithmetic on AVX-512 CPUs
(``torch._int_mm``) and a float32 matmul of the codes elsewhere, as there (exact while a sum stays
below 2**24; on a GPU only with TF32 matmuls off, PyTorch's default); dequantization is
``C * SCB * 7.874015718698502e-3`` in float32, then one cast. The input gradient is
``dY (C * (SCB / 127))`` in the input's dtype, as in bitsandbytes' backward; the weight is frozen.

bitsandbytes' CPU backend computes a module in *training* mode differently (``MatMul8bitFp``:
dequantize, then one float matmul, no decomposition) to save time; loraforge computes LLM.int8 in
both modes, as bitsandbytes does on CUDA, so that training sees the product inference computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.errors import UserError

INT8_TYPE = "llm_int8"
DEFAULT_THRESHOLD = 6.0
INV_127 = 7.874015718698502e-3  # bitsandbytes' int8_vectorwise_dequant constant
MM_DEQUANT = 6.200124e-05  # bitsandbytes' int8_mm_dequant constant, ~1 / 127**2


def quantize_rowwise(x: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row-wise absmax int8 quantization of a 2-D tensor (bitsandbytes' ``int8_vectorwise_quant``
    applied to ``x`` in float16). Returns ``(codes int8, absmax float32 [rows], outlier columns)``:
    with ``threshold > 0`` the columns holding a value with ``|x| >= threshold`` (int64, possibly
    empty), whose entries are left out of the scales and whose codes are 0; else ``None``."""
    if x.dim() != 2:
        raise UserError(f"row-wise quantization takes a 2-D tensor, got shape {tuple(x.shape)}", where="tensor")
    x16 = x.to(torch.float16)
    cols = None
    if threshold > 0.0:
        outliers = x16.abs() >= threshold
        cols = torch.argwhere(outliers.any(dim=0)).view(-1)
        if cols.numel():
            x16 = x16.masked_fill(outliers, 0)
    absmax = x16.abs().amax(dim=1).float()
    codes = torch.round(x16 * (127.0 / absmax.unsqueeze(-1))).to(torch.int8)
    if cols is not None and cols.numel() and x.shape[0] > 1:
        codes[:, cols] = 0
    return codes, absmax, cols


def dequantize_rowwise(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * absmax / 127`` per row, in float32 (bitsandbytes' ``int8_vectorwise_dequant``), then ``dtype``."""
    return (codes * absmax.view(-1, 1) * INV_127).to(dtype)


def _int32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` of int8 codes as int32, computed as bitsandbytes' backend for the device does."""
    if a.device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512":
        return torch._int_mm(a, b.t())
    return torch.matmul(a.float(), b.float().t()).to(torch.int32)


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None,
                threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """LLM.int8's ``x W^T + b`` for a row-wise quantized ``W`` (``codes`` [out, in], ``scb`` [out]),
    in ``x``'s dtype also under autocast (see the module docstring). No gradient; :class:`Int8Linear`
    adds the input's."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    with torch.autocast(x.device.type, enabled=False):  # an autocast matmul would round the int32 sums
        a, sca, cols = quantize_rowwise(x2, threshold)
        out = _int32_product(a, codes) * (sca.view(-1, 1) * scb.view(1, -1)) * MM_DEQUANT
        if bias is not None:
            out += bias.to(x.dtype)
        out = out.to(x.dtype)
        if cols is not None and cols.numel():
            out = out.addmm(x2[:, cols], dequantize_rowwise(codes[:, cols], scb, x.dtype).t())
    return out.view(*shape[:-1], codes.shape[0])


class _Int8Matmul(torch.autograd.Function):
    """:func:`int8_matmul` with bitsandbytes' input gradient ``dY (C * (SCB / 127))``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Int8Linear", bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer = layer
        return int8_matmul(x, layer.qweight, layer.scb, bias, layer.threshold)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            layer = ctx.layer
            weight = layer.qweight.to(grad_out.dtype).mul_(layer.scb.unsqueeze(1).mul(1.0 / 127.0))
            grad_x = grad_out @ weight
        return grad_x, None, None


class Int8Linear(nn.Module):
    """Frozen LLM.int8 linear layer: ``y = x W^T + b`` with ``W`` as int8 codes (``qweight``
    [out, in]) and per-row float32 scales (``scb`` [out], bitsandbytes' ``SCB``).

    ``threshold`` is the outlier threshold of the decomposition (0: none). The output has the
    input's dtype (as in bitsandbytes); ``compute_dtype`` is the dtype of the full-precision weight
    it came from, which a merge of an adapter into it produces. Casting the module (``.half()``)
    leaves the codes and scales as they are (only ``bias`` is cast).
    """

    quant_type = INT8_TYPE
    fusable = False  # the fused LoRA kernels multiply by the dequantized weight: not LLM.int8's product

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = DEFAULT_THRESHOLD,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = check_threshold(threshold)
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scb", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD,
                    compute_dtype: torch.dtype | None = None) -> "Int8Linear":
        """Quantize an ``nn.Linear`` (as bitsandbytes' ``Int8Params`` does: through float16);
        ``compute_dtype`` defaults to the weight's dtype."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, threshold=threshold,
                    compute_dtype=compute_dtype or weight.dtype, device=weight.device)
        layer.qweight, layer.scb, _ = quantize_rowwise(weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().to(layer.bias.dtype))
        return layer

    @classmethod
    def from_quantized(cls, qweight: torch.Tensor, scb: torch.Tensor, *, bias: torch.Tensor | None = None,
                       threshold: float = DEFAULT_THRESHOLD, compute_dtype: torch.dtype = torch.float32,
                       where: str = "weight") -> "Int8Linear":
        """A layer from stored int8 codes ``[out, in]`` and float32 row scales ``[out]``."""
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise UserError(f"expected an int8 [out, in] weight, got {qweight.dtype} of shape {tuple(qweight.shape)}",
                            where=where)
        out_features, in_features = qweight.shape
        if scb.numel() != out_features or not scb.is_floating_point():
            raise UserError(f"expected {out_features} float row scales (SCB), got {scb.numel()} of {scb.dtype}",
                            where=where.removesuffix("weight") + "SCB")
        layer = cls(in_features, out_features, bias=bias is not None, threshold=threshold,
                    compute_dtype=compute_dtype, device=qweight.device)
        layer.qweight = qweight.contiguous()
        layer.scb = scb.reshape(-1).to(qweight.device, torch.float32).contiguous()
        if bias is not None:
            layer.bias.data = bias.detach().to(qweight.device, compute_dtype).clone()
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out_features, in_features]``: ``C * SCB / 127`` (default dtype: compute_dtype)."""
        return dequantize_rowwise(self.qweight, self.scb, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {x.dtype}")
        if x.numel() == 0:
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return _Int8Matmul.apply(x, self, self.bias)

    def bits_per_parameter(self) -> float:
        """Stored bits per weight: 8 for the code plus 32 / in_features for the row scale."""
        return 8 + 32 / self.in_features

    def _apply(self, fn, recurse=True):
        # A dtype cast (model.half(), .to(bfloat16)) must not touch the row scales.
        before = self._buffers.get("scb")
        super()._apply(fn, recurse)
        after = self._buffers.get("scb")
        if before is not None and after is not None and after.dtype != before.dtype:
            self._buffers["scb"] = before.to(after.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={INT8_TYPE}, threshold={self.threshold}")


def check_threshold(threshold: float, where: str = "llm_int8_threshold") -> float:
    """The outlier threshold: a finite number >= 0 (0 turns the decomposition off)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise UserError(f"expected a number >= 0, got {threshold!r}", where=where) from None
    if not 0.0 <= value < float("inf"):
        raise UserError(f"expected a finite number >= 0 (0: no outlier decomposition), got {threshold!r}", where=where)
    return value
