"""Reading data files: every supported layout, and one clear UserError (file + line/row + what was
expected) for each kind of malformed input."""

from __future__ import annotations

import json
import sys

import pytest

from loraforge.data import build_dataset, load_records
from loraforge.errors import UserError
from helpers_data import CharTokenizer

ROWS = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say bye", "input": "now", "output": "bye"}]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_json_list_and_object_holding_a_list(tmp_path):
    a = load_records(write(tmp_path, "a.json", json.dumps(ROWS, indent=2)))
    b = load_records(write(tmp_path, "b.json", json.dumps({"data": ROWS, "version": 1})))
    assert a == ROWS and b == ROWS
    assert a[1].where == f"{tmp_path / 'a.json'}[1]"
    assert b[0].where == f'{tmp_path / "b.json"}["data"][0]'


def test_jsonl_skips_blank_lines_and_records_line_numbers(tmp_path):
    text = json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n"
    rows = load_records(write(tmp_path, "d.jsonl", text))
    assert rows == ROWS
    assert [r.where for r in rows] == [f"{tmp_path / 'd.jsonl'}:1", f"{tmp_path / 'd.jsonl'}:3"]
    # JSON Lines saved with a .json name is read as JSON Lines
    assert load_records(write(tmp_path, "d.json", text)) == ROWS


def test_txt_is_one_document_per_line(tmp_path):
    rows = load_records(write(tmp_path, "t.txt", "first doc\n\nsecond doc\n"))
    assert rows == [{"text": "first doc"}, {"text": "second doc"}]
    assert rows[1].where.endswith("t.txt:3")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"instruction": "a", "output": "b", "history": [["q", "r"]]}, {"instruction": "c", "output": "d", "history": []}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    got = load_records(tmp_path / "d.parquet")
    assert got == rows and got[1].where.endswith("d.parquet[1]")
    examples, stats = build_dataset(tmp_path / "d.parquet", CharTokenizer())
    assert stats.format == "alpaca" and stats.rows_kept == 2


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = write(tmp_path, "d.parquet", "not really parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(UserError, match="pip install pyarrow") as err:
        load_records(path)
    assert err.value.where == str(path)


@pytest.mark.parametrize(
    "name, text, where, match",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": "unterminated\n', ":2", "invalid JSON"),
        ("bad.jsonl", '{"text": "ok"}\n[1, 2]\n', ":2", "expected a JSON object, got a list"),
        ("bad.json", '[{"text": "ok"},\n {"text": }]', ":2", "invalid JSON"),
        ("bad.json", '[{"text": "ok"}, "oops"]', "[1]", "expected a JSON object, got a string"),
        ("bad.json", '{"a": [], "b": []}', "", "exactly one list"),
        ("bad.json", '42', "", "expected a list of objects, got a number"),
        ("empty.jsonl", "", "", "the file is empty; expected one JSON object per line"),
        ("empty.json", "  \n", "", "the file is empty"),
        ("none.json", "[]", "", "no rows found"),
        ("data.csv", "a,b", "", "unsupported data file type '.csv'"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, where, match):
    path = write(tmp_path, name, text)
    with pytest.raises(UserError, match=match) as err:
        load_records(path)
    assert err.value.where == f"{path}{where}"
    assert str(err.value).startswith(f"{path}{where}: ")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "row, match",
    [
        ({"instruction": "x"}, "field 'output' is missing; the alpaca format expects"),
        ({"instruction": "x", "output": 3}, "field 'output': expected a string, got a number"),
        ({"instruction": "x", "output": None}, "field 'output' is null"),
        ({"instruction": "x", "output": "y", "history": [["q"]]}, r"history\[0\]: expected a \[query, response\] pair"),
        ({"instruction": "x", "output": "y", "history": "q"}, "field 'history': expected a list, got a string"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, match):
    good = {"instruction": "a", "output": "b"}
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in [good, good, row]))
    with pytest.raises(UserError, match=match) as err:
        build_dataset(path, CharTokenizer(), format="alpaca")
    assert err.value.where == f"{path}:3"


def test_bad_chat_rows(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]},
    ]
    with pytest.raises(UserError, match=r"conversations\[1\]\.from: unknown role 'robot'") as err:
        build_dataset(rows, CharTokenizer(), source="mem")
    assert err.value.where == "mem[0]"
    with pytest.raises(UserError, match=r"field 'messages\[0\]\.content': expected a string, got a number"):
        build_dataset([{"messages": [{"role": "user", "content": 1}]}], CharTokenizer())
    with pytest.raises(UserError, match=r"field 'segments\[0\]\.label': expected true or false, got a string"):
        build_dataset([{"segments": [{"text": "a", "label": "yes"}]}], CharTokenizer())
