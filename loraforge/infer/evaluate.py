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

Both score through the chunked linear + cross-entropy of training
(:mod:`loraforge.kernels.cross_entropy`: no ``[tokens, vocab]`` logits, the head's logit
transforms of the architecture's spec) when the model is a transformers causal LM with such a
spec and a plain head, and through the model's own logits otherwise (the same values: tested).

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


def _chunked_head(model):
    """``(decoder, head weight, logit divisor, soft cap)`` when the summed NLL can come from the
    decoder's hidden states and the chunked loss exactly as from ``model(...).logits`` (a known
    architecture; the causal LM and its head unhooked and unpatched; a bias-free linear head),
    else None."""
    from loraforge.infer.decode import causal_lm
    from loraforge.kernels.arch_specs import spec_for
    from loraforge.kernels.dispatch import unhooked

    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    arch = spec_for(getattr(config, "model_type", None))
    head, decoder = getattr(lm, "lm_head", None), getattr(lm, "model", None)
    if arch is None or type(head) is not torch.nn.Linear or head.bias is not None or not hasattr(decoder, "layers"):
        return None
    if not unhooked(lm, head):
        return None
    return decoder, head.weight, *arch.logit_transforms(config)


def _summed_nll(model, head, inputs: dict, targets: torch.Tensor) -> float:
    """``sum -log p(targets[b, p] | inputs up to p)`` over the targets that are not -100
    (``targets [B, T]`` aligned with the input positions: position p predicts ``targets[:, p]``);
    ``head`` is :func:`_chunked_head`'s answer for ``model``."""
    from loraforge.kernels.cross_entropy import linear_cross_entropy

    if head is None:
        logits = model(**inputs).logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                               reduction="sum").item()
    decoder, weight, divisor, softcap = head
    hidden = decoder(**inputs).last_hidden_state
    return linear_cross_entropy(hidden, weight, targets, reduction="sum", divisor=divisor, softcap=softcap).item()


@torch.no_grad()
def perplexity_text(model, ids: Sequence[int], window: int, stride: int,
                    on_window: Callable[[int], None] | None = None) -> Perplexity:
    """Strided-window perplexity of one token stream (see module docstring); ``on_window(1)``
    after each window (progress)."""
    if len(ids) < 2:
        raise UserError("the text has fewer than 2 tokens; nothing to score")
    device = _device(model)
    tokens = torch.tensor(list(ids), dtype=torch.long, device=device)
    nll, count, head = 0.0, 0, _chunked_head(model)
    for begin, end, first in windows(len(ids), window, stride):
        # position p predicts token p + 1; score the targets first..end-1
        targets = torch.full((1, end - begin), -100, dtype=torch.long, device=device)
        targets[0, first - begin - 1:end - begin - 1] = tokens[first:end]
        nll += _summed_nll(model, head, {"input_ids": tokens[None, begin:end]}, targets)
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
    nll, count, head = 0.0, 0, _chunked_head(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id)
        labels = batch.pop("labels").to(device)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position p predicts p + 1
        nll += _summed_nll(model, head, {k: v.to(device) for k, v in batch.items()}, targets)
        count += int((targets != -100).sum())
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
