"""Shared pieces of the train tests: the real SmolLM2 tokenizer (from the shipped GGUF file),
a tiny Llama with SmolLM2's vocabulary standing in for the base model, and small data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

import loraforge.models

from conftest import tiny_llama_config

_TOKENIZER = {}


def smollm2_tokenizer(gguf_path: str):
    """SmolLM2's tokenizer (with its chat template), loaded once per test session."""
    if "tok" not in _TOKENIZER:
        from transformers import AutoTokenizer

        path = Path(gguf_path)
        _TOKENIZER["tok"] = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _TOKENIZER["tok"]


def tiny_model(tokenizer, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48)).eval()


def use_tiny_model(monkeypatch, tokenizer) -> list:
    """Make ``loraforge.models.load_model`` return a fresh tiny Llama (same weights every call)."""
    calls = []

    def load_model(source, quantize=None, **kwargs):
        calls.append((source, quantize))
        return tiny_model(tokenizer), tokenizer

    monkeypatch.setattr(loraforge.models, "load_model", load_model, raising=False)
    return calls


def write_chat_data(path: Path, n: int = 24) -> Path:
    """``n`` short conversations in the messages format."""
    words = ["apple", "river", "stone", "cloud", "tiger", "paper", "glass", "music"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = words[i % 8], words[(3 * i + 1) % 8]
            row = {"messages": [{"role": "user", "content": f"Say {a} then {b}."},
                                {"role": "assistant", "content": f"{a} {b} " * (1 + i % 3)}]}
            f.write(json.dumps(row) + "\n")
    return path


def write_segment_data(path: Path, n: int = 16) -> Path:
    """``n`` rows in the ``segments`` format for the tiny word-level tokenizer (t0..t127):
    an untrained prompt, then a trained answer drawn from a small vocabulary (learnable)."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = " ".join(f"t{rng.randrange(3, 128)}" for _ in range(rng.randrange(2, 5)))
            answer = " ".join(f"t{rng.randrange(3, 20)}" for _ in range(rng.randrange(3, 7)))
            f.write(json.dumps({"segments": [{"text": prompt, "label": False},
                                             {"text": " " + answer, "label": True}]}) + "\n")
    return path


def interrupt_after(monkeypatch, at_step: int) -> None:
    """Send this process a SIGINT (a Ctrl-C) right after optimizer step ``at_step`` is logged."""
    import os
    import signal

    from loraforge.train.logging import RunLog

    original = RunLog.step

    def step(self, **kw):
        original(self, **kw)
        if kw["step"] == at_step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunLog, "step", step)


def log_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]
