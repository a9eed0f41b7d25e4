"""Prompt text -> token ids, and the tokens that end a reply.

By default a prompt is one user message rendered with the chat template the model was trained
with (``loraforge.data.encode_prompt``: the same pieces, the same special tokens as training),
ending with the assistant header. ``raw`` sends the text as is (with the tokenizer's BOS, if it
adds one). Template choice: an explicit ``--template``, else the template recorded in the
adapter's training config, else the tokenizer's own chat template; a tokenizer without one is
an error rather than a silent guess.

A prompt longer than the model's context (``max_position_embeddings``) leaves room for the reply
(``max_new_tokens``, but at most half the context) and is cut from the left to fit, with a
one-line notice (``fit_context``): the end of a prompt, where the question and the assistant
header are, is what the reply depends on most; the model never sees positions it was not trained
for.

Generation stops at EOS, at the ids the model's generation config lists as EOS, and, for chat
prompts, at the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

from loraforge.errors import UserError

# single tokens that close an assistant turn in the common chat formats
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")


def resolve_template(tokenizer, template: str | None, trained: str | None = None, *, raw_option: bool = True) -> str:
    """The template name to render chat prompts with (see module docstring); ``raw_option``: the
    command has ``--raw`` (the error message offers it)."""
    name = template or trained or "tokenizer"
    if name == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raw = "pass --raw to send prompts as plain text, or " if raw_option else ""
        raise UserError(
            f"the tokenizer has no chat template; {raw}name a template with --template "
            "(chatml, alpaca, llama3, plain)",
            where="tokenizer",
        )
    return name


def encode_messages(messages: Sequence[dict], tokenizer, template: str) -> list[int]:
    """Token ids of a conversation plus the assistant header, encoded as training encodes prompts."""
    from loraforge.data import encode_prompt

    return encode_prompt(messages, tokenizer, template)


def encode_text(text: str, tokenizer, template: str | None) -> list[int]:
    """One prompt's ids: a user message under ``template``, or raw text when ``template`` is None."""
    if template is None:
        return list(tokenizer.encode(text, add_special_tokens=True))
    return encode_messages([{"role": "user", "content": text}], tokenizer, template)


def stop_token_ids(tokenizer, model=None, chat: bool = True) -> list[int]:
    """Ids that end generation: EOS, the generation config's EOS ids, and (chat) end-of-turn."""
    ids: list[int] = []

    def add(value) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    add(getattr(tokenizer, "eos_token_id", None))
    config = getattr(model, "generation_config", None)
    if config is not None:
        add(getattr(config, "eos_token_id", None))
    if chat:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        add([vocab[t] for t in END_OF_TURN_TOKENS if t in vocab])
    return ids


def pad_token_id(tokenizer) -> int:
    """The id used for (masked) padding: the tokenizer's pad, else its EOS, else 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


def context_length(model) -> int | None:
    """The model's context (``max_position_embeddings``), None when its config does not say."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if value else None


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """The most prompt tokens a context holds with room for the reply (at least half of it)."""
    return max(context - max_new_tokens, context // 2, 1)


def fit_context(prompts: Sequence[Sequence[int]], context: int | None, max_new_tokens: int,
                what: str = "prompt") -> tuple[list[list[int]], str | None]:
    """(prompts, notice): each prompt cut from the left to its last ``prompt_budget`` tokens;
    ``notice`` says what was cut, or is None."""
    prompts = [list(p) for p in prompts]
    if not context:
        return prompts, None
    keep = prompt_budget(context, max_new_tokens)
    cut = [i for i, p in enumerate(prompts) if len(p) > keep]
    if not cut:
        return prompts, None
    longest = max(len(prompts[i]) for i in cut)
    for i in cut:
        prompts[i] = prompts[i][-keep:]
    if len(prompts) == 1:
        which = f"the {what} ({longest:,} tokens) was"
    else:
        numbers = ", ".join(str(i + 1) for i in cut[:10]) + (", ..." if len(cut) > 10 else "")
        which = (f"{len(cut)} {what}{'s' if len(cut) > 1 else ''} (number {numbers}; "
                 f"{'up to ' if len(cut) > 1 else ''}{longest:,} tokens) {'were' if len(cut) > 1 else 'was'}")
    return prompts, (f"{which} cut from the left to the last {keep:,} tokens: the model's context is "
                     f"{context:,} tokens, {context - keep:,} of them left for the reply")
