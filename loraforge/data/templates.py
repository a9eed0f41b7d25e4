"""Chat templates: a conversation -> segments, each marked trained or not.

A template never produces one string to be searched afterwards: it produces the prompt part and
the response part of every turn separately, and the tokenizer encodes them piece by piece, so the
labels follow the pieces exactly (``tokens.py``).

Trained by default: every assistant turn's content plus the template's end-of-turn text that
follows it (``<|im_end|>\\n`` in ChatML, ``<|eot_id|>`` in Llama 3, EOS in alpaca / plain), so
the model learns to stop. Everything else (system, user turns, role headers) is prompt.

Templates:

- ``auto``: the tokenizer's own chat template (``tokenizer``) when it has one, else ``chatml``.
- ``tokenizer``: the tokenizer's Jinja template. The pieces are found by rendering prefixes of the
  conversation and diffing the strings: for each assistant message k,
  ``prompt_k = render(m[:k], add_generation_prompt=True)`` and ``full_k = render(m[:k+1])``;
  the prompt piece is ``prompt_k`` minus the previous ``full``, the response piece is
  ``full_k[len(prompt_k):]``. A template for which these are not prefixes of each other (one that
  rewrites earlier turns) is reported as an error; pick a named template instead.
- ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``.
- ``alpaca``: Stanford Alpaca's ``### Instruction:`` / ``### Response:`` layout with its default
  system line; responses end with EOS.
- ``llama3``: ``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
  (content stripped, as Meta's template does).
- ``plain``: no markup at all: the contents concatenated, each response followed by EOS (QLoRA's
  input/output recipe: ``source`` then ``target + eos``).

Named templates other than llama3 begin with the tokens the tokenizer itself puts before any text
(its BOS, when it adds one by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loraforge.data.formats import Message, Segment
from loraforge.errors import UserError, check_choice

TEMPLATES = ("auto", "tokenizer", "chatml", "alpaca", "llama3", "plain")
EOS = "<eos>"  # marker in a MarkupTemplate: the tokenizer's EOS token id, not text

ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class MarkupTemplate:
    """A fixed-markup template: each role's text around the content, spelled out."""

    name: str
    system: str  # "{content}" is replaced by the message content
    user: str
    assistant_header: str  # prompt text before a response
    assistant_end: str  # trained text after a response's content (or EOS)
    separator: str = ""  # untrained text between a response and the next message
    begin: str | None = None  # text at the very start; None: the tokenizer's own BOS, if any
    default_system: str | None = None
    strip: bool = False  # strip whitespace around contents

    def render(self, messages: Sequence[Message], tokenizer, where: str | None = None) -> list[Segment]:
        """All messages as segments; assistant contents and their end-of-turn are trained."""
        out = self._begin(tokenizer)
        if self.default_system and not any(m.role == "system" for m in messages):
            out.append(Segment(self._fill(self.system, self.default_system)))
        for i, m in enumerate(messages):
            if i and messages[i - 1].role == "assistant":
                out.append(Segment(self.separator))
            if m.role == "assistant":
                out.append(Segment(self.assistant_header))
                out.append(Segment(self._content(m.content), trained=True))
                if self.assistant_end == EOS:
                    out.append(Segment(ids=(eos_id(tokenizer, self.name),), trained=True))
                else:
                    out.append(Segment(self.assistant_end, trained=True))
            else:
                out.append(Segment(self._fill(self.system if m.role == "system" else self.user,
                                              m.content)))
        return [s for s in out if s.text or s.ids]

    def generation_prompt(self, messages: Sequence[Message], tokenizer) -> list[Segment]:
        after_reply = bool(messages) and messages[-1].role == "assistant"
        return self.render(messages, tokenizer) + [
            Segment(self.separator if after_reply else ""), Segment(self.assistant_header)]

    def _begin(self, tokenizer) -> list[Segment]:
        if self.begin is not None:
            return [Segment(self.begin)]
        prefix = special_prefix(tokenizer)
        return [Segment(ids=prefix)] if prefix else []

    def _content(self, text: str) -> str:
        return text.strip() if self.strip else text

    def _fill(self, pattern: str, content: str) -> str:
        return pattern.replace("{content}", self._content(content))


CHATML = MarkupTemplate(
    "chatml",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_header="<|im_start|>assistant\n",
    assistant_end="<|im_end|>\n",
)
ALPACA = MarkupTemplate(
    "alpaca",
    system="{content}\n\n",
    user="### Instruction:\n{content}\n\n",
    assistant_header="### Response:\n",
    assistant_end=EOS,
    separator="\n\n",
    default_system=ALPACA_SYSTEM,
)
LLAMA3 = MarkupTemplate(
    "llama3",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_end="<|eot_id|>",
    begin="<|begin_of_text|>",
    strip=True,
)
PLAIN = MarkupTemplate("plain", system="{content}", user="{content}", assistant_header="",
                       assistant_end=EOS)
NAMED = {t.name: t for t in (CHATML, ALPACA, LLAMA3, PLAIN)}


class TokenizerTemplate:
    """The tokenizer's own Jinja chat template, split into pieces by diffing rendered prefixes."""

    name = "tokenizer"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: Sequence[Message], tokenizer, where: str | None = None) -> list[Segment]:
        out: list[Segment] = []
        done = ""  # the rendered text covered by `out` so far
        for k, m in enumerate(messages):
            if m.role != "assistant":
                continue
            prompt = self._render(messages[:k], True, where)
            full = self._render(messages[: k + 1], False, where)
            self._check_prefix(done, prompt, k, where)
            self._check_prefix(prompt, full, k + 1, where)
            out += [Segment(prompt[len(done):]), Segment(full[len(prompt):], trained=True)]
            done = full
        whole = self._render(messages, False, where)
        self._check_prefix(done, whole, len(messages), where)
        out.append(Segment(whole[len(done):]))
        return [s for s in out if s.text]

    def generation_prompt(self, messages: Sequence[Message], tokenizer) -> list[Segment]:
        return [Segment(self._render(messages, True, None))]

    def _render(self, messages: Sequence[Message], generation_prompt: bool, where) -> str:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja2 raises TemplateError (e.g. "roles must alternate")
            raise UserError(f"the tokenizer's chat template rejected this conversation: {err}",
                            where=where) from None

    @staticmethod
    def _check_prefix(shorter: str, longer: str, k: int, where) -> None:
        if not longer.startswith(shorter):
            raise UserError(
                "the tokenizer's chat template renders earlier turns differently once more "
                f"turns follow (message {k}), so prompt and response pieces cannot be separated "
                "exactly; choose a named template (data.template: chatml, llama3, alpaca, plain)",
                where=where,
            )


def get_template(name: str, tokenizer, where: str = "data.template"):
    """The template called ``name`` (see module docstring) for ``tokenizer``."""
    check_choice(name, TEMPLATES, "chat template", where)
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if name == "tokenizer" and not has_own:
        raise UserError("the tokenizer has no chat template; choose a named one "
                        "(chatml, alpaca, llama3, plain) or auto", where=where)
    if name == "tokenizer" or (name == "auto" and has_own):
        return TokenizerTemplate(tokenizer)
    return NAMED["chatml" if name == "auto" else name]


def special_prefix(tokenizer) -> tuple[int, ...]:
    """The ids the tokenizer puts before any text by default (its BOS, or nothing)."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return tuple(full[:start])
    return ()


def eos_id(tokenizer, template: str) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError(f"the {template} template ends responses with EOS, "
                        "but the tokenizer has no eos_token", where="data.template")
    return int(eos)
