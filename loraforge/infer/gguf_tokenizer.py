"""GGUF tokenizer metadata (``tokenizer.*``), llama.cpp's view of a Hugging Face tokenizer.

From a GGUF source every ``tokenizer.*`` key is copied with its exact type. Otherwise a fast
byte-level BPE tokenizer becomes llama.cpp's ``gpt2`` tokenizer model: tokens (unused ids up to
the embedding size as ``[PAD{i}]``), token types (added special tokens CONTROL, other added
tokens USER_DEFINED), merges, special ids, the add-BOS flag, the chat template, and
``tokenizer.ggml.pre``: the name under which llama.cpp knows the tokenizer's split rule. llama.cpp's
converter recognizes a pre-tokenizer by hashing its output on a probe text and refuses unknown
ones; loraforge recognizes the Hugging Face pre-tokenizer spec itself:

spec                                                    tokenizer.ggml.pre   (used by)
------------------------------------------------------  -------------------  --------------------
ByteLevel with the GPT-2 regex                          gpt-2                GPT-2, many small BPEs
Digits(individual) + ByteLevel with the GPT-2 regex     smollm               SmolLM / SmolLM2
Split(Llama-3 regex) + ByteLevel without regex          llama-bpe            Llama 3, Granite 3
Split(Qwen2 regex) + ByteLevel without regex            qwen2                Qwen 2 / 2.5 / 3

Anything else is refused (before the model is loaded): export from a GGUF source, or convert the
safetensors output with llama.cpp's own converter.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.errors import UserError

WHERE = "--format gguf"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def _pre_kind(spec: dict | None) -> str:
    """A short signature of a tokenizers pre_tokenizer spec."""
    if not spec:
        return "none"
    kind = spec.get("type")
    if kind == "Sequence":
        return " + ".join(_pre_kind(s) for s in spec.get("pretokenizers", []))
    if kind == "ByteLevel":
        return "ByteLevel(gpt2)" if spec.get("use_regex", True) else "ByteLevel"
    if kind == "Digits":
        return "Digits(individual)" if spec.get("individual_digits") else "Digits"
    if kind == "Split":
        pattern = (spec.get("pattern") or {}).get("Regex") or (spec.get("pattern") or {}).get("String")
        name = {_LLAMA3: "llama3", _QWEN2: "qwen2", _GPT2: "gpt2"}.get(pattern, "custom")
        return f"Split({name})"
    return str(kind)


_PRE_NAMES = {
    "ByteLevel(gpt2)": "gpt-2",
    "Digits(individual) + ByteLevel(gpt2)": "smollm",
    "Split(llama3) + ByteLevel": "llama-bpe",
    "Split(qwen2) + ByteLevel": "qwen2",
}


def check_tokenizer(tokenizer) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE ``tokenizer``; a UserError otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    kind = _pre_kind(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in kind:
        raise UserError(
            "GGUF export builds tokenizer metadata for byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen2 / "
            f"SmolLM style); this tokenizer is {model.get('type') or type(tokenizer).__name__}. Export from a "
            "GGUF source, or use --format safetensors and llama.cpp's converter",
            where=WHERE,
        )
    if kind not in _PRE_NAMES:
        raise UserError(
            f"llama.cpp knows no pre-tokenizer for this tokenizer's split rule ({kind}); GGUF export writes "
            f"{', '.join(sorted(set(_PRE_NAMES.values())))}. Export from a GGUF source, or use --format "
            "safetensors and llama.cpp's converter",
            where=WHERE,
        )
    return _PRE_NAMES[kind]


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

    pre = check_tokenizer(tokenizer)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if len(tokenizer) > vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings only {vocab_size}",
                        where=WHERE)
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
    writer.add_tokenizer_pre(pre)
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
