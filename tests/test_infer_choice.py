"""``loraforge eval --metric choice``: MMLU-style accuracy equals a straightforward reference
computed here from transformers' logits (one sequence at a time, the MMLU prompt written out by
hand), 0-shot and 2-shot, letter and option scoring; both row layouts; --compare; bad rows."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers_infer import bpe_tokenizer, make_adapter, save_base, tiny_model

from loraforge.cli import main

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

TEST = [
    {"question": "what is the capital of france", "choices": ["paris", "berlin", "one", "dog"], "answer": 0,
     "subject": "geography"},
    {"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "capital", "world"], "answer": "A",
     "subject": "animals"},
    {"question": "one two three", "choices": ["four", "ten", "hello", "fox"], "answer": 0, "subject": "geography"},
    {"question": "berlin is the capital of", "choices": ["germany", "france", "nine", "tests"], "answer": 0,
     "subject": "geography"},
]
DEV = [
    {"question": "paris is the capital of", "A": "france", "B": "germany", "C": "dog", "D": "six",
     "answer": "A", "subject": "geography"},
    {"question": "a tiny tokenizer for", "A": "words", "B": "tests", "C": "fox", "answer": "B", "subject": "animals"},
    {"question": "five six", "A": "seven", "B": "one", "C": "dog", "D": "lazy", "answer": "A", "subject": "geography"},
    {"question": "hello", "A": "world", "B": "paris", "answer": "A", "subject": "animals"},
]


def _index(row) -> int:
    return row["answer"] if isinstance(row["answer"], int) else "ABCD".index(row["answer"])


def _choices(row) -> list[str]:
    return row["choices"] if "choices" in row else [row[k] for k in "ABCD" if k in row]


def _block(row, score) -> str:
    if score == "option":
        return row["question"] + "\nAnswer:"
    return row["question"] + "".join(f"\n{'ABCD'[i]}. {c}" for i, c in enumerate(_choices(row))) + "\nAnswer:"


def _answer(row, i, score) -> str:
    return " " + (_choices(row)[i] if score == "option" else "ABCD"[i])


@torch.no_grad()
def _reference(model, tok, score, shots) -> list[int]:
    preds = []
    for row in TEST:
        prompt = f"The following are multiple choice questions (with answers) about {row['subject']}.\n\n"
        for shot in [d for d in DEV if d["subject"] == row["subject"]][:shots]:
            prompt += _block(shot, score) + _answer(shot, _index(shot), score) + "\n\n"
        prompt += _block(row, score)
        ctx = tok.encode(prompt)  # this tokenizer adds no BOS
        best, best_score = None, None
        for i in range(len(_choices(row))):
            whole = tok.encode(prompt + _answer(row, i, score))
            assert whole[:len(ctx)] == ctx
            logits = model(input_ids=torch.tensor([whole])).logits[0].float()
            lp = sum(F.log_softmax(logits[t - 1], -1)[whole[t]].item() for t in range(len(ctx), len(whole)))
            value = lp / (len(whole) - len(ctx)) if score == "option" else lp
            if best_score is None or value > best_score:
                best, best_score = i, value
        preds.append(best)
    return preds


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("choice")
    tok = bpe_tokenizer()
    save_base(tiny_model(tok), tok, tmp / "base")
    make_adapter(tiny_model(tok), "lora").save_pretrained(tmp / "adapter")
    _write(tmp / "test.jsonl", TEST)
    _write(tmp / "dev.jsonl", DEV)
    return tmp


def _rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def _cell(preds) -> str:
    correct = sum(p == _index(r) for p, r in zip(preds, TEST))
    return f"{correct / len(TEST):.2%} ({correct}/{len(TEST)})"


def _subject_cell(preds, subject) -> str:
    pairs = [(p, r) for p, r in zip(preds, TEST) if r["subject"] == subject]
    correct = sum(p == _index(r) for p, r in pairs)
    return f"{correct / len(pairs):.2%} ({correct}/{len(pairs)})"


@pytest.mark.parametrize("score,shots", [("letter", 0), ("letter", 2), ("option", 0), ("option", 2)])
def test_choice_predictions_equal_reference(folders, score, shots):
    from loraforge.infer.choice import choice_accuracy, read_choice_rows

    tok = bpe_tokenizer()
    model = tiny_model(tok)
    items = read_choice_rows(folders / "test.jsonl")
    dev = read_choice_rows(folders / "dev.jsonl")
    got = choice_accuracy(model, tok, items, score=score, dev=dev, shots=shots, pad_id=tok.pad_token_id, batch_size=3)
    want = _reference(model, tok, score, shots)
    assert got.predictions == want
    assert (got.correct, got.total) == (sum(p == _index(r) for p, r in zip(want, TEST)), len(TEST))


def test_eval_choice_command_per_subject_and_compare(folders, capsys):
    tok = bpe_tokenizer()
    cmd = ["eval", str(folders / "base"), "--data", str(folders / "test.jsonl"), "--metric", "choice",
           "--shots", "2", "--dev", str(folders / "dev.jsonl")]
    assert main(cmd) == 0
    rows = _rows(capsys.readouterr().out)
    want = _reference(tiny_model(tok), tok, "letter", 2)
    assert rows["overall"] == [_cell(want)]
    assert rows["geography"] == [_subject_cell(want, "geography")]
    assert rows["animals"] == [_subject_cell(want, "animals")]
    assert main(cmd + ["--adapter", str(folders / "adapter"), "--compare"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["overall"][0] == _cell(want) and len(rows["overall"]) == 2


@pytest.mark.parametrize("row,message", [
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "index 0..1 or a letter A..B"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "at least 2"),
    ({"question": "q", "A": "a", "answer": "A"}, '"choices" list or columns'),
    ({"choices": ["a", "b"], "answer": 0}, '"question"'),
])
def test_bad_choice_rows_name_the_line(tmp_path, capsys, row, message):
    tok = bpe_tokenizer()
    save_base(tiny_model(tok), tok, tmp_path / "base")
    data = _write(tmp_path / "bad.jsonl", [TEST[0], row])
    assert main(["eval", str(tmp_path / "base"), "--data", str(data), "--metric", "choice"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and message in err, err


def test_shots_need_a_dev_file_with_enough_rows(folders, capsys):
    base = ["eval", str(folders / "base"), "--data", str(folders / "test.jsonl"), "--metric", "choice"]
    assert main(base + ["--shots", "2"]) == 2
    assert "--dev" in capsys.readouterr().err
    assert main(base + ["--shots", "3", "--dev", str(folders / "dev.jsonl")]) == 2
    assert "3 shots need 3 dev rows with subject" in capsys.readouterr().err
    assert main(base[:-2] + ["--shots", "2", "--dev", str(folders / "dev.jsonl")]) == 2
    assert "go with --metric choice" in capsys.readouterr().err


@torch.no_grad()
def test_continuation_logprobs_equal_one_sequence_at_a_time():
    from loraforge.infer.choice import continuation_logprobs

    tok = bpe_tokenizer()
    model = tiny_model(tok)
    ctx_a, ctx_b = tok.encode("the capital of france is"), tok.encode("one two")
    pairs = [(ctx_a, tok.encode(" paris")), (ctx_a, tok.encode(" A")), (ctx_a, tok.encode(" B")),
             (ctx_b, tok.encode(" three")), (ctx_b, [5]), (ctx_a, [7]), (ctx_b, tok.encode(" A"))]
    got = continuation_logprobs(model, pairs, pad_id=tok.pad_token_id, batch_size=2)
    for (ctx, cont), value in zip(pairs, got):
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
        want = sum(F.log_softmax(logits[len(ctx) + j - 1], -1)[t].item() for j, t in enumerate(cont))
        assert value == pytest.approx(want, abs=1e-4)
