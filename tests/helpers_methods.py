"""Pieces the method tests (LoftQ, AdaLoRA, SoRA) share: a tiny word-level tokenizer built in
memory (no downloads) for checkpoints that must hold one."""

from __future__ import annotations


def make_tiny_tokenizer(vocab_size: int = 128):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t1", eos_token="t2")

