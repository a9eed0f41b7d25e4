"""``loraforge judge --answers A.jsonl B.jsonl [...] --judge MODEL_OR_URL [--judge-model NAME] [--prompt FILE]``

A pairwise tournament (see judge.py): every question, every pair of systems, both orders;
judgments go to ``--out`` (JSONL, resumable: a rerun asks only what is missing); then a table of
win / tie / loss and Elo ratings with bootstrap 95% intervals (elo.py). A system is named after
its file (``A.jsonl`` -> ``A``) or explicitly with ``NAME=FILE``. ``--judge`` is an
``http(s)://`` base URL of an OpenAI-compatible server (``--judge-model`` names the model there;
the key is read from ``--api-key-env``, default ``OPENAI_API_KEY``, if set) or any model
loraforge loads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from loraforge.errors import UserError
from loraforge.progress import progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--answers", nargs="+", required=True, metavar="[NAME=]FILE",
                        help="two or more JSONL answers files (rows with prompt and output, as generate writes)")
    parser.add_argument("--judge", required=True, metavar="MODEL_OR_URL",
                        help="an OpenAI-compatible base URL (http://127.0.0.1:8000/v1) or a model loraforge loads")
    parser.add_argument("--judge-model", default=None, metavar="NAME", help="the model name to ask at a --judge URL")
    parser.add_argument("--prompt", default=None, metavar="FILE",
                        help="judging prompt with {question}, {answer_a}, {answer_b} (default: the shipped one)")
    parser.add_argument("--out", default="judgments.jsonl", metavar="FILE.jsonl",
                        help="judgments file; judgments already in it are not asked again (default judgments.jsonl)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                        help="environment variable holding the judge URL's key (default OPENAI_API_KEY; unset: no key)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per judge request (default 120)")
    parser.add_argument("--retries", type=int, default=3, metavar="N", help="retries per judge request (default 3)")
    parser.add_argument("--max-tokens", type=int, default=512, metavar="N", help="longest judge reply (default 512)")
    parser.add_argument("--rounds", type=int, default=1000, metavar="N",
                        help="random orderings for the Elo bootstrap (default 1000)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the orderings (default 0)")
    parser.add_argument("--quantize", choices=("nf4", "fp4"), default=None, help="a local judge: load it in 4 bits")
    parser.add_argument("--device", default=None, help="a local judge: cpu, cuda, ... (default: cpu)")


def answer_files(specs: list[str]) -> dict[str, str]:
    files: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise UserError(f"expected FILE or NAME=FILE, got {spec!r}", where="--answers")
        if name in files:
            raise UserError(f"two systems are called {name!r}; name them with NAME=FILE", where="--answers")
        files[name] = path
    if len(files) < 2:
        raise UserError("a tournament needs at least 2 answers files", where="--answers")
    return files


def make_judge(args: argparse.Namespace):
    from loraforge.infer.judge_clients import HttpJudge, LocalJudge

    checks = (("--retries", args.retries, args.retries >= 0), ("--max-tokens", args.max_tokens, args.max_tokens >= 1),
              ("--timeout", args.timeout, args.timeout > 0), ("--rounds", args.rounds, args.rounds >= 1))
    for flag, value, ok in checks:
        if not ok:
            raise UserError(f"expected a positive number, got {value}", where=flag)
    if args.judge.startswith(("http://", "https://")):
        if not args.judge_model:
            raise UserError("a judge URL needs the model name to ask for; give --judge-model", where="--judge")
        return HttpJudge(args.judge, args.judge_model, api_key=os.environ.get(args.api_key_env) or None,
                         timeout_s=args.timeout, retries=args.retries, max_tokens=args.max_tokens)
    return LocalJudge(args.judge, max_new_tokens=args.max_tokens, quantize=args.quantize, device=args.device)


def run(args: argparse.Namespace) -> int:
    from loraforge.infer.judge import check_same_questions, load_prompt, read_answers, run_tournament, schedule

    files = answer_files(args.answers)
    systems = {name: read_answers(path) for name, path in files.items()}
    keys = check_same_questions(systems, files)  # bad input before the slow load
    prompt = load_prompt(args.prompt)
    judge = make_judge(args)
    with progress("judging", len(schedule(keys, list(systems))), unit="judgments") as advance:
        judgments = run_tournament(systems, judge, out=args.out, prompt=prompt, files=files,
                                   on_judgment=lambda _: advance(1))
    print_results(judgments, list(systems), rounds=args.rounds, seed=args.seed, out=args.out)
    return 0


def print_results(judgments: list[dict], names: list[str], *, rounds: int, seed: int, out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from loraforge.infer.elo import bootstrap_elo
    from loraforge.infer.judge import games, standings

    ratings = bootstrap_elo(games(judgments), names, rounds=rounds, seed=seed)
    table_of = standings(judgments, names)
    table = Table(title=f"{len(judgments)} judgments ({out}); Elo: K=32, start 1000, {rounds} random orderings")
    for column in ("system", "win", "tie", "loss", "no verdict", "Elo", "95% interval"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for name in sorted(names, key=lambda n: -ratings[n].mean):
        s, r = table_of[name], ratings[name]
        table.add_row(name, str(s.wins), str(s.ties), str(s.losses), str(s.no_verdict), f"{r.mean:.0f}",
                      f"{r.low:.0f} - {r.high:.0f}")
    Console(highlight=False, soft_wrap=True).print(table)
