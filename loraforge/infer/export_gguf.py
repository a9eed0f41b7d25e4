"""Writing a dense Llama-architecture model as a GGUF file for llama.cpp and Ollama.

Layout (llama.cpp's ``convert_hf_to_gguf.py`` for ``LlamaForCausalLM``, arch ``llama``):

    model.embed_tokens.weight                     token_embd.weight
    model.layers.{i}.input_layernorm.weight       blk.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj     blk.{i}.attn_{q,k,v,output}.weight
    model.layers.{i}.post_attention_layernorm     blk.{i}.ffn_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj      blk.{i}.ffn_{gate,up,down}.weight
    model.norm.weight                             output_norm.weight
    lm_head.weight                                output.weight (absent when tied to the embeddings)

Q and K rows are permuted from transformers' rotary layout (rotate_half: the two halves of each
head) to llama.cpp's (interleaved pairs): per head, row ``j * 2 + p`` of the GGUF tensor is row
``p * d/2 + j`` of the transformers one (``reshape(n, 2, d/2, in).swapaxes(1, 2)``), with
``n`` = attention heads for Q and key/value heads for K; transformers' GGUF loader undoes it.

Storage types (``gguf_type``): ``f32``; ``f16`` and ``bf16`` (2-D weights in that type, norms
F32, as llama.cpp does); ``q8_0`` (2-D weights in blocks of 32: int8 codes with one f16 scale
max|x|/127 per block; a weight whose rows are not a multiple of 32 stays F16). Metadata: the
hyper-parameters under ``llama.*``, and the tokenizer under ``tokenizer.*``: copied verbatim
from the source GGUF file when the model came from one, otherwise built from the Hugging Face
tokenizer (byte-level BPE only: ``gpt2`` model, tokens, merges, token types, special ids,
add-BOS flag, chat template).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loraforge.errors import UserError
from loraforge.files import apply_umask

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DTYPE_TO_GGUF = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotary row order -> llama.cpp's (see module docstring)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_name(key: str) -> str:
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    parts = key.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    raise UserError(f"tensor {key!r} has no GGUF name in the Llama layout", where="--format gguf")


def hyperparameters(config) -> dict:
    """The Llama hyper-parameters GGUF needs; a UserError for what llama's GGUF cannot express."""
    if config.model_type != "llama":
        raise UserError(
            f"GGUF export writes Llama-architecture models; this one is {config.model_type!r}. "
            "Use --format safetensors and llama.cpp's convert_hf_to_gguf.py for other architectures",
            where="--format gguf",
        )
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"rope scaling {rope_type!r} is not supported by the GGUF export (only unscaled rope)",
                        where="--format gguf")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("projection biases are not supported by the GGUF export", where="--format gguf")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": heads,
        "head_count_kv": config.num_key_value_heads or heads,
        "head_dim": head_dim,
        "rms_eps": float(config.rms_norm_eps),
        "rope_theta": float(theta),
        "vocab_size": config.vocab_size,
    }


def _encode(array: np.ndarray, gguf_type: str):
    """(data, raw GGML type or None) for one float32 tensor under the chosen storage type."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if array.ndim == 1 or gguf_type == "f32":
        return array.astype(np.float32), None
    if gguf_type == "f16" or (gguf_type == "q8_0" and array.shape[-1] % 32):
        return array.astype(np.float16), None
    if gguf_type == "bf16":
        return quantize(array, Q.BF16), Q.BF16
    return quantize(array, Q.Q8_0), Q.Q8_0


def file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0}[gguf_type]


@torch.no_grad()
def write_gguf(model: nn.Module, tokenizer, path: str | Path, gguf_type: str = "f16", *,
               source_gguf: str | Path | None = None, name: str | None = None) -> Path:
    """Write ``model`` (dense Llama; quantized layers are dequantized first) to ``path`` atomically."""
    import gguf

    from loraforge.errors import check_choice
    from loraforge.infer.merge import dequantize_all, is_tied

    check_choice(gguf_type, GGUF_TYPES, "GGUF type", where="--gguf-type")
    hp = hyperparameters(model.config)
    dequantize_all(model)
    tied = is_tied(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_type("model")
        writer.add_name(name or "loraforge-merged")
        writer.add_context_length(hp["context_length"])
        writer.add_embedding_length(hp["embedding_length"])
        writer.add_block_count(hp["block_count"])
        writer.add_feed_forward_length(hp["feed_forward_length"])
        writer.add_rope_dimension_count(hp["head_dim"])
        writer.add_head_count(hp["head_count"])
        writer.add_head_count_kv(hp["head_count_kv"])
        if hp["head_dim"] * hp["head_count"] != hp["embedding_length"]:
            writer.add_key_length(hp["head_dim"])
            writer.add_value_length(hp["head_dim"])
        writer.add_layer_norm_rms_eps(hp["rms_eps"])
        writer.add_rope_freq_base(hp["rope_theta"])
        writer.add_vocab_size(hp["vocab_size"])
        writer.add_file_type(file_type(gguf_type))
        if gguf_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if source_gguf is not None:
            copy_tokenizer_metadata(writer, Path(source_gguf))
        else:
            add_tokenizer_metadata(writer, tokenizer, hp["vocab_size"])
        for key, tensor in model.state_dict().items():
            if tied and key == "lm_head.weight":
                continue
            array = tensor.detach().float().cpu().numpy()
            if key.endswith("self_attn.q_proj.weight"):
                array = permute_qk(array, hp["head_count"])
            elif key.endswith("self_attn.k_proj.weight"):
                array = permute_qk(array, hp["head_count_kv"])
            data, raw_type = _encode(array, gguf_type)
            writer.add_tensor(gguf_name(key), data, raw_dtype=raw_type)
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


def copy_tokenizer_metadata(writer, source: Path) -> None:
    """Every ``tokenizer.*`` key of the source GGUF file, with its exact type."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(field.types[0])
        sub_type = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def add_tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE tokenizer metadata (llama.cpp's ``gpt2`` model) from a fast HF tokenizer."""
    from gguf import TokenType

    from loraforge.data.templates import special_prefix

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise UserError(
            "GGUF export builds tokenizer metadata for byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM "
            f"style); this tokenizer is {model.get('type') or type(tokenizer).__name__}. Export from a GGUF "
            "source, or use --format safetensors and llama.cpp's converter",
            where="--format gguf",
        )
    if len(tokenizer) > vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings only {vocab_size}",
                        where="--format gguf")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(special_prefix(tokenizer)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
