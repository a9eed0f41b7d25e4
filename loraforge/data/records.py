"""Reading training rows from local files: .json, .jsonl, .parquet and .txt.

Every row comes back as a :class:`Record`, a plain ``dict`` that also remembers where it came
from (``record.where``: ``file.jsonl:12`` for line-based files, ``file.json[3]`` or
``file.parquet[3]`` (0-based) for arrays), so that an error found later, while the row is
converted or tokenized, still names the file and the line or row.

- ``.json``: a list of objects, or an object holding exactly one list of objects. A ``.json``
  file that is really JSON Lines is read as such.
- ``.jsonl``: one object per line; blank lines are skipped.
- ``.parquet``: one object per row (needs ``pyarrow``).
- ``.txt``: one ``{"text": line}`` per non-empty line (continued pretraining).
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.errors import UserError

SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")


class Record(dict):
    """A data row (a dict) plus ``where``, the file and line/row it was read from."""

    where: str | None = None

    def __init__(self, data: dict, where: str | None = None):
        super().__init__(data)
        self.where = where


def load_records(path: str | Path) -> list[Record]:
    """All rows of a local data file; any malformed input raises one UserError naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError("data file not found", where=str(path))
    if not path.is_file():
        raise UserError("expected a data file, got a directory", where=str(path))
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(
            f"unsupported data file type {suffix or '(none)'!r}; expected one of {', '.join(SUFFIXES)}",
            where=str(path),
        )
    if suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        text = _read_text(path)
        if not text.strip():
            raise UserError(f"the file is empty; expected {_EXPECTED[suffix]}", where=str(path))
        if suffix == ".json":
            rows = _read_json(path, text)
        elif suffix == ".jsonl":
            rows = _read_jsonl(path, text)
        else:
            rows = [
                Record({"text": line}, f"{path}:{n}")
                for n, line in enumerate(text.splitlines(), 1)
                if line.strip()
            ]
    if not rows:
        raise UserError(f"no rows found; expected {_EXPECTED[suffix]}", where=str(path))
    return rows


_EXPECTED = {
    ".json": "a JSON list of objects",
    ".jsonl": "one JSON object per line",
    ".parquet": "a table with at least one row",
    ".txt": "one document per line",
}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"not UTF-8 text (byte {err.start})", where=str(path)) from None


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines saved as .json
            return _read_jsonl(path, text)
        raise UserError(f"invalid JSON: {err.msg} (column {err.colno})",
                        where=f"{path}:{err.lineno}") from None
    prefix = str(path)
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(
                "expected a list of objects, or an object holding exactly one list; "
                f"found an object with {len(lists)} lists (keys: {', '.join(map(str, data)) or 'none'})",
                where=str(path),
            )
        prefix = f"{path}[{json.dumps(lists[0])}]"
        data = data[lists[0]]
    if not isinstance(data, list):
        raise UserError(f"expected a list of objects, got {json_kind(data)}", where=str(path))
    rows = []
    for i, row in enumerate(data):
        where = f"{prefix}[{i}]"
        if not isinstance(row, dict):
            raise UserError(f"expected a JSON object, got {json_kind(row)}", where=where)
        rows.append(Record(row, where))
    return rows


def _read_jsonl(path: Path, text: str) -> list[Record]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"invalid JSON: {err.msg} (column {err.colno}); "
                            "expected one JSON object per line", where=where) from None
        if not isinstance(row, dict):
            raise UserError(f"expected a JSON object, got {json_kind(row)}", where=where)
        rows.append(Record(row, where))
    return rows


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet needs pyarrow: pip install pyarrow "
                        "(or convert the file to .jsonl)", where=str(path)) from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise UserError(f"not a readable parquet file ({err})", where=str(path)) from None
    return [Record(row, f"{path}[{i}]") for i, row in enumerate(table.to_pylist())]


def json_kind(value) -> str:
    """JSON's name for a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def location(row: dict, source: str, index: int) -> str:
    """Where a row came from: its ``Record.where``, else ``source[index]``."""
    return getattr(row, "where", None) or f"{source}[{index}]"
