"""What llama.cpp expects of each architecture loraforge exports to GGUF, as data.

One :class:`GGUFArch` per transformers ``model_type`` (facts from llama.cpp's
``convert_hf_to_gguf.py``, the ``gguf`` package's constants and llama.cpp's model loader):

model_type    general.architecture  tensor quirks
------------  --------------------  ----------------------------------------------------------
llama         llama                 Q/K rows permuted to llama.cpp's interleaved rope pairs
mistral       llama                 as llama (llama.cpp ignores the sliding window, as its converter)
granite       granite               as llama, plus attention/embedding/residual/logit multipliers
qwen2         qwen2                 q/k/v biases; NeoX rope (no permutation)
qwen3         qwen3                 q/k RMSNorm (``attn_q_norm``/``attn_k_norm``)
olmo2         olmo2                 post-norms only, q/k norm over all heads
phi3          phi3                  fused ``attn_qkv`` and ``ffn_up`` (gate then up), partial rope
gemma         gemma                 norms stored as 1 + w; head = token_embd (no output tensor)
gemma2        gemma2                as gemma, plus post-norms, soft-capping, sliding window
gemma3_text   gemma3                norms 1 + w, q/k norm, sliding window every 6th layer global
stablelm      stablelm              LayerNorm with biases, partial NeoX rope, optional q/k/v biases
phi           phi2                  LayerNorm, q/k/v/dense and fc1/fc2 with biases, output bias
gpt_neox      gptneox               fused qkv regrouped from per-head (q, k, v) to q | k | v rows
gpt2          gpt2                  Conv1D weights transposed, position embeddings, head written

(falcon is not exported: its fused-qkv layouts vary with new_decoder_architecture / multi_query.)

Tensor names come from ``gguf.TensorNameMap`` for the GGUF architecture (llama.cpp's converter
uses the same table). :func:`gguf_layout` reads only the config, so ``merge --format gguf``
refuses what llama.cpp cannot express before loading anything: rope scaling, projection
biases where the architecture has none, layer patterns or attention scales llama.cpp hard-codes
differently (Gemma 2/3: scale 1/sqrt(head_dim); Gemma 3: every 6th layer global, local rope
base 10000).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from loraforge.errors import UserError

WHERE = "--format gguf"


@dataclass(frozen=True)
class GGUFArch:
    """The GGUF side of one transformers architecture."""

    arch: str  # general.architecture
    permute_qk: bool = False  # llama.cpp's "normal" rope pairs (x[2i], x[2i+1]); HF's halves
    norm_shift: float = 0.0  # added to every "*norm.weight" (Gemma's RMSNorm scales by 1 + w)
    head_is_embedding: bool = False  # llama.cpp reads the output head from token_embd only
    layer_norm: bool = False  # LayerNorm (weight + bias, ``layer_norm_eps``) instead of RMSNorm
    regroup_qkv: bool = False  # fused qkv rows per head (q, k, v) -> all q, all k, all v (GPT-NeoX)
    transposed: tuple[str, ...] = ()  # state-dict keys stored [in, out] (GPT-2's Conv1D layout)
    head_copy: bool = False  # output.weight written even when tied (llama.cpp's gpt2 reads it)
    refused_flags: tuple[str, ...] = ("attention_bias", "mlp_bias", "use_sliding_window")  # true: refused
    extra: Callable[[object], dict] = field(default=lambda config: {})  # arch-specific metadata


def _granite(config) -> dict:
    return {
        "attention.scale": float(config.attention_multiplier),
        "embedding_scale": float(config.embedding_multiplier),
        "residual_scale": float(config.residual_multiplier),
        "logit_scale": float(config.logits_scaling),
    }


def _phi3(config) -> dict:
    return {"rope.scaling.original_context_length": int(config.original_max_position_embeddings
                                                        or config.max_position_embeddings),
            "attention.sliding_window": int(config.sliding_window or 0)}


def _gemma_scale(config, layers_27b: int) -> None:
    """llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for 27B)."""
    head_dim = config.head_dim
    wanted = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == layers_27b else head_dim
    if config.query_pre_attn_scalar != wanted:
        raise UserError(f"query_pre_attn_scalar {config.query_pre_attn_scalar} is not expressible in GGUF: "
                        f"llama.cpp scales queries by 1/sqrt({wanted}) for this model", where=WHERE)


def _layer_pattern(config, period: int) -> None:
    """llama.cpp hard-codes which layers slide: all but every ``period``-th."""
    types = getattr(config, "layer_types", None)
    wanted = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(config.num_hidden_layers)]
    if types is not None and list(types) != wanted:
        raise UserError(f"layer_types {list(types)} differ from llama.cpp's fixed pattern (every {period}th "
                        "layer global)", where=WHERE)


def _gemma2(config) -> dict:
    _gemma_scale(config, layers_27b=46)
    _layer_pattern(config, 2)
    caps = (config.attn_logit_softcapping, config.final_logit_softcapping)
    if None in caps:
        raise UserError("gemma2 without soft-capping is not expressible in GGUF (llama.cpp always caps)",
                        where=WHERE)
    return {"attn_logit_softcapping": float(caps[0]), "final_logit_softcapping": float(caps[1]),
            "attention.sliding_window": int(config.sliding_window)}


def _gemma3(config) -> dict:
    _gemma_scale(config, layers_27b=62)
    _layer_pattern(config, 6)
    if getattr(config, "attn_logit_softcapping", None):
        raise UserError("gemma3 attention soft-capping is not expressible in GGUF", where=WHERE)
    local = _rope(config, "sliding_attention")
    if local.get("rope_theta", getattr(config, "rope_local_base_freq", 10000.0)) != 10000.0:
        raise UserError("llama.cpp fixes gemma3's local rope base at 10000", where=WHERE)
    meta = {"attention.sliding_window": int(config.sliding_window)}
    if getattr(config, "final_logit_softcapping", None):
        meta["final_logit_softcapping"] = float(config.final_logit_softcapping)
    return meta


def _stablelm(config) -> dict:
    if getattr(config, "use_parallel_residual", False) or getattr(config, "qk_layernorm", False):
        raise UserError("stablelm with a parallel residual or q/k LayerNorm is not supported by the GGUF export",
                        where=WHERE)
    return {}


def _phi2(config) -> dict:
    if getattr(config, "qk_layernorm", False):
        raise UserError("phi with q/k LayerNorm is not expressible in GGUF", where=WHERE)
    return {}


def _gpt_neox(config) -> dict:
    return {"use_parallel_residual": bool(getattr(config, "use_parallel_residual", True)),
            "attention.head_count_kv": int(config.num_attention_heads)}  # multi-head only


def _gpt2(config) -> dict:
    return {"attention.head_count_kv": int(config.num_attention_heads)}


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", permute_qk=True),
    "mistral": GGUFArch("llama", permute_qk=True),
    "granite": GGUFArch("granite", permute_qk=True, extra=_granite),
    "qwen2": GGUFArch("qwen2"),
    "qwen3": GGUFArch("qwen3"),
    "olmo2": GGUFArch("olmo2"),
    "phi3": GGUFArch("phi3", extra=_phi3),
    "gemma": GGUFArch("gemma", norm_shift=1.0, head_is_embedding=True),
    "gemma2": GGUFArch("gemma2", norm_shift=1.0, head_is_embedding=True, extra=_gemma2),
    "gemma3_text": GGUFArch("gemma3", norm_shift=1.0, extra=_gemma3),
    "stablelm": GGUFArch("stablelm", layer_norm=True, extra=_stablelm),
    "phi": GGUFArch("phi2", layer_norm=True, extra=_phi2),
    "gpt_neox": GGUFArch("gptneox", layer_norm=True, regroup_qkv=True, refused_flags=(), extra=_gpt_neox),
    "gpt2": GGUFArch("gpt2", layer_norm=True, transposed=_CONV1D, head_copy=True, extra=_gpt2),
}


def _rope(config, layer_type: str = "full_attention") -> dict:
    """The rope parameters (transformers 5 ``rope_parameters``, per layer type for Gemma 3)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if layer_type in rope and isinstance(rope[layer_type], dict):
        rope = dict(rope[layer_type])
    return rope


def check_exportable(model_type: str) -> GGUFArch:
    """The GGUF spec of ``model_type``, or a UserError listing the exportable architectures."""
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"GGUF export does not support {model_type!r}; it writes {', '.join(ARCHITECTURES)}. "
            "Use --format safetensors (and llama.cpp's convert_hf_to_gguf.py if it knows the architecture)",
            where=WHERE,
        )
    return ARCHITECTURES[model_type]


def gguf_layout(config) -> tuple[GGUFArch, dict]:
    """(spec, metadata) for a transformers config: every ``{arch}.*`` key llama.cpp reads, by its
    name without the ``{arch}.`` prefix. A UserError for what llama.cpp's GGUF cannot express."""
    spec = check_exportable(config.model_type)
    for rope in {id(r): r for r in (_rope(config), _rope(config, "sliding_attention"))}.values():
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise UserError(f"rope scaling {kind!r} is not supported by the GGUF export (only unscaled rope)",
                            where=WHERE)
    for flag in spec.refused_flags:
        if getattr(config, flag, False):
            raise UserError(f"{config.model_type} with {flag} = true is not supported by the GGUF export",
                            where=WHERE)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if spec.arch == "granite" and head_dim * heads != config.hidden_size:
        raise UserError("granite with head_dim != hidden_size / heads is not expressible in GGUF", where=WHERE)
    rotary = _rope(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    theta = _rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0))
    meta = {
        "context_length": int(config.max_position_embeddings),
        "embedding_length": int(config.hidden_size),
        "block_count": int(config.num_hidden_layers),
        "feed_forward_length": int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                                   or 4 * config.hidden_size),
        "attention.head_count": int(heads),
        "attention.head_count_kv": int(getattr(config, "num_key_value_heads", None) or heads),
        "attention.key_length": int(head_dim),
        "attention.value_length": int(head_dim),
        **({"attention.layer_norm_epsilon": float(getattr(config, "layer_norm_eps", None)
                                                  or config.layer_norm_epsilon)} if spec.layer_norm
           else {"attention.layer_norm_rms_epsilon": float(config.rms_norm_eps)}),
        "rope.freq_base": float(theta),
        "rope.dimension_count": int(math.floor(head_dim * rotary)),
        "vocab_size": int(config.vocab_size),
    }
    meta.update(spec.extra(config))
    return spec, meta
