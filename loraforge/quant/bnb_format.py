"""bitsandbytes' state-dict layouts for a 4-bit and an 8-bit linear layer, both ways (no bitsandbytes needed).

For a layer at ``prefix`` (bitsandbytes ``Linear4bit`` / transformers ``*-bnb-4bit`` checkpoints):

    weight                                   uint8 (ceil(n/2), 1): packed codes, element 2i high nibble
    bias                                     (if any), in the weight's dtype
    weight.absmax                            float32 [nblocks], or uint8 with double quantization
    weight.quant_map                         float32 (16,): the NF4 / FP4 table
    weight.nested_absmax                     float32 [ceil(nblocks / 256)]     (double quant only)
    weight.nested_quant_map                  float32 (256,): dynamic map       (double quant only)
    weight.quant_state.bitsandbytes__nf4     uint8 bytes of the UTF-8 JSON
        {"quant_type", "blocksize", "dtype", "shape"[, "nested_blocksize", "nested_dtype", "nested_offset"]}

(``__fp4`` for FP4.) Only the bitsandbytes types nf4 and fp4 have this format. The 8-bit layout
(``Linear8bitLt``, LLM.int8) is described above :func:`to_bnb8_state_dict`.
"""

from __future__ import annotations

import json

import torch

from loraforge.errors import UserError
from loraforge.quant.double_quant import NestedAbsmax
from loraforge.quant.linear import QuantLinear

BNB_QUANT_TYPES = ("nf4", "fp4")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json_tensor(data: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(data).encode("utf-8")), dtype=torch.uint8)


def to_bnb_state_dict(layer: QuantLinear, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' ``Linear4bit.state_dict()`` holds for this layer, under ``prefix``."""
    if layer.quant_type not in BNB_QUANT_TYPES:
        raise UserError(
            f"bitsandbytes' format holds nf4 or fp4 weights only, not {layer.quant_type!r}", where="quant_type"
        )
    out = {prefix + "weight": layer.qweight.reshape(-1, 1)}
    if layer.bias is not None:
        out[prefix + "bias"] = layer.bias.detach()
    out[prefix + "weight.absmax"] = layer.absmax
    out[prefix + "weight.quant_map"] = layer.quant_map
    meta = {
        "quant_type": layer.quant_type,
        "blocksize": layer.blocksize,
        "dtype": _dtype_name(layer.weight_dtype),
        "shape": [layer.out_features, layer.in_features],
    }
    if layer.double_quant:
        out[prefix + "weight.nested_absmax"] = layer.nested_absmax
        out[prefix + "weight.nested_quant_map"] = layer.nested_quant_map
        meta.update(
            nested_blocksize=256, nested_dtype="float32", nested_offset=layer.offset.item()
        )
    out[prefix + f"weight.quant_state.bitsandbytes__{layer.quant_type}"] = _json_tensor(meta)
    return out


def _read_meta(state_dict: dict[str, torch.Tensor], prefix: str) -> dict:
    keys = [prefix + f"weight.quant_state.bitsandbytes__{t}" for t in BNB_QUANT_TYPES]
    found = [k for k in keys if k in state_dict]
    if not found:
        raise UserError(
            f"no bitsandbytes 4-bit state: expected a key {keys[0]!r} (or __fp4)", where=prefix.rstrip(".") or "state_dict"
        )
    try:
        meta = json.loads(bytes(state_dict[found[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"quant state is not UTF-8 JSON ({err})", where=found[0]) from None
    missing = {"quant_type", "blocksize", "dtype", "shape"} - set(meta)
    if missing:
        raise UserError(f"quant state lacks {sorted(missing)}", where=found[0])
    return meta


def _tensor(state_dict: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise UserError("missing tensor in the bitsandbytes 4-bit state", where=key)
    return state_dict[key]


def from_bnb_state_dict(
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    in_features: int,
    out_features: int,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> QuantLinear:
    """A :class:`QuantLinear` from bitsandbytes' tensors under ``prefix`` (e.g. ``"...q_proj."``).

    ``bias`` defaults to ``state_dict[prefix + "bias"]`` when present; ``compute_dtype`` to the
    dtype recorded in the quant state.
    """
    if prefix and not prefix.endswith("."):
        prefix += "."
    meta = _read_meta(state_dict, prefix)
    where = prefix + "weight.quant_state"
    if list(meta["shape"]) != [out_features, in_features]:
        raise UserError(
            f"quantized weight has shape {meta['shape']}, expected [{out_features}, {in_features}]", where=where
        )
    if meta["quant_type"] not in BNB_QUANT_TYPES:
        raise UserError(f"unknown bitsandbytes quant type {meta['quant_type']!r}; expected nf4 or fp4", where=where)
    weight_dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(weight_dtype, torch.dtype):
        raise UserError(f"unknown dtype {meta['dtype']!r} in the quant state", where=where)
    qweight = _tensor(state_dict, prefix + "weight")
    if qweight.dtype != torch.uint8:  # transformers' bnb_4bit_quant_storage: same bytes, another dtype
        qweight = qweight.contiguous().view(torch.uint8)
    nested = None
    if prefix + "weight.nested_absmax" in state_dict:
        nested = NestedAbsmax(
            codes=_tensor(state_dict, prefix + "weight.absmax"),
            absmax=_tensor(state_dict, prefix + "weight.nested_absmax").float(),
            offset=torch.tensor(float(meta.get("nested_offset", 0.0)), dtype=torch.float32),
            code=_tensor(state_dict, prefix + "weight.nested_quant_map").float(),
            blocksize=int(meta.get("nested_blocksize", 256)),
        )
    if bias is None:
        bias = state_dict.get(prefix + "bias")
    return QuantLinear.from_quantized(
        qweight,
        _tensor(state_dict, prefix + "weight.absmax") if nested is None else nested.codes,
        in_features=in_features,
        out_features=out_features,
        quant_type=meta["quant_type"],
        blocksize=int(meta["blocksize"]),
        nested=nested,
        quant_map=state_dict.get(prefix + "weight.quant_map"),
        bias=bias,
        compute_dtype=compute_dtype or weight_dtype,
        weight_dtype=weight_dtype,
    )


# ----- 8-bit (LLM.int8, bitsandbytes ``Linear8bitLt``) -------------------------------------------
#
#     weight         int8 [out, in]: row-wise codes
#     SCB            float32 [out]: the row absmax
#     weight_format  uint8 scalar 0 ("row", the only layout bitsandbytes >= 0.45 reads)
#     bias           (if any), in the model's dtype


def to_bnb8_state_dict(layer, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' ``Linear8bitLt.state_dict()`` holds for an Int8Linear, under ``prefix``."""
    out = {prefix + "weight": layer.qweight}
    if layer.bias is not None:
        out[prefix + "bias"] = layer.bias.detach()
    out[prefix + "SCB"] = layer.scb
    out[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
    return out


def from_bnb8_state_dict(
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    in_features: int,
    out_features: int,
    *,
    threshold: float,
    compute_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
):
    """An :class:`~loraforge.quant.int8_rowwise.Int8Linear` from bitsandbytes' 8-bit tensors under ``prefix``."""
    from loraforge.quant.int8_rowwise import Int8Linear

    if prefix and not prefix.endswith("."):
        prefix += "."
    weight = _tensor(state_dict, prefix + "weight")
    scb = _tensor(state_dict, prefix + "SCB")
    fmt = state_dict.get(prefix + "weight_format")
    if fmt is not None and int(fmt.reshape(-1)[0]) != 0:
        raise UserError(f"weight format {int(fmt.reshape(-1)[0])} is not 0 ('row'), the only layout bitsandbytes "
                        "still reads; re-save the model with a current bitsandbytes", where=prefix + "weight_format")
    if tuple(weight.shape) != (out_features, in_features):
        raise UserError(f"int8 weight has shape {list(weight.shape)}, expected [{out_features}, {in_features}]",
                        where=prefix + "weight")
    if bias is None:
        bias = state_dict.get(prefix + "bias")
    return Int8Linear.from_quantized(weight, scb, bias=bias, threshold=threshold, compute_dtype=compute_dtype,
                                     where=prefix + "weight")
