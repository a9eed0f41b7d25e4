"""A terminal chat: the conversation so far is re-rendered with the training chat template each
turn, the reply streams token by token, and ``/reset`` / ``/exit`` are commands.

Each turn encodes the whole history (``encode_messages``), so the model sees exactly the token
sequence training produced for a conversation of that shape; the reply (without its end-of-turn
token) joins the history as an assistant message. A history longer than the model's context is
cut from the oldest turns; a single message still too long is cut from the left (``fit_context``),
with a note in the output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import ContextManager

from loraforge.infer.generate import GenerationSettings, generate_ids, stream_writer
from loraforge.infer.prompts import (
    context_length,
    encode_messages,
    fit_context,
    pad_token_id,
    prompt_budget,
    stop_token_ids,
)
from loraforge.infer.terminal import CtrlC

HELP = "commands: /reset (forget the conversation), /exit (quit); Ctrl-C stops a reply"


def chat_loop(model, tokenizer, template: str, settings: GenerationSettings, lines: Iterable[str],
              write: Callable[[str], None], *, system: str | None = None, max_context: int | None = None,
              prompt_marker: Callable[[], None] | None = None,
              during_reply: Callable[[], ContextManager] = contextlib.nullcontext) -> list[dict]:
    """Run a chat over the user ``lines``; ``write`` receives every piece of output text.

    Ctrl-C while a reply streams ends that reply (what was shown stays in the history, marked
    ``(stopped)``) and the chat goes on; ``during_reply`` wraps each reply (the command turns the
    terminal's echo off there, see terminal.py). Returns the final history (after the last
    ``/reset``)."""
    import torch

    stops = stop_token_ids(tokenizer, model, chat=True)
    pad = pad_token_id(tokenizer)
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    limit = max_context or context_length(model)
    if prompt_marker:
        prompt_marker()
    for line in lines:
        text = line.rstrip("\n")
        command = text.strip().lower()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(base)
            write("(conversation reset)\n")
        elif command in ("/help", "/?"):
            write(HELP + "\n")
        elif text.strip():
            history.append({"role": "user", "content": text})
            ids, notice = turn_ids(history, tokenizer, template, limit, settings.max_new_tokens, len(base))
            if notice:
                write(f"({notice})\n")
            streamer = stream_writer(tokenizer, write)
            with during_reply(), CtrlC() as ctrl_c:
                reply_ids = generate_ids(model, [ids], settings, stop_ids=stops, pad_id=pad, streamer=streamer,
                                         should_stop=lambda: ctrl_c.pressed)[0]
            reply = tokenizer.decode(reply_ids, skip_special_tokens=True)
            write("\n(stopped)\n" if ctrl_c.pressed else "\n")
            history.append({"role": "assistant", "content": reply})
        if prompt_marker:
            prompt_marker()
    return history


def turn_ids(history: list[dict], tokenizer, template: str, limit: int | None, new_tokens: int,
             keep: int = 0) -> tuple[list[int], str | None]:
    """(prompt ids of the conversation ``history``, a note when it was cut): the oldest exchanges
    go first (``history`` is shortened in place), then a single message still too long is cut
    from the left. The terminal chat and the web UI's chat build every turn with it."""
    ids = _fit(history, tokenizer, template, limit, new_tokens, keep)
    (ids,), notice = fit_context([ids], limit, new_tokens, what="conversation")
    return ids, notice


def _fit(history: list[dict], tokenizer, template: str, limit: int | None, new_tokens: int, keep: int) -> list[int]:
    """The prompt ids, dropping the oldest exchanges (after the ``keep`` system messages) while
    the prompt is longer than the context holds with room for the reply (``prompt_budget``)."""
    ids = encode_messages(history, tokenizer, template)
    while limit and len(ids) > prompt_budget(limit, new_tokens) and len(history) > keep + 1:
        del history[keep:keep + 2]  # one user message and its reply
        ids = encode_messages(history, tokenizer, template)
    return ids
