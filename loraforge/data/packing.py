"""Packing: several short examples into one sequence of at most ``max_length`` tokens.

Rows are placed best-fit decreasing (longest first, each into the fullest sequence it still fits),
which wastes little room and is deterministic. A packed example keeps its rows apart in three ways:

- ``position_ids`` restart at 0 for every row, so rotary positions are those of the row alone;
- the label of each row's first token is -100, because the model shifts labels by one and would
  otherwise train the previous row's last token to predict it;
- ``collate`` turns the position restarts into a block-diagonal causal attention mask, so no token
  attends across rows (see ``collate.py``).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

from loraforge.data.tokens import IGNORE


def pack(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Packed examples ``{"input_ids", "labels", "position_ids"}``, each at most ``max_length``."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    too_long = [n for n in lengths if n > max_length]
    if too_long:
        raise ValueError(f"an example of {too_long[0]} tokens cannot be packed into {max_length}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
        j = bisect_left(free, (lengths[i], -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        insort(free, (room - lengths[i], b))
    return [_join([examples[i] for i in sorted(b)]) for b in bins]


def _join(rows: list[dict]) -> dict:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for row in rows:
        n = len(row["input_ids"])
        if n:
            input_ids += row["input_ids"]
            labels += [IGNORE, *row["labels"][1:]]
            position_ids += range(n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
