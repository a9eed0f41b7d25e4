"""Writing a dense model as a GGUF file for llama.cpp and Ollama.

The architecture's GGUF layout (names, metadata, tensor transforms) is data in ``gguf_arch.py``;
this module applies it: tensor names from ``gguf.TensorNameMap`` (what llama.cpp's
``convert_hf_to_gguf.py`` uses), e.g. for llama

    model.embed_tokens.weight                     token_embd.weight
    model.layers.{i}.input_layernorm.weight       blk.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj     blk.{i}.attn_{q,k,v,output}.weight
    model.layers.{i}.post_attention_layernorm     blk.{i}.ffn_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj      blk.{i}.ffn_{gate,up,down}.weight
    model.norm.weight                             output_norm.weight
    lm_head.weight                                output.weight (absent when tied to the embeddings)

For the rope architectures llama.cpp runs with interleaved pairs (llama, mistral, granite) Q and
K rows are permuted from transformers' rotary layout (rotate_half: the two halves of each head):
per head, row ``j * 2 + p`` of the GGUF tensor is row ``p * d/2 + j`` of the transformers one
(``reshape(n, 2, d/2, in).swapaxes(1, 2)``), ``n`` = attention heads for Q, key/value heads for K;
transformers' GGUF loader undoes it. Gemma's norms are stored as 1 + w.

Storage types (``gguf_type``): ``f32``; ``f16`` and ``bf16`` (2-D weights in that type, norms and
biases F32, as llama.cpp's converter does); ``q8_0`` (2-D weights in blocks of 32: int8 codes,
one f16 scale max|x|/127 per block); ``q4_0`` as llama.cpp's ``llama-quantize`` makes it
(``quantize_row_q4_0_ref``: per block of 32, d = the signed value of largest magnitude / -8,
codes min(15, trunc(x/d + 8.5)), two per byte, low nibbles the block's first half), with the
output head (``output.weight``, or ``token_embd.weight`` when it doubles as the head) in Q8_0:
llama-quantize puts the head in Q6_K, falling back to Q8_0 when its rows are not a multiple of
256; loraforge always writes that fallback (no exact Q6_K here), a slightly larger, more precise
head. Position embeddings (GPT-2) stay F32, as llama.cpp's converter and quantizer keep them.
A weight whose rows are not a multiple of 32 stays F16 under q8_0 and q4_0. Tokenizer
metadata (``tokenizer.*``): copied verbatim from the source GGUF file when the model came from
one, otherwise built from the Hugging Face tokenizer (byte-level BPE only: ``gpt2`` model,
tokens, merges, token types, special ids, add-BOS flag, chat template, and the pre-tokenizer
name llama.cpp knows the tokenizer's split pattern by).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loraforge.errors import UserError
from loraforge.files import apply_umask

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
DTYPE_TO_GGUF = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotary row order -> llama.cpp's (see module docstring)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_names(arch: str, n_layers: int):
    """HF key -> GGUF tensor name for ``arch`` (a UserError for a tensor llama.cpp has no slot for)."""
    import gguf

    enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    table = gguf.get_tensor_name_map(enum, n_layers)

    def name(key: str) -> str:
        found = table.get_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UserError(f"tensor {key!r} has no GGUF name in llama.cpp's {arch!r} layout", where="--format gguf")
        return found

    return name


def storage_type(name: str, shape: tuple[int, ...], gguf_type: str, head: str) -> str:
    """The GGML type one tensor is written in (see the module docstring)."""
    if len(shape) == 1 or gguf_type == "f32" or name == "position_embd.weight":  # as llama.cpp keeps it
        return "f32"
    if gguf_type in ("q8_0", "q4_0") and shape[-1] % 32:
        return "f16"
    if gguf_type == "q4_0" and name == head:
        return "q8_0"
    return gguf_type


def _encode(array: np.ndarray, ggml_type: str):
    """(data, raw GGML type or None) for one float32 tensor in ``ggml_type``."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if ggml_type == "f32":
        return array.astype(np.float32), None
    if ggml_type == "f16":
        return array.astype(np.float16), None
    raw = {"bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[ggml_type]
    return quantize(array, raw), raw


def file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[gguf_type]


def regroup_qkv(array: np.ndarray, n_head: int) -> np.ndarray:
    """GPT-NeoX's fused rows (per head: q, k, v) -> all q rows, all k rows, all v rows."""
    return array.reshape(n_head, 3, -1).swapaxes(0, 1).reshape(array.shape)


def gguf_tensors(model: nn.Module, spec, meta: dict, tied: bool):
    """(GGUF name, float32 array) for every tensor of a dense ``model`` under ``spec``."""
    name_of = tensor_names(spec.arch, meta["block_count"])
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        array = tensor.detach().float().cpu().numpy()
        if key.endswith(spec.transposed or ("\0",)):
            array = np.ascontiguousarray(array.T)
        if spec.regroup_qkv and key.endswith(("query_key_value.weight", "query_key_value.bias")):
            array = regroup_qkv(array, meta["attention.head_count"])
        elif spec.permute_qk and key.endswith("self_attn.q_proj.weight"):
            array = permute_qk(array, meta["attention.head_count"])
        elif spec.permute_qk and key.endswith("self_attn.k_proj.weight"):
            array = permute_qk(array, meta["attention.head_count_kv"])
        elif spec.norm_shift and key.endswith("norm.weight"):
            array = array + np.float32(spec.norm_shift)
        yield name_of(key), array
        if tied and spec.head_copy and name_of(key) == "token_embd.weight":
            yield "output.weight", array


def _add_metadata(writer, arch: str, meta: dict) -> None:
    for key, value in meta.items():
        full = f"{arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        else:
            writer.add_float32(full, value)


@torch.no_grad()
def write_gguf(model: nn.Module, tokenizer, path: str | Path, gguf_type: str = "f16", *,
               source_gguf: str | Path | None = None, name: str | None = None) -> Path:
    """Write ``model`` (dense; quantized layers are dequantized first) to ``path`` atomically."""
    import gguf

    from loraforge.errors import check_choice
    from loraforge.infer.gguf_arch import gguf_layout
    from loraforge.infer.gguf_tokenizer import add_tokenizer_metadata, copy_tokenizer_metadata
    from loraforge.infer.merge import dequantize_all, is_tied

    check_choice(gguf_type, GGUF_TYPES, "GGUF type", where="--gguf-type")
    spec, meta = gguf_layout(model.config)
    dequantize_all(model)
    tied = is_tied(model)
    if spec.head_is_embedding and not tied:
        raise UserError(f"llama.cpp's {spec.arch} reads its output head from the embeddings; this merged model "
                        "has its own head (an adapted or trained lm_head) that GGUF cannot hold", where="--format gguf")
    head = "token_embd.weight" if (tied and not spec.head_copy) or spec.head_is_embedding else "output.weight"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, spec.arch)
        writer.add_type("model")
        writer.add_name(name or "loraforge-merged")
        _add_metadata(writer, spec.arch, meta)
        writer.add_file_type(file_type(gguf_type))
        if gguf_type in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if source_gguf is not None:
            copy_tokenizer_metadata(writer, Path(source_gguf))
        else:
            add_tokenizer_metadata(writer, tokenizer, meta["vocab_size"])
        for tensor_name, array in gguf_tensors(model, spec, meta, tied):
            data, raw_type = _encode(array, storage_type(tensor_name, array.shape, gguf_type, head))
            writer.add_tensor(tensor_name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_exportable_source(source: str | Path) -> None:
    """Refuse, from the config and tokenizer alone, a model that ``write_gguf`` could not write:
    ``merge --format gguf`` calls it before the (slow) load and merge."""
    from loraforge.infer.gguf_arch import check_exportable, gguf_layout
    from loraforge.infer.gguf_tokenizer import check_tokenizer
    from loraforge.models import detect_format, resolve_model_path

    path = resolve_model_path(source)
    if detect_format(path) == "gguf":
        from loraforge.models.validate import check_gguf

        check_exportable(check_gguf(path))  # its tokenizer metadata is copied verbatim
        return
    from transformers import AutoConfig

    from loraforge.models.load import load_tokenizer
    from loraforge.models.quiet import quiet_transformers

    with quiet_transformers():
        config = AutoConfig.from_pretrained(path)
    spec, _ = gguf_layout(config)
    if spec.head_is_embedding and not getattr(config, "tie_word_embeddings", True):
        raise UserError(f"llama.cpp's {spec.arch} reads its output head from the embeddings; this model has "
                        "its own (tie_word_embeddings = false)", where=str(path / "config.json"))
    check_tokenizer(load_tokenizer(path))
