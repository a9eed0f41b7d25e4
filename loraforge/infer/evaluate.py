"""Evaluation: perplexity and accuracy.

Perplexity = exp(mean negative log-likelihood of the scored tokens), summed per token (never
averaged per window first, so windows of different sizes weigh what they hold).

- Text (``.txt``), WikiText-2 style: the whole file is one token stream (the tokenizer's BOS, if it
  adds one, then the text). Windows of ``window`` tokens start every ``stride`` tokens; each window
  scores only the tokens the previous window did not reach, so every token but the first is scored
  exactly once, each with at least ``window - stride`` tokens of context (except near the start).
  ``stride == window`` gives disjoint windows (faster, less context; the first token of each window
  then has no context and is not scored); defaults: window = min(1024, the model's context),
  stride = window / 2.
- A data set (``.json``, ``.jsonl``, ``.parquet``): the rows are rendered and tokenized exactly as
  for training (``loraforge.data.build_dataset``) and only the trained tokens (the responses) are
  scored: the perplexity of the answers given the prompts.

Accuracy: greedy answers to ``{prompt, answer}`` rows, counted correct by ``exact`` match (both
stripped of surrounding whitespace) or when the answer is ``contained`` in the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraforge.errors import UserError

MATCHES = ("exact", "contains")


@dataclass
class Perplexity:
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # scored tokens

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def text_token_ids(text: str, tokenizer) -> list[int]:
    from loraforge.data.templates import special_prefix

    return list(special_prefix(tokenizer)) + list(tokenizer.encode(text, add_special_tokens=False))


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for each window over ``n`` tokens."""
    if not 0 < stride <= window:
        raise UserError(f"expected 0 < stride <= window, got stride {stride} and window {window}", where="--stride")
    out, scored_to = [], 1  # position 0 has no context: never scored
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + window, n)
        out.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n:
            break
    return out


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def perplexity_text(model, ids: Sequence[int], window: int, stride: int,
                    on_window: Callable[[int], None] | None = None) -> Perplexity:
    """Strided-window perplexity of one token stream (see module docstring); ``on_window(1)``
    after each window (progress)."""
    if len(ids) < 2:
        raise UserError("the text has fewer than 2 tokens; nothing to score")
    device = _device(model)
    tokens = torch.tensor(list(ids), dtype=torch.long, device=device)
    nll, count = 0.0, 0
    for begin, end, first in windows(len(ids), window, stride):
        logits = model(input_ids=tokens[None, begin:end]).logits[0].float()
        # logits at position p predict token p + 1; score targets first..end-1
        pred = logits[first - begin - 1:end - begin - 1]
        target = tokens[first:end]
        nll += F.cross_entropy(pred, target, reduction="sum").item()
        count += end - first
        if on_window is not None:
            on_window(1)
    return Perplexity(nll, count)


@torch.no_grad()
def perplexity_responses(model, examples: Sequence[dict], pad_id: int, batch_size: int = 8,
                         on_batch: Callable[[int], None] | None = None) -> Perplexity:
    """Perplexity of the trained tokens (labels != -100) of tokenized examples;
    ``on_batch(examples in it)`` after each batch (progress)."""
    from loraforge.data import collate

    device = _device(model)
    nll, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id)
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        pred, target = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        nll += F.cross_entropy(pred, target, ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
        if on_batch is not None:
            on_batch(len(batch["input_ids"]))
    return Perplexity(nll, count)


def is_correct(output: str, answer: str, match: str = "exact") -> bool:
    if match == "contains":
        return answer.strip() in output
    return output.strip() == answer.strip()


def read_qa_rows(path) -> list[dict]:
    """``{prompt, answer}`` rows (other fields ignored); errors name the file and line."""
    from loraforge.data import load_records

    rows = load_records(path)
    for row in rows:
        for key in ("prompt", "answer"):
            if not isinstance(row.get(key), str):
                raise UserError(f'expected a string "{key}" field; accuracy needs {{"prompt": ..., "answer": ...}} rows',
                                where=row.where)
    return rows


def accuracy(outputs: Sequence[str], answers: Sequence[str], match: str = "exact") -> tuple[int, int]:
    """(correct, total)."""
    return sum(is_correct(o, a, match) for o, a in zip(outputs, answers)), len(answers)
