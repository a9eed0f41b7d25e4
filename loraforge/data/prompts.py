"""Inference-time prompts, rendered exactly as training renders the prompt part of a conversation.

``render_prompt`` returns the text up to where the assistant's reply begins (the template's
generation prompt); tokenize it with ``add_special_tokens=False``, since any BOS is already in it.
``encode_prompt`` returns the token ids directly, piece by piece as in training, which is what a
generator should feed the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from loraforge.data.formats import Message, Segment
from loraforge.data.records import location
from loraforge.data.templates import get_template
from loraforge.data.tokens import merge_segments
from loraforge.errors import UserError


def render_prompt(messages: Sequence[dict | Message], tokenizer, template: str = "auto") -> str:
    """The conversation so far plus the assistant header, as text."""
    return "".join(
        seg.text if seg.ids is None else tokenizer.decode(list(seg.ids))
        for seg in _prompt_segments(messages, tokenizer, template)
    )


def encode_prompt(messages: Sequence[dict | Message], tokenizer, template: str = "auto") -> list[int]:
    """The token ids of ``render_prompt``, encoded the way training encodes prompts."""
    ids: list[int] = []
    for seg in merge_segments(_prompt_segments(messages, tokenizer, template)):
        ids += list(seg.ids) if seg.ids is not None else tokenizer.encode(seg.text, add_special_tokens=False)
    return ids


def _prompt_segments(messages, tokenizer, template: str) -> list[Segment]:
    return get_template(template, tokenizer).generation_prompt(_messages(messages), tokenizer)


def _messages(messages) -> list[Message]:
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
        elif isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str):
            out.append(Message(m["role"], m["content"]))
        else:
            raise UserError('expected {"role": ..., "content": ...}', where=location(m, "messages", i))
    return out
