"""Blockwise k-bit quantization (NF4/FP4 as in QLoRA and bitsandbytes, NF-k/INT-k for LoftQ),
double quantization, the frozen quantized linear layer, LLM.int8's row-wise 8-bit layer and
bitsandbytes' state-dict formats."""

from loraforge.quant.blockwise import (
    dequantize_blockwise,
    pack_2bit,
    pack_4bit,
    quantize_blockwise,
    quantize_blockwise_8bit,
    unpack_2bit,
    unpack_4bit,
)
from loraforge.quant.bnb_format import from_bnb8_state_dict, from_bnb_state_dict, to_bnb8_state_dict, to_bnb_state_dict
from loraforge.quant.codebooks import FP4, NF4, QUANT_TYPES, dynamic_map, get_codebook, int_codebook, nf_codebook
from loraforge.quant.double_quant import NestedAbsmax, compress_absmax, decompress_absmax
from loraforge.quant.int8_rowwise import Int8Linear, dequantize_rowwise, int8_matmul, quantize_rowwise
from loraforge.quant.linear import QuantLinear
from loraforge.quant.replace import quantize_model

__all__ = [
    "FP4",
    "Int8Linear",
    "NF4",
    "QUANT_TYPES",
    "NestedAbsmax",
    "QuantLinear",
    "compress_absmax",
    "decompress_absmax",
    "dequantize_blockwise",
    "dequantize_rowwise",
    "dynamic_map",
    "from_bnb8_state_dict",
    "from_bnb_state_dict",
    "get_codebook",
    "int8_matmul",
    "int_codebook",
    "nf_codebook",
    "pack_2bit",
    "pack_4bit",
    "quantize_blockwise",
    "quantize_blockwise_8bit",
    "quantize_model",
    "quantize_rowwise",
    "to_bnb8_state_dict",
    "to_bnb_state_dict",
    "unpack_2bit",
    "unpack_4bit",
]
