"""A judged pairwise tournament of answer files, as the QLoRA paper's Vicuna / OA benchmarks run
it (Dettmers et al. 2023, section 5; the judging prompt follows Zheng et al. 2023, MT-bench's
pairwise prompt with the ``[[A]]`` / ``[[B]]`` / ``[[C]]`` verdict).

Each answers file holds one system's answers: JSONL rows with the question (``prompt``,
``question`` or ``instruction``) and the answer (``output``, as ``loraforge generate`` writes it,
or ``answer`` / ``response``); questions are matched across files by ``id`` (or
``question_id``) when present, else by the question text, and every file must answer the same
questions. For every question and every pair of systems the judge sees both orders (A first,
then B first), so a judge's position bias cancels. The verdict is the last ``[[A]]``,
``[[B]]`` or ``[[C]]`` (tie) in the judge's reply; a reply with none is kept with verdict
``null`` and plays no game.

Judgments are appended to a JSONL file as they arrive (``question_id``, ``first``, ``second``,
``verdict``: ``first`` / ``second`` / ``tie`` / null, ``winner``, ``question``, ``judge_output``);
a rerun reads it and asks only the judgments that are not there yet (resumable). Each judgment
with a verdict is one Elo game (see elo.py).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import UserError

DEFAULT_PROMPT = """\
Please act as an impartial judge and evaluate the quality of the responses provided by two AI \
assistants to the user question displayed below. You should choose the assistant that follows the \
user's instructions and answers the user's question better. Your evaluation should consider \
factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of \
their responses. Begin your evaluation by comparing the two responses and provide a short \
explanation. Avoid any position biases and ensure that the order in which the responses were \
presented does not influence your decision. Do not allow the length of the responses to influence \
your evaluation. Be as objective as possible. After providing your explanation, output your final \
verdict by strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant \
B is better, and "[[C]]" for a tie.

[User Question]
{question}

[The Start of Assistant A's Answer]
{answer_a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{answer_b}
[The End of Assistant B's Answer]
"""
PLACEHOLDERS = ("{question}", "{answer_a}", "{answer_b}")
QUESTION_KEYS = ("prompt", "question", "instruction")
ANSWER_KEYS = ("output", "answer", "response")
_VERDICT = re.compile(r"\[\[(A|B|C)\]\]")


@dataclass
class Answer:
    question: str
    text: str


def read_answers(path: str | Path) -> dict[str, Answer]:
    """{question id: Answer} of one answers file, in file order."""
    from loraforge.data import load_records

    out: dict[str, Answer] = {}
    for row in load_records(path):
        question = next((row[k] for k in QUESTION_KEYS if isinstance(row.get(k), str)), None)
        answer = next((row[k] for k in ANSWER_KEYS if isinstance(row.get(k), str)), None)
        if question is None or answer is None:
            raise UserError(f"expected a question ({' / '.join(QUESTION_KEYS)}) and an answer "
                            f"({' / '.join(ANSWER_KEYS)}) string", where=row.where)
        key = row.get("id", row.get("question_id", question))
        key = str(key)
        if key in out:
            raise UserError(f"question {key!r} is answered twice in this file", where=row.where)
        out[key] = Answer(question, answer)
    return out


def check_same_questions(systems: dict[str, dict[str, Answer]], files: dict[str, str]) -> list[str]:
    """The question ids (first file's order); every file must answer exactly those."""
    names = list(systems)
    keys = list(systems[names[0]])
    for name in names[1:]:
        missing = [k for k in keys if k not in systems[name]]
        extra = [k for k in systems[name] if k not in systems[names[0]]]
        if missing or extra:
            what = (f"lacks question {missing[0]!r}, which {files[names[0]]} answers" if missing else
                    f"answers question {extra[0]!r}, which {files[names[0]]} does not")
            raise UserError(f"{what}; every answers file must answer the same questions", where=files[name])
    return keys


def load_prompt(path: str | Path | None) -> str:
    """The judging prompt: the shipped one, or a file holding {question}, {answer_a}, {answer_b}."""
    if path is None:
        return DEFAULT_PROMPT
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read the prompt file: {err.strerror or err}", where=str(path)) from None
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise UserError(f"the judging prompt lacks {', '.join(missing)}; it needs {', '.join(PLACEHOLDERS)}",
                        where=str(path))
    return text


def judge_prompt(template: str, question: str, answer_a: str, answer_b: str) -> str:
    # plain replacement, not str.format: a prompt may hold other braces (JSON examples)
    return template.replace("{question}", question).replace("{answer_a}", answer_a).replace("{answer_b}", answer_b)


def parse_verdict(text: str) -> str | None:
    """``first``, ``second``, ``tie`` or None from the judge's reply (the last verdict mark)."""
    marks = _VERDICT.findall(text)
    return {"A": "first", "B": "second", "C": "tie"}[marks[-1]] if marks else None


def read_judgments(path: Path) -> list[dict]:
    """Judgments already in ``path`` (none if it does not exist). A torn last line (an
    interrupted write) is dropped from the file; any other bad line is an error."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and all(k in row for k in ("question_id", "first", "second", "verdict"))
        except ValueError:
            ok = False
        if not ok:
            if n == len(lines) and not line.endswith("\n"):
                path.write_text("".join(lines[:-1]), encoding="utf-8")
                break
            raise UserError("expected a judgment row (question_id, first, second, verdict); delete the file to "
                            "start over", where=f"{path}:{n}")
        rows.append(row)
    return rows


def schedule(keys: Sequence[str], names: Sequence[str]) -> list[tuple[str, str, str]]:
    """(question id, first, second) for every question, pair of systems and order."""
    return [(key, a, b) for key in keys for x, y in itertools.combinations(names, 2) for a, b in ((x, y), (y, x))]


def run_tournament(systems: dict[str, dict[str, Answer]], judge: Callable[[str], str], *, out: str | Path,
                   prompt: str = DEFAULT_PROMPT, files: dict[str, str] | None = None,
                   on_judgment: Callable[[dict], None] | None = None) -> list[dict]:
    """Judge every scheduled pair not yet in ``out`` (appending each as it comes); all judgments
    of this tournament (old and new) in schedule order."""
    if len(systems) < 2:
        raise UserError("a tournament needs at least 2 answers files", where="--answers")
    out = Path(out)
    keys = check_same_questions(systems, files or {n: n for n in systems})
    done = {(r["question_id"], r["first"], r["second"]): r for r in read_judgments(out)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for key, a, b in schedule(keys, list(systems)):
            if (key, a, b) in done:
                continue
            first, second = systems[a][key], systems[b][key]
            reply = judge(judge_prompt(prompt, first.question, first.text, second.text))
            verdict = parse_verdict(reply)
            row = {"question_id": key, "first": a, "second": b, "verdict": verdict,
                   "winner": {"first": a, "second": b, "tie": "tie"}.get(verdict), "question": first.question,
                   "judge_output": reply}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            done[(key, a, b)] = row
            if on_judgment is not None:
                on_judgment(row)
    return [done[s] for s in schedule(keys, list(systems))]


@dataclass
class Standing:
    wins: int = 0
    ties: int = 0
    losses: int = 0
    no_verdict: int = 0


def standings(judgments: Sequence[dict], names: Sequence[str]) -> dict[str, Standing]:
    table = {n: Standing() for n in names}
    for row in judgments:
        a, b, verdict = table[row["first"]], table[row["second"]], row["verdict"]
        if verdict == "first":
            a.wins, b.losses = a.wins + 1, b.losses + 1
        elif verdict == "second":
            b.wins, a.losses = b.wins + 1, a.losses + 1
        elif verdict == "tie":
            a.ties, b.ties = a.ties + 1, b.ties + 1
        else:
            a.no_verdict, b.no_verdict = a.no_verdict + 1, b.no_verdict + 1
    return table


def games(judgments: Sequence[dict]) -> list[tuple[str, str, float]]:
    """Elo games (first, second, score of first) of the judgments with a verdict."""
    score = {"first": 1.0, "second": 0.0, "tie": 0.5}
    return [(r["first"], r["second"], score[r["verdict"]]) for r in judgments if r["verdict"] in score]
