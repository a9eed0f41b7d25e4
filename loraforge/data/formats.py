"""Data formats: one row of a file -> a conversation (chat formats) or segments (raw formats).

Chat formats become a list of :class:`Message` (role ``system`` / ``user`` / ``assistant``), which a
chat template (``templates.py``) renders into segments. The two raw formats give segments directly:

- ``alpaca`` (Stanford Alpaca / LLaMA-Factory): ``instruction``, ``output``, optional ``input``
  (joined to the instruction with a newline), ``system``, ``history`` = ``[[query, response], ...]``
  (earlier turns, before this one).
- ``input_output`` (QLoRA's self-instruct and local input/output files): ``input`` / ``output``,
  or ``prompt`` / ``completion``: one user turn, one assistant turn.
- ``sharegpt``: ``conversations`` = ``[{"from": "human"|"gpt"|"system", "value": ...}, ...]``
  (``user`` / ``assistant`` accepted too, and OpenAI's ``role``/``content`` keys); optional
  top-level ``system``.
- ``messages`` (OpenAI / OASST-style): ``messages`` = ``[{"role": ..., "content": ...}, ...]``;
  content may also be a list of ``{"type": "text", "text": ...}`` parts.
- ``segments``: ``segments`` = ``[{"text": ..., "label": true|false}, ...]``: the row is exactly the
  concatenated texts, and only segments with ``label: true`` are trained. No template.
- ``text``: ``text`` = a document for continued pretraining: every token trained. No template.

``detect_format`` picks one from the keys of the first rows (``auto``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loraforge.data.records import json_kind, location
from loraforge.errors import UserError, check_choice

CHAT_FORMATS = ("alpaca", "input_output", "sharegpt", "messages")
RAW_FORMATS = ("segments", "text")
FORMATS = ("auto", *CHAT_FORMATS, *RAW_FORMATS)

ROLES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
}


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Segment:
    """A piece of a row: its text (or literal token ids, e.g. EOS) and whether it is trained."""

    text: str = ""
    trained: bool = False
    ids: tuple[int, ...] | None = None


def detect_format(rows: Sequence[dict], source: str = "data", sample: int = 16) -> str:
    """The format of the first ``sample`` rows, judged by their keys; they must agree."""
    chosen = None
    for i, row in enumerate(rows[:sample]):
        fmt = _format_of_keys(row)
        where = location(row, source, i)
        if fmt is None:
            raise UserError(
                f"cannot tell the data format from the keys {sorted(row)}; expected one of: "
                "instruction+output (alpaca), input+output or prompt+completion (input_output), "
                "conversations (sharegpt), messages, segments, text",
                where=where,
            )
        if chosen is not None and fmt != chosen:
            raise UserError(f"this row looks like {fmt!r} but earlier rows look like {chosen!r}; "
                            "set data.format explicitly", where=where)
        chosen = fmt
    if chosen is None:
        raise UserError("no rows to detect the data format from", where=source)
    return chosen


def _format_of_keys(row: dict) -> str | None:
    if "segments" in row:
        return "segments"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if ("input" in row and "output" in row) or ("prompt" in row and "completion" in row):
        return "input_output"
    if "text" in row:
        return "text"
    return None


def to_conversation(row: dict, fmt: str, where: str) -> list[Message]:
    """The messages of one row of a chat format."""
    check_choice(fmt, CHAT_FORMATS, "chat format", where)
    check_not_feedback(row, where)
    return _CONVERTERS[fmt](row, where)


# Keys that turn a chat row into feedback data, not supervised fine-tuning data: training on the
# row as SFT would silently teach the rejected (or thumbs-down) answers too.
PREFERENCE_KEYS = ("chosen", "rejected")  # DPO / ORPO pairs (TRL, LLaMA-Factory ranking data)
KTO_KEYS = ("label", "kto_tag")  # KTO: one answer with a desirable / undesirable flag


def check_not_feedback(row: dict, where: str) -> None:
    """Refuse preference and KTO rows, which change what the conversation means."""
    preference = [k for k in PREFERENCE_KEYS if k in row]
    if preference:
        raise UserError(f"this row has {' and '.join(repr(k) for k in preference)}: it is preference (DPO-style) "
                        "data, not supervised fine-tuning data; training on it would learn the rejected answers "
                        "too. loraforge trains SFT only: keep the chosen conversation as 'messages'", where=where)
    kto = [k for k in KTO_KEYS if k in row]
    if kto:
        raise UserError(f"this row has a {kto[0]!r} field: it is KTO-style feedback data (answers marked desirable "
                        "or not), not supervised fine-tuning data; training on it would learn the undesirable "
                        "answers too. Keep only the desirable rows, without the field", where=where)


def to_segments(row: dict, fmt: str, where: str) -> list[Segment]:
    """The segments of one row of a raw format (``segments`` or ``text``)."""
    check_choice(fmt, RAW_FORMATS, "raw format", where)
    if fmt == "text":
        return [Segment(_field(row, "text", where, "text"), trained=True)]
    segments = _field(row, "segments", where, "segments", kind=list)
    out = []
    for i, seg in enumerate(segments):
        name = f"segments[{i}]"
        if not isinstance(seg, dict):
            raise UserError(f"{name}: expected an object with \"text\" and \"label\", got {json_kind(seg)}",
                            where=where)
        text = _field(seg, "text", where, "segments", name=f"{name}.text")
        label = _field(seg, "label", where, "segments", kind=bool, name=f"{name}.label")
        out.append(Segment(text, trained=label))
    return out


# ---------------------------------------------------------------------- converters

def _alpaca(row: dict, where: str) -> list[Message]:
    instruction = _field(row, "instruction", where, "alpaca")
    extra = _field(row, "input", where, "alpaca", required=False) or ""
    output = _field(row, "output", where, "alpaca")
    system = _field(row, "system", where, "alpaca", required=False)
    history = _field(row, "history", where, "alpaca", kind=list, required=False) or []
    messages = [Message("system", system)] if system else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(p, str) for p in pair)):
            raise UserError(f"history[{i}]: expected a [query, response] pair of strings, "
                            f"got {json_kind(pair)}", where=where)
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    query = f"{instruction}\n{extra}" if extra else instruction
    return messages + [Message("user", query), Message("assistant", output)]


def _input_output(row: dict, where: str) -> list[Message]:
    keys = ("prompt", "completion") if "prompt" in row else ("input", "output")
    source = _field(row, keys[0], where, "input_output")
    target = _field(row, keys[1], where, "input_output")
    return [Message("user", source), Message("assistant", target)]


def _chat(list_key: str, fmt: str):
    def convert(row: dict, where: str) -> list[Message]:
        items = _field(row, list_key, where, fmt, kind=list)
        system = _field(row, "system", where, fmt, required=False)
        messages = [Message("system", system)] if system else []
        for i, item in enumerate(items):
            messages.append(_message(item, f"{list_key}[{i}]", where))
        if not items:
            raise UserError(f"{list_key}: expected at least one message, got an empty list", where=where)
        return messages

    return convert


def _message(item, name: str, where: str) -> Message:
    if not isinstance(item, dict):
        raise UserError(f"{name}: expected an object, got {json_kind(item)}", where=where)
    role_key, content_key = ("from", "value") if "from" in item else ("role", "content")
    role = _field(item, role_key, where, "chat", name=f"{name}.{role_key}")
    if role.lower() not in ROLES:
        raise UserError(f"{name}.{role_key}: unknown role {role!r}; expected one of "
                        f"{', '.join(ROLES)}", where=where)
    content = item.get(content_key)
    if isinstance(content, list):  # OpenAI content parts
        if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
            raise UserError(f"{name}.{content_key}: expected a string or a list of "
                            "{\"type\": \"text\", \"text\": ...} parts", where=where)
        content = "".join(p["text"] for p in content)
    else:
        content = _field(item, content_key, where, "chat", name=f"{name}.{content_key}")
    return Message(ROLES[role.lower()], content)


_CONVERTERS = {
    "alpaca": _alpaca,
    "input_output": _input_output,
    "sharegpt": _chat("conversations", "sharegpt"),
    "messages": _chat("messages", "messages"),
}

_EXPECTS = {
    "alpaca": '"instruction", "output", optional "input", "system", "history"',
    "input_output": '"input" and "output" (or "prompt" and "completion")',
    "sharegpt": '"conversations": [{"from": ..., "value": ...}, ...]',
    "messages": '"messages": [{"role": ..., "content": ...}, ...]',
    "chat": '{"role": ..., "content": ...} or {"from": ..., "value": ...}',
    "segments": '"segments": [{"text": ..., "label": true|false}, ...]',
    "text": '"text": a string',
}


def _field(row: dict, key: str, where: str, fmt: str, *, kind=str, required=True, name=None):
    """``row[key]`` checked for presence and type; None for an absent optional key."""
    name = name or key
    value = row.get(key)
    if value is None:
        if required:
            got = "null" if key in row else "missing"
            raise UserError(f"field {name!r} is {got}; the {fmt} format expects {_EXPECTS[fmt]}",
                            where=where)
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise UserError(f"field {name!r}: expected {_TYPE_NAMES[kind]}, got {json_kind(value)}",
                        where=where)
    return value


_TYPE_NAMES = {str: "a string", list: "a list", bool: "true or false"}
