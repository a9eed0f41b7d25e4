"""Helpers for the data tests: a tokenizer-free character tokenizer and the SmolLM2 tokenizer
(loaded from the embedded GGUF once per test session)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class CharTokenizer:
    """One token per character (id = code point + 3); 1 = BOS, 2 = EOS; no chat template."""

    bos_token_id, eos_token_id = 1, 2
    bos_token, eos_token = "<s>", "</s>"
    chat_template = None

    def __init__(self, add_bos: bool = False):
        self.add_bos = add_bos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) + 3 for c in text]
        return [self.bos_token_id, *ids] if (add_special_tokens and self.add_bos) else ids

    def decode(self, ids) -> str:
        names = {self.bos_token_id: self.bos_token, self.eos_token_id: self.eos_token}
        return "".join(names.get(i, chr(i - 3) if i >= 3 else "?") for i in ids)


@functools.lru_cache(maxsize=1)
def _load_smollm2(gguf: str):
    from transformers import AutoTokenizer

    path = Path(gguf)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smol_tok(smollm2_gguf):
    """The SmolLM2-135M-Instruct tokenizer (with its ChatML-style Jinja template)."""
    return _load_smollm2(smollm2_gguf)


def labelled_spans(labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive trained labels (label != -100), as token id lists."""
    spans, run = [], []
    for t in labels:
        if t == -100:
            if run:
                spans.append(run)
            run = []
        else:
            run.append(t)
    if run:
        spans.append(run)
    return spans
