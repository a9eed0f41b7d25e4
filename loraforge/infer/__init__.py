"""After training: talk to a model, measure it, ship it.

    session.py       load a base (HF folder, GGUF, bnb-4bit folder, alias) plus an unmerged adapter
    prompts.py       prompt text -> token ids (the training chat template, or raw text); stop tokens
    generate.py      batched generation (left padding, KV cache, greedy or sampling); JSONL in/out
    chat.py          a terminal chat with history and streamed tokens
    terminal.py      Ctrl-C stops a reply; no echo of keys typed while it streams
    merge.py         fold an adapter into a dense copy of the base it was trained on; write safetensors / nf4
    export_gguf.py   write a llama.cpp GGUF file (f32 / f16 / bf16 / q8_0) from a dense Llama
    evaluate.py      perplexity (strided windows on text, or a data set's responses) and accuracy
    *_command.py     the ``generate``, ``chat``, ``merge`` and ``eval`` CLI commands

Names are imported on first use so that ``loraforge --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_for_inference": "loraforge.infer.session",
    "InferenceSession": "loraforge.infer.session",
    "GenerationSettings": "loraforge.infer.generate",
    "generate": "loraforge.infer.generate",
    "generate_ids": "loraforge.infer.generate",
    "chat_loop": "loraforge.infer.chat",
    "merge_adapter": "loraforge.infer.merge",
    "save_safetensors": "loraforge.infer.merge",
    "save_nf4": "loraforge.infer.merge",
    "write_gguf": "loraforge.infer.export_gguf",
    "perplexity_text": "loraforge.infer.evaluate",
    "perplexity_responses": "loraforge.infer.evaluate",
    "accuracy": "loraforge.infer.evaluate",
}
__all__ = [
    "GenerationSettings", "InferenceSession", "accuracy", "chat_loop", "generate", "generate_ids",
    "load_for_inference", "merge_adapter", "perplexity_responses", "perplexity_text", "save_nf4",
    "save_safetensors", "write_gguf",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loraforge.infer' has no attribute {name!r}")
