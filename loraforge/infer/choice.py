"""Multiple-choice accuracy, MMLU style (Hendrycks et al. 2021), scored as QLoRA scores it.

Rows: MMLU's layout (``question``, a ``choices`` list, ``answer`` as a 0-based index or a letter,
optional ``subject``) or the column layout (``question``, ``A``, ``B``, ``C``, ``D``, ...,
``answer`` letter). The prompt is MMLU's (Hendrycks' ``evaluate.py``)::

    The following are multiple choice questions (with answers) about <subject>.

    <k dev examples, each as below followed by " <letter>\\n\\n">
    <question>
    A. <choice>
    B. <choice>
    Answer:

(``about <subject>`` is dropped when a row has none; underscores in a subject become spaces.)
The ``k`` shots are the first ``k`` rows of the ``--dev`` file with the same subject (all dev
rows when the row has no subject).

Scoring, each a log-likelihood of a continuation given the prompt as plain text (the
tokenizer's BOS, if it adds one, first):

- ``letter`` (default; QLoRA's ``--do_mmlu_eval``): the continuation ``" A"``, ``" B"``, ...;
  the prediction is the likeliest letter.
- ``option``: the prompt without the lettered list (``<question>\\nAnswer:``, shots answered with
  their text), the continuation ``" <choice text>"``; the prediction maximises the mean
  log-probability per continuation token (length-normalised, so long options are not penalised
  for their length).

A continuation's tokens are those of ``prompt + continuation`` past the tokens of ``prompt``
(as lm-evaluation-harness splits them), so a tokenizer that merges across the boundary is
handled. Ties go to the earlier choice.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from loraforge.errors import UserError

LETTERS = string.ascii_uppercase
SCORES = ("letter", "option")


@dataclass
class ChoiceItem:
    question: str
    choices: list[str]
    answer: int  # index into choices
    subject: str | None = None
    where: str | None = None


@dataclass
class ChoiceResult:
    """Counts per subject (``None``: rows without one) and the predictions, in row order."""

    predictions: list[int] = field(default_factory=list)
    per_subject: dict[str | None, list[int]] = field(default_factory=dict)  # subject -> [correct, total]

    @property
    def correct(self) -> int:
        return sum(c for c, _ in self.per_subject.values())

    @property
    def total(self) -> int:
        return sum(t for _, t in self.per_subject.values())


def read_choice_rows(path: str | Path) -> list[ChoiceItem]:
    """Rows in either layout (see module docstring); errors name the file, line and key."""
    from loraforge.data import load_records

    items = []
    for row in load_records(path):
        where = row.where
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise UserError('expected a non-empty "question" string', where=where)
        if "choices" in row:
            choices = row["choices"]
            if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
                raise UserError('expected "choices" to be a list of at least 2 strings', where=where)
        else:
            choices = []
            for letter in LETTERS:
                if letter not in row:
                    break
                if not isinstance(row[letter], str):
                    raise UserError(f'expected choice "{letter}" to be a string', where=where)
                choices.append(row[letter])
            if len(choices) < 2:
                raise UserError('expected a "choices" list or columns "A", "B", ... (at least 2)', where=where)
        if len(choices) > len(LETTERS):
            raise UserError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}", where=where)
        subject = row.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise UserError('expected "subject" to be a string', where=where)
        items.append(ChoiceItem(question, list(choices), _answer_index(row.get("answer"), len(choices), where),
                                subject or None, where))
    return items


def _answer_index(answer, n: int, where: str | None) -> int:
    letters = LETTERS[:n]
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, str) and answer.strip().upper() in letters and len(answer.strip()) == 1:
        return letters.index(answer.strip().upper())
    if isinstance(answer, int) and 0 <= answer < n:
        return answer
    raise UserError(f'expected "answer" to be an index 0..{n - 1} or a letter {letters[0]}..{letters[-1]}, '
                    f"got {answer!r}", where=where)


# ----- prompts ---------------------------------------------------------------------------------

def _header(subject: str | None) -> str:
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def _question(item: ChoiceItem, score: str) -> str:
    if score == "option":
        return f"{item.question}\nAnswer:"
    lines = [item.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
    return "\n".join(lines) + "\nAnswer:"


def _continuations(item: ChoiceItem, score: str) -> list[str]:
    if score == "option":
        return [f" {c}" for c in item.choices]
    return [f" {LETTERS[i]}" for i in range(len(item.choices))]


def shots_for(item: ChoiceItem, dev: Sequence[ChoiceItem], k: int, dev_name: str = "--dev") -> list[ChoiceItem]:
    """The first ``k`` dev rows of the item's subject (all dev rows when it has none)."""
    if k == 0:
        return []
    pool = [d for d in dev if d.subject == item.subject] if item.subject else list(dev)
    if len(pool) < k:
        about = f" with subject {item.subject!r}" if item.subject else ""
        raise UserError(f"{k} shots need {k} dev rows{about}; the dev file has {len(pool)}", where=dev_name)
    return pool[:k]


def prompt_for(item: ChoiceItem, shots: Sequence[ChoiceItem], score: str) -> str:
    text = _header(item.subject)
    for shot in shots:
        text += _question(shot, score) + _continuations(shot, score)[shot.answer] + "\n\n"
    return text + _question(item, score)


# ----- scoring ---------------------------------------------------------------------------------

def split_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with the tokenizer's BOS, continuation ids) as described in the module docstring."""
    from loraforge.data.templates import special_prefix

    prefix = list(special_prefix(tokenizer))
    ctx = list(tokenizer.encode(context, add_special_tokens=False))
    whole = list(tokenizer.encode(context + continuation, add_special_tokens=False))
    if whole[:len(ctx)] != ctx:  # the boundary merged: score the continuation on its own
        return prefix + ctx, list(tokenizer.encode(continuation, add_special_tokens=False))
    return prefix + ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8,
                          on_batch: Callable[[int], None] | None = None) -> list[float]:
    """Summed log p(continuation | context) for each (non-empty context ids, non-empty
    continuation ids) pair.

    Pairs whose ``context + continuation[:-1]`` agree (the letters " A", " B", ... after one
    prompt) share one forward pass over that sequence: its last position gives every member's
    final token, the earlier positions their shared tokens (a causal model's logits at a position
    do not depend on what follows). Sequences run in batches of similar length, right-padded, so
    real tokens keep positions 0..n-1."""
    device = next(model.parameters()).device
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        groups.setdefault((len(ctx), tuple(ctx) + tuple(cont[:-1])), []).append(i)
    keys = sorted(groups, key=lambda key: len(key[1]))
    out = [0.0] * len(pairs)
    for start in range(0, len(keys), batch_size):
        chunk = keys[start:start + batch_size]
        width = max(len(seq) for _, seq in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, seq) in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logprobs = F.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for row, (n_ctx, seq) in enumerate(chunk):
            lp, end = logprobs[row], len(seq) - 1
            shared_targets = torch.tensor(seq[n_ctx:], dtype=torch.long, device=device)
            shared = lp[torch.arange(n_ctx - 1, end, device=device), shared_targets].sum().item()
            for i in groups[(n_ctx, seq)]:
                out[i] = shared + lp[end, pairs[i][1][-1]].item()
        if on_batch is not None:
            on_batch(sum(len(groups[key]) for key in chunk))
    return out


def choice_accuracy(model, tokenizer, items: Sequence[ChoiceItem], *, score: str = "letter",
                    dev: Sequence[ChoiceItem] = (), shots: int = 0, pad_id: int = 0, batch_size: int = 8,
                    on_batch: Callable[[int], None] | None = None, dev_name: str = "--dev") -> ChoiceResult:
    """Predictions and per-subject accuracy of ``items`` (see module docstring)."""
    if score not in SCORES:
        raise UserError(f"expected one of {', '.join(SCORES)}, got {score!r}", where="--score")
    pairs, owners = [], []
    for n, item in enumerate(items):
        context = prompt_for(item, shots_for(item, dev, shots, dev_name), score)
        for continuation in _continuations(item, score):
            pair = split_ids(tokenizer, context, continuation)
            if not pair[1]:
                raise UserError("a choice encodes to no tokens", where=item.where)
            pairs.append(pair)
            owners.append(n)
    logprobs = continuation_logprobs(model, pairs, pad_id, batch_size, on_batch)
    scores: list[list[float]] = [[] for _ in items]
    for (_, cont), owner, lp in zip(pairs, owners, logprobs):
        scores[owner].append(lp / len(cont) if score == "option" else lp)
    result = ChoiceResult()
    for item, row in zip(items, scores):
        best = max(range(len(row)), key=lambda i: (row[i], -i))
        result.predictions.append(best)
        counts = result.per_subject.setdefault(item.subject, [0, 0])
        counts[0] += int(best == item.answer)
        counts[1] += 1
    return result


def continuations_count(items: Sequence[ChoiceItem]) -> int:
    """How many sequences ``choice_accuracy`` scores (for a progress bar)."""
    return sum(len(item.choices) for item in items)
