"""``loraforge judge``: the pairwise tournament (both orders), win/tie/loss, Elo with bootstrap
intervals, resuming, and judging through a real ``loraforge serve`` server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers_infer import bpe_tokenizer, save_base, tiny_model

from loraforge.cli import build_parser, main
from loraforge.errors import UserError
from loraforge.infer.elo import bootstrap_elo, elo
from loraforge.infer.judge import games, read_answers, run_tournament, schedule, standings

pytestmark = pytest.mark.usefixtures("quiet_single_thread")
QUESTIONS = ["hello", "paris", "one two", "the quick brown fox"]


def _answers_file(path, system, questions=QUESTIONS):
    path.write_text("".join(json.dumps({"prompt": q, "output": f"{system} says {q}"}) + "\n" for q in questions))
    return path


def _systems(tmp_path, names=("A", "B", "C")):
    return {n: read_answers(_answers_file(tmp_path / f"{n}.jsonl", n)) for n in names}


def _shown(prompt: str) -> tuple[str, str]:
    """Which systems' answers the judge sees as assistant A and B."""
    a = re.search(r"Assistant A's Answer\]\n(\w+) says", prompt).group(1)
    b = re.search(r"Assistant B's Answer\]\n(\w+) says", prompt).group(1)
    return a, b


class Stub:
    """A deterministic judge: system A beats everyone, all other pairs tie; records what it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, prompt: str) -> str:
        first, second = _shown(prompt)
        self.seen.append((first, second))
        if first == "A":
            return "Assistant A is better. [[A]]"
        if second == "A":
            return "[[A]] looked fine at first, but B is better: [[B]]"  # the last mark counts
        return "Equally good. [[C]]"


def test_elo_update_by_hand():
    assert elo([("x", "y", 1.0)], ["x", "y"]) == {"x": 1016.0, "y": 984.0}
    r = elo([("x", "y", 1.0), ("x", "y", 0.5)], ["x", "y"])
    expected = 1 / (1 + 10 ** ((984 - 1016) / 400))
    assert r["x"] == pytest.approx(1016 + 32 * (0.5 - expected))
    assert r["x"] + r["y"] == pytest.approx(2000)


def test_a_always_wins_tops_with_separated_interval(tmp_path):
    stub = Stub()
    judgments = run_tournament(_systems(tmp_path), stub, out=tmp_path / "j.jsonl")
    n = len(QUESTIONS)
    assert len(judgments) == len(stub.seen) == n * 3 * 2
    assert sorted(stub.seen) == sorted([(a, b) for a in "ABC" for b in "ABC" if a != b] * n)  # both orders
    table = standings(judgments, ["A", "B", "C"])
    assert (table["A"].wins, table["A"].ties, table["A"].losses) == (4 * n, 0, 0)
    assert (table["B"].wins, table["B"].ties, table["B"].losses) == (0, 2 * n, 2 * n)
    ratings = bootstrap_elo(games(judgments), ["A", "B", "C"], rounds=200, seed=1)
    assert ratings["A"].mean > ratings["B"].mean and ratings["A"].mean > ratings["C"].mean
    assert ratings["A"].low > ratings["B"].high and ratings["A"].low > ratings["C"].high
    assert ratings["A"].low <= ratings["A"].mean <= ratings["A"].high
    rows = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert rows == judgments and {r["winner"] for r in rows} == {"A", "tie"}


def test_ties_position_bias_and_no_verdict(tmp_path):
    systems = _systems(tmp_path, ("A", "B"))
    tied = run_tournament(systems, lambda p: "[[C]]", out=tmp_path / "tie.jsonl")
    assert {r["verdict"] for r in tied} == {"tie"}
    assert all(r.mean == 1000 for r in bootstrap_elo(games(tied), ["A", "B"], rounds=20).values())
    # a judge that always prefers the first answer: both orders cancel it out
    biased = run_tournament(systems, lambda p: "[[A]]", out=tmp_path / "bias.jsonl")
    table = standings(biased, ["A", "B"])
    assert table["A"].wins == table["A"].losses == table["B"].wins == len(QUESTIONS)
    mute = run_tournament(systems, lambda p: "no idea", out=tmp_path / "mute.jsonl")
    assert {r["verdict"] for r in mute} == {None} and games(mute) == []
    assert standings(mute, ["A", "B"])["A"].no_verdict == 2 * len(QUESTIONS)


def test_resume_asks_only_missing_judgments(tmp_path):
    systems, out = _systems(tmp_path), tmp_path / "j.jsonl"
    first = run_tournament(systems, Stub(), out=out)
    again = Stub()
    assert run_tournament(systems, again, out=out) == first and again.seen == []
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:10]) + lines[10][:15])  # interrupted mid-line
    later = Stub()
    assert run_tournament(systems, later, out=out) == first
    assert len(later.seen) == len(first) - 10
    assert len(out.read_text().splitlines()) == len(first)


def test_mismatched_answers_files_are_refused(tmp_path, capsys):
    a = _answers_file(tmp_path / "a.jsonl", "A")
    b = _answers_file(tmp_path / "b.jsonl", "B", QUESTIONS[:-1])
    assert main(["judge", "--answers", str(a), str(b), "--judge", "http://127.0.0.1:9/v1", "--judge-model", "m"]) == 2
    err = capsys.readouterr().err
    assert str(b) in err and "lacks question 'the quick brown fox'" in err
    assert main(["judge", "--answers", str(a), f"x={a}", "--judge", "http://127.0.0.1:9/v1"]) == 2
    assert "--judge-model" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("{question} {answer_a}")
    assert main(["judge", "--answers", str(a), f"x={a}", "--judge", "http://x/v1", "--judge-model", "m",
                 "--prompt", str(tmp_path / "p.txt")]) == 2
    assert "{answer_b}" in capsys.readouterr().err


def test_http_judge_retries_then_succeeds():
    from loraforge.infer.judge_clients import HttpJudge

    calls = []

    class Flaky(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append((body, self.headers.get("Authorization")))
            status, reply = (503, {"error": {"message": "busy"}}) if len(calls) < 3 else (
                200, {"choices": [{"message": {"role": "assistant", "content": "[[B]]"}}]})
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        judge = HttpJudge(url, "m", api_key="k", retries=3, backoff_s=0.0, timeout_s=10)
        assert judge("which?") == "[[B]]" and len(calls) == 3
        assert calls[0][0]["model"] == "m" and calls[0][0]["temperature"] == 0 and calls[0][1] == "Bearer k"
        with pytest.raises(UserError, match="failed 2 times"):
            calls.clear()
            HttpJudge(url, "m", retries=1, backoff_s=0.0)("which?")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_judge_against_serve(tmp_path, capsys):
    from loraforge.infer.judge_clients import LocalJudge
    from loraforge.infer.serve_command import build

    tok = bpe_tokenizer()
    save_base(tiny_model(tok), tok, tmp_path / "base")
    httpd = build(build_parser().parse_args(["serve", str(tmp_path / "base"), "--port", "0"]))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        (tmp_path / "prompt.txt").write_text("which is better? {question}\nA: {answer_a}\nB: {answer_b}\n")
        a = _answers_file(tmp_path / "A.jsonl", "A", QUESTIONS[:2])
        b = _answers_file(tmp_path / "B.jsonl", "B", QUESTIONS[:2])
        cmd = ["judge", "--answers", str(a), str(b), "--judge", url, "--judge-model", "base", "--max-tokens", "6",
               "--prompt", str(tmp_path / "prompt.txt"), "--out", str(tmp_path / "j.jsonl"), "--rounds", "10"]
        assert main(cmd) == 0
        rows = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
        assert [(r["question_id"], r["first"], r["second"]) for r in rows] == schedule(QUESTIONS[:2], ["A", "B"])
        local = LocalJudge(str(tmp_path / "base"), max_new_tokens=6)
        for r in rows:  # the server's reply is the base model's greedy reply to the judging prompt
            first, second = (f"{s} says {r['question']}" for s in (r["first"], r["second"]))
            assert r["judge_output"] == local(f"which is better? {r['question']}\nA: {first}\nB: {second}\n")
        out = capsys.readouterr().out
        assert "Elo" in out and "95% interval" in out
        local_cmd = cmd[:cmd.index("--judge")] + ["--judge", str(tmp_path / "base")] + cmd[cmd.index("--max-tokens"):]
        local_cmd[local_cmd.index("--out") + 1] = str(tmp_path / "local.jsonl")
        assert main(local_cmd) == 0  # the same judge run locally gives the same judgments
        local_rows = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
        assert local_rows == rows
        assert main(cmd[:-4] + ["--judge-model", "nope", "--out", str(tmp_path / "k.jsonl")]) == 2
        assert "404" in capsys.readouterr().err
    finally:
        httpd.shutdown()
        httpd.server_close()
