"""Rows -> training examples: format, template, tokenization, truncation, and the stats to report.

``build_dataset`` turns each row into one example ``{"input_ids": [...], "labels": [...]}``
(labels -100 where not trained), except the ``text`` format, whose long documents are cut into
consecutive chunks of ``max_length`` (each chunk an example, every token trained).

Chat rows longer than ``max_length`` are truncated at the end. A row left with no trained label
(its responses truncated away, or no assistant turn) is dropped and counted; if that happens to
more than half the rows the data set is an error, not a warning, because training would silently
learn from a fraction of it. ``train_on_prompt=True`` trains every token of chat rows (system,
user, markup too); it does not apply to ``segments`` rows, whose labels are the user's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.formats import CHAT_FORMATS, FORMATS, Segment, detect_format, to_conversation, to_segments
from loraforge.data.records import load_records, location
from loraforge.data.templates import get_template, special_prefix
from loraforge.data.tokens import IGNORE, encode_segments
from loraforge.errors import UserError, check_choice


@dataclass
class DataStats:
    """What ``build_dataset`` did, for the trainer to print."""

    source: str
    format: str
    format_detected: bool
    template: str  # "tokenizer", "chatml", ..., or "none" for segments / text
    max_length: int
    rows_read: int = 0
    rows_kept: int = 0
    dropped_all_masked: int = 0  # no trained label left (e.g. truncated away)
    dropped_empty: int = 0  # nothing but whitespace in the row
    truncated: int = 0  # chat rows cut to max_length (text rows are chunked instead)
    examples: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0

    @property
    def rows_dropped(self) -> int:
        return self.dropped_all_masked + self.dropped_empty

    def summary(self) -> str:
        how = "auto-detected" if self.format_detected else "as configured"
        share = self.trained_tokens / self.total_tokens if self.total_tokens else 0.0
        lines = [
            f"{self.source}: {self.rows_read} rows, format {self.format} ({how}), "
            f"template {self.template}",
            f"  kept {self.rows_kept} rows -> {self.examples} examples, {self.total_tokens:,} tokens, "
            f"{self.trained_tokens:,} trained ({share:.1%})",
        ]
        if self.rows_dropped or self.truncated:
            lines.append(
                f"  dropped {self.rows_dropped} (no trained token left: {self.dropped_all_masked}, "
                f"empty: {self.dropped_empty}); truncated to max_length {self.max_length}: {self.truncated}"
            )
        return "\n".join(lines)


def build_dataset(records_or_path: str | Path | Sequence[dict], tokenizer, *, format: str = "auto",
                  template: str = "auto", max_length: int = 512, train_on_prompt: bool = False,
                  source: str | None = None) -> tuple[list[dict], DataStats]:
    """(examples, stats) for a data file or a list of rows (see module docstring)."""
    if isinstance(records_or_path, (str, Path)):
        source = source or str(records_or_path)
        records = load_records(records_or_path)
    else:
        source = source or "records"
        records = list(records_or_path)
    check_choice(format, FORMATS, "data format", "data.format")
    if max_length < 2:
        raise UserError(f"expected max_length >= 2, got {max_length}", where="data.max_length")
    if not records:
        raise UserError("no rows to train on", where=source)

    fmt = detect_format(records, source) if format == "auto" else format
    tmpl = get_template(template, tokenizer) if fmt in CHAT_FORMATS else None
    stats = DataStats(source, fmt, format == "auto", tmpl.name if tmpl else "none", max_length)
    prefix = special_prefix(tokenizer) if tmpl is None else ()
    examples: list[dict] = []
    for i, row in enumerate(_track(records, source)):
        where = location(row, source, i)
        stats.rows_read += 1
        if fmt in CHAT_FORMATS:
            messages = to_conversation(row, fmt, where)
            empty = not any(m.content.strip() for m in messages)
            segments = tmpl.render(messages, tokenizer, where)
            train_all = train_on_prompt
        else:
            segments = to_segments(row, fmt, where)
            empty = not any(s.text.strip() for s in segments)
            segments = [Segment(ids=prefix, trained=fmt == "text"), *segments]
            if fmt == "text" and getattr(tokenizer, "eos_token_id", None) is not None:
                segments.append(Segment(ids=(int(tokenizer.eos_token_id),), trained=True))
            train_all = False
        if empty:
            stats.dropped_empty += 1
            continue
        ids, labels = encode_segments(segments, tokenizer, train_all=train_all)
        if fmt == "text":
            pieces = _chunks(ids, labels, max_length)
        else:
            if len(ids) > max_length:
                stats.truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            pieces = [(ids, labels)]
        pieces = [(x, y) for x, y in pieces if any(t != IGNORE for t in y)]
        if not pieces:
            stats.dropped_all_masked += 1
            continue
        stats.rows_kept += 1
        for x, y in pieces:
            examples.append({"input_ids": x, "labels": y})
            stats.total_tokens += len(x)
            stats.trained_tokens += sum(t != IGNORE for t in y)
    stats.examples = len(examples)
    _check_enough(stats)
    return examples, stats


def _track(records: list, source: str):
    """The rows, behind a progress bar on a terminal when there are many (quiet otherwise)."""
    import sys

    if len(records) < PROGRESS_ROWS or not sys.stderr.isatty():
        return records
    from rich.console import Console
    from rich.progress import track

    return track(records, description=f"tokenizing {Path(source).name}", total=len(records),
                 console=Console(file=sys.stderr), transient=True)


PROGRESS_ROWS = 2000  # fewer rows tokenize in about a second: no bar


def _chunks(ids: list[int], labels: list[int], size: int) -> list[tuple[list[int], list[int]]]:
    """Consecutive chunks of ``size``; nothing predicts a chunk's first token, so it is unlabelled."""
    out = []
    for start in range(0, len(ids), size):
        y = labels[start:start + size]
        out.append((ids[start:start + size], [IGNORE] + y[1:]))
    return out


def _check_enough(stats: DataStats) -> None:
    if stats.dropped_all_masked * 2 > stats.rows_read:
        raise UserError(
            f"{stats.dropped_all_masked} of {stats.rows_read} rows have no trained token left "
            f"(responses truncated away at max_length {stats.max_length}, or no assistant turn); "
            "raise data.max_length, or check data.format / data.template",
            where=stats.source,
        )
    if not stats.examples:
        raise UserError(f"no usable rows out of {stats.rows_read} "
                        f"({stats.dropped_empty} empty, {stats.dropped_all_masked} without a trained token)",
                        where=stats.source)
