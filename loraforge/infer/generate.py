"""Generation: batched, left-padded, with a KV cache; greedy or sampled.

Prompts of different lengths share a batch by padding on the left: every row's last prompt
token sits in the same column, so one decoding step appends one token to every row. The
attention mask hides the padding, and transformers' ``generate`` derives each row's positions
from that mask (``position = cumsum(mask) - 1``), so a padded row computes exactly what it would
alone; greedy decoding therefore gives the same tokens in a batch as one prompt at a time (up to
floating-point reassociation, which the tests check does not change any argmax). Keys and values
of earlier tokens are cached, so each step runs the model on one new token per row.

Decoding (the usual definitions, Holtzman et al. 2020 for top-p): ``temperature == 0`` is greedy
(argmax); otherwise logits are divided by the temperature, cut to the ``top_k`` most likely tokens
(0: no cut) and to the smallest set whose probability reaches ``top_p`` (1.0: no cut), and a
token is drawn. ``seed`` seeds torch's generator once per run. A row stops at any stop id (EOS,
end-of-turn); the stop token is not part of the returned text.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.errors import UserError
from loraforge.files import apply_umask


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"expected a positive number of new tokens, got {self.max_new_tokens}", where="--max-new-tokens")
        if self.temperature < 0:
            raise UserError(f"expected a temperature >= 0 (0 = greedy), got {self.temperature}", where="--temperature")
        if not 0 < self.top_p <= 1:
            raise UserError(f"expected 0 < top-p <= 1, got {self.top_p}", where="--top-p")
        if self.top_k < 0:
            raise UserError(f"expected top-k >= 0 (0 = no cut), got {self.top_k}", where="--top-k")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def hf_config(self, stop_ids: Sequence[int], pad_id: int):
        """A ``GenerationConfig`` that pins every knob that changes the result, so that nothing is
        filled in from the model's own generation config (transformers fills only unset fields):
        no repetition penalty or n-gram ban sneaks in, and sampling uses exactly our cuts. (In
        greedy mode the sampling knobs are unused and left unset.) The stop ids are pinned even when
        there are none: an empty list, not ``None``, which transformers would fill with the model's
        EOS, stopping a run that was asked for exactly ``max_new_tokens`` tokens."""
        from transformers import GenerationConfig

        sampling = {} if self.greedy else {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": 0.0,
            "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
        }
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=0,
            do_sample=not self.greedy,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            num_beams=1,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            use_cache=True,
            **sampling,
        )


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The generated tokens before the first stop id."""
    out = []
    for t in tokens:
        if t in stop_ids:
            break
        out.append(int(t))
    return out


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], settings: GenerationSettings, *, stop_ids: Sequence[int],
                 pad_id: int, streamer=None, should_stop: Callable[[], bool] | None = None) -> list[list[int]]:
    """New token ids for each prompt (one batch), stop tokens and padding removed.

    ``should_stop`` is asked after every token; True ends generation there (Ctrl-C in a chat)."""
    if any(len(p) == 0 for p in prompts):
        raise UserError("a prompt encoded to no tokens; give some text")
    from loraforge.infer.decode import lean_base, lean_generate

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    config = settings.hf_config(stop_ids, pad_id)
    base = lean_base(model, ids.shape[1] + settings.max_new_tokens)
    if base is not None:
        new = lean_generate(base, ids, mask, config, streamer=streamer, should_stop=should_stop)
    else:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=streamer,
                             stopping_criteria=_stopping(should_stop))
        new = out[:, ids.shape[1]:]
    return [cut_at_stop(row, stop_ids) for row in new.tolist()]


def _stopping(should_stop: Callable[[], bool] | None):
    """A transformers ``StoppingCriteriaList`` ending every row once ``should_stop()`` (or None)."""
    if should_stop is None:
        return None
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Asked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Asked()])


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], settings: GenerationSettings, *,
             stop_ids: Sequence[int], pad_id: int, batch_size: int = 8,
             on_batch: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """New token ids for many prompts, in batches of similar length (order preserved).

    ``on_batch(prompts_done, tokens_generated)`` is called after each batch (progress)."""
    if batch_size < 1:
        raise UserError(f"expected a positive batch size, got {batch_size}", where="--batch-size")
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = generate_ids(model, [prompts[i] for i in chunk], settings, stop_ids=stop_ids, pad_id=pad_id)
        for i, out in zip(chunk, outs):
            results[i] = out
        if on_batch is not None:
            on_batch(len(chunk), sum(len(o) for o in outs))
    return results


def stream_writer(tokenizer, write: Callable[[str], None]):
    """A transformers streamer that passes the decoded reply to ``write`` as tokens arrive
    (batch size 1). The prompt (the first ``put``) is skipped; text is released up to the last
    complete word or character, as ``TextStreamer`` does, so multi-byte characters never print
    half."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                write(text)

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# ----- JSONL prompt files ------------------------------------------------------------------------

def read_prompt_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL prompts file; each needs ``prompt`` (text) or ``messages`` (a conversation)."""
    from loraforge.data import load_records

    rows = load_records(path)
    for row in rows:
        prompt, messages = row.get("prompt"), row.get("messages")
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(messages, list) and messages):
            raise UserError('expected a non-empty "prompt" string (or a "messages" list); other fields are '
                            "carried through to the output", where=row.where)
    return rows


def encode_row(row: dict, tokenizer, template: str | None) -> list[int]:
    from loraforge.infer.prompts import encode_messages, encode_text

    if isinstance(row.get("prompt"), str):
        return encode_text(row["prompt"], tokenizer, template)
    if template is None:
        raise UserError('a "messages" row needs a chat template; drop --raw', where=getattr(row, "where", None))
    return encode_messages(row["messages"], tokenizer, template)


def write_jsonl(rows: Sequence[dict], out: str | Path | None) -> None:
    """Write ``rows`` as JSON Lines to ``out`` atomically (temp file + rename), or to stdout."""
    lines = "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
    if out is None:
        sys.stdout.write(lines)
        return
    out = Path(out)
    if out.is_dir():
        raise UserError("is a folder; expected a .jsonl file path", where=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(lines)
        apply_umask(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
