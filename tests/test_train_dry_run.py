"""``loraforge train CONFIG --dry-run``: config, data statistics and the trained spans of the first
examples, from the tokenizer alone; checked against the labels the data pipeline builds."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

import loraforge.models
from loraforge.cli import main
from loraforge.data import IGNORE
from loraforge.train.config import load_config
from loraforge.train.dry_run import CLOSE, OPEN, dry_run

ROWS = {
    "alpaca": [{"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Five."}],
    "sharegpt": [{"conversations": [{"from": "system", "value": "You are terse."},
                                    {"from": "human", "value": "Capital of France?"},
                                    {"from": "gpt", "value": "Paris."}]}],
    "messages": [{"messages": [{"role": "user", "content": "Say hi."},
                               {"role": "assistant", "content": "Hi there."},
                               {"role": "user", "content": "Again."},
                               {"role": "assistant", "content": "Hi again."}]}],
    "text": [{"text": "The quick brown fox jumps over the lazy dog."}],
}
RESPONSES = {"alpaca": ["Blue is a colour.", "Five."], "sharegpt": ["Paris."], "messages": ["Hi there.", "Hi again."],
             "text": []}
PROMPTS = {"alpaca": ["Name a colour.", "2 and 3"], "sharegpt": ["You are terse.", "Capital of France?"],
           "messages": ["Say hi.", "Again."], "text": []}


def no_model_load(*args, **kwargs):
    raise AssertionError("a dry run must not load model weights")


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_dry_run_marks_exactly_the_trained_tokens(tmp_path, monkeypatch, fmt, smollm2_gguf):
    monkeypatch.setattr(loraforge.models, "load_model", no_model_load, raising=False)
    data = tmp_path / f"{fmt}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[fmt]))
    config = load_config(None, [f"data.train={data}", f"output_dir={tmp_path / 'run'}"])
    out = io.StringIO()
    shown = dry_run(config, show=5, console=Console(file=out, width=200, force_terminal=False))
    text = out.getvalue()

    assert f"format {fmt} (auto-detected)" in text and "dry run: nothing was trained or written" in text
    assert "steps: 1 optimizer steps" in text  # 1 epoch of <= 4 examples at batch size 4
    assert "precision: bf16 autocast" in text or "precision: fp32   (auto: " in text  # train.dtype: auto, decided
    assert not (tmp_path / "run").exists()
    tokenizer = loraforge.models.load_tokenizer_for(config.model)
    body = text[text.index("example 1:"):]
    marked = re.findall(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), body, flags=re.S)
    expected = []
    for example in shown["shown"]:
        ids, labels = example["input_ids"], example["labels"]
        runs, current = [], []
        for token, label in zip(ids, labels):  # the labels' trained runs, decoded independently
            if label != IGNORE:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        expected += [tokenizer.decode(r, skip_special_tokens=False) for r in runs]
    assert marked == expected
    trained = "".join(marked)
    for response in RESPONSES[fmt]:
        assert response in trained
    for prompt in PROMPTS[fmt]:
        assert prompt in text and prompt not in trained
    if fmt == "text":
        assert "quick brown fox jumps over the lazy dog" in trained  # every token but the first is trained


def test_dry_run_from_the_command_line_prints_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loraforge.models, "load_model", no_model_load, raising=False)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS["alpaca"]) + json.dumps(
        {"instruction": "x " * 400, "output": "y"}) + "\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: {train: d.jsonl, max_length: 64}\noutput_dir: run\n")
    assert main(["train", str(cfg), "--dry-run", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 rows" in out and "kept 2 rows" in out and "no trained token left: 1" in out
    assert "example 1:" in out and "example 2:" not in out
    assert "output_dir: " + str(tmp_path / "run") in out  # the resolved config
    assert not (tmp_path / "run").exists()
    assert main(["train", str(cfg), "--dry-run", "adapter.r=-1"]) == 2  # validation is the same as a run's
