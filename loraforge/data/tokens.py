"""Segments -> token ids and labels (-100 = not trained).

Each segment is encoded on its own (``add_special_tokens=False``; literal ids such as EOS are
taken as they are) and the pieces are concatenated, so a label is set exactly on the tokens of
the trained segments: no searching for markup in the token stream. Adjacent segments with the same
flag are joined before encoding, which keeps the number of piece boundaries minimal.

Caveat: encoding ``a`` and ``b`` separately can differ from encoding ``a + b`` when a BPE merge
would cross the boundary (e.g. a response starting with whitespace right after a prompt ending
in whitespace). Boundaries produced by the templates sit next to special tokens or newlines, so
for the SmolLM2 tokenizer the concatenation equals encoding the whole rendered conversation (the
tests check this on the alpaca demo data and multi-turn chats); the pieces, not the whole string,
are what the model is trained on, so the labels are exact either way.

The label at position 0 is always -100: a causal LM shifts labels by one inside the model, so
nothing ever predicts the first token; keeping it out makes the trained-token counts honest.
"""

from __future__ import annotations

from collections.abc import Sequence

from loraforge.data.formats import Segment

IGNORE = -100


def merge_segments(segments: Sequence[Segment]) -> list[Segment]:
    """Join neighbouring text segments that share the trained flag."""
    out: list[Segment] = []
    for seg in segments:
        if out and seg.ids is None and out[-1].ids is None and out[-1].trained == seg.trained:
            out[-1] = Segment(out[-1].text + seg.text, seg.trained)
        else:
            out.append(seg)
    return out


def encode_segments(segments: Sequence[Segment], tokenizer, *, train_all: bool = False
                    ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the concatenated segments; ``train_all`` trains every token."""
    input_ids: list[int] = []
    labels: list[int] = []
    for seg in merge_segments(segments):
        ids = list(seg.ids) if seg.ids is not None else tokenizer.encode(seg.text, add_special_tokens=False)
        input_ids += ids
        labels += ids if (seg.trained or train_all) else [IGNORE] * len(ids)
    if labels:
        labels[0] = IGNORE
    return input_ids, labels
