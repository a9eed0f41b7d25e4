"""After training: talk to a model, measure it, ship it.

    session.py       load a base (HF folder, GGUF, bnb-4bit folder, alias) plus an unmerged adapter
    prompts.py       prompt text -> token ids (the training chat template, or raw text); stop tokens
    generate.py      batched generation (left padding, KV cache, greedy or sampling); JSONL in/out
    decode.py        the lean decoding loop generate.py runs for Llama / Mistral / Qwen2 / Qwen3 / Phi-3
    chat.py          a terminal chat with history and streamed tokens
    terminal.py      Ctrl-C stops a reply; no echo of keys typed while it streams
    merge.py         fold an adapter into a dense copy of the base it was trained on; write safetensors / nf4
    export_gguf.py   write a llama.cpp GGUF file (f32 / f16 / bf16 / q8_0 / q4_0) from a dense model
    gguf_arch.py     llama.cpp's architecture names, tensor transforms and metadata, per model type
    gguf_tokenizer.py  tokenizer.* metadata: copied from a GGUF source or built from a BPE tokenizer
    evaluate.py      perplexity (strided windows on text, or a data set's responses) and accuracy
    choice.py        multiple-choice accuracy, MMLU style (letter or option log-likelihood, k-shot)
    openai_api.py    OpenAI API request validation and response bodies (no HTTP)
    serve.py         the OpenAI-compatible HTTP server: one base, named adapters picked per request
    judge.py         pairwise judged tournament (both orders, resumable JSONL of judgments)
    judge_clients.py judges: a local model, or an OpenAI-compatible URL (timeouts, retries)
    elo.py           Elo ratings with bootstrap intervals over random game orderings
    *_command.py     the ``generate``, ``chat``, ``merge``, ``eval``, ``serve`` and ``judge`` CLI commands

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
    "choice_accuracy": "loraforge.infer.choice",
    "read_choice_rows": "loraforge.infer.choice",
    "ModelServer": "loraforge.infer.serve",
    "make_server": "loraforge.infer.serve",
    "run_tournament": "loraforge.infer.judge",
    "read_answers": "loraforge.infer.judge",
    "LocalJudge": "loraforge.infer.judge_clients",
    "HttpJudge": "loraforge.infer.judge_clients",
    "bootstrap_elo": "loraforge.infer.elo",
}
__all__ = [
    "GenerationSettings", "HttpJudge", "InferenceSession", "LocalJudge", "ModelServer", "accuracy",
    "bootstrap_elo", "chat_loop", "choice_accuracy", "generate", "generate_ids", "load_for_inference",
    "make_server", "merge_adapter", "perplexity_responses", "perplexity_text", "read_answers",
    "read_choice_rows", "run_tournament", "save_nf4", "save_safetensors", "write_gguf",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loraforge.infer' has no attribute {name!r}")
