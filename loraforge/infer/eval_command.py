"""``loraforge eval MODEL [--adapter DIR] --data FILE [--metric perplexity|accuracy|choice] [--compare]``

- ``perplexity`` (default) on a ``.txt`` file: strided windows (``--window``, ``--stride``; see
  evaluate.py); on a data set (``.json``/``.jsonl``/``.parquet``): the responses' perplexity,
  rendered with the training template.
- ``accuracy`` on JSONL ``{prompt, answer}`` rows: greedy answers, ``--match exact`` (default) or
  ``contains``. A prompt too long for the model's context is cut from the left (with a note).
- ``choice`` on multiple-choice rows (MMLU layout or A/B/C/D columns; see choice.py): the
  log-likelihood of each option's letter (``--score letter``, QLoRA's way) or of its text
  (``--score option``, length-normalised), ``--shots K`` examples from ``--dev FILE``;
  per-subject and overall accuracy.
- ``--dtype bf16`` loads the base in bfloat16 (4-bit layers dequantize into it), as bitsandbytes'
  CPU inference does on its own where the CPU has AVX512-BF16; the loss is summed in float32.
- ``--compare`` (needs ``--adapter``) evaluates the base (adapter switched off) and the adapter
  in the same run and prints them side by side.

Each pass shows a progress bar (windows, examples, prompts or choices) when stderr is a terminal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loraforge.errors import UserError
from loraforge.infer.cli_args import add_model_arguments, load_session, print_note, stderr_console
from loraforge.progress import progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="FILE", help=".txt text, a data set, or {prompt, answer} JSONL")
    parser.add_argument("--metric", choices=("perplexity", "accuracy", "choice"), default="perplexity",
                        help="choice: multiple-choice rows (question, choices, answer[, subject])")
    parser.add_argument("--compare", action="store_true", help="base and adapter side by side (needs --adapter)")
    parser.add_argument("--window", type=int, default=None, metavar="N",
                        help="tokens per window / longest example (default min(1024, model context); at most the context)")
    parser.add_argument("--stride", type=int, default=None, metavar="N", help="window step for .txt (default window/2)")
    parser.add_argument("--match", choices=("exact", "contains"), default="exact",
                        help="accuracy: output equals the answer (stripped), or contains it")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="accuracy: tokens per answer (default 32)")
    parser.add_argument("--raw", action="store_true", help="accuracy: prompts as plain text, without the chat template")
    parser.add_argument("--score", choices=("letter", "option"), default="letter",
                        help="choice: likelihood of the answer letter (default, QLoRA's way) or of the option text")
    parser.add_argument("--shots", type=int, default=0, metavar="K", help="choice: K examples from --dev (default 0)")
    parser.add_argument("--dev", default=None, metavar="FILE", help="choice: rows the shots are taken from")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="examples per batch (default 8)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="the model's unquantized weights and matmuls (default fp32); bf16 nearly doubles "
                             "perplexity and choice throughput on a CPU with AVX512-BF16 / AMX or a GPU, is "
                             "emulated and slower on other CPUs, and decodes --metric accuracy more slowly")


def run(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if args.compare and not args.adapter:
        raise UserError("--compare puts base and adapter side by side; give the adapter with --adapter", where="--compare")
    if not data.is_file():
        raise UserError("data file not found", where=str(data))
    if args.metric == "accuracy" and data.suffix.lower() == ".txt":
        raise UserError("accuracy needs JSONL rows {\"prompt\": ..., \"answer\": ...}, not a .txt file", where=str(data))
    if args.metric != "choice" and (args.shots or args.dev or args.score != "letter"):
        raise UserError("--score, --shots and --dev go with --metric choice", where="--metric")
    if args.metric == "choice":
        measure_of = _choice(args)  # reads and checks the rows before the slow load
    session = load_session(args)
    if args.metric == "choice":
        measure, total, unit = measure_of(session)
    else:
        measure, total, unit = _accuracy(args, session) if args.metric == "accuracy" else _perplexity(args, session)
    results: dict = {}
    if args.compare:
        with session.adapter.disable_adapter(), progress("base", total, unit=unit) as advance:
            results["base"] = measure(advance)
    name = "adapter" if args.adapter else "model"
    with progress(name, total, unit=unit) as advance:
        results[name] = measure(advance)
    (_print_choice_table if args.metric == "choice" else _print_table)(args, results)
    return 0


def _choice(args):
    """session -> (measure(advance) -> ChoiceResult, steps per pass, their unit) for choice."""
    from loraforge.infer.choice import choice_accuracy, continuations_count, read_choice_rows
    from loraforge.infer.prompts import pad_token_id

    if args.shots < 0:
        raise UserError(f"expected shots >= 0, got {args.shots}", where="--shots")
    if args.shots and not args.dev:
        raise UserError("shots are taken from a dev file; give it with --dev", where="--shots")
    if args.template:
        raise UserError("choice prompts are MMLU's plain text; --template does not apply", where="--template")
    items = read_choice_rows(args.data)
    dev = read_choice_rows(args.dev) if args.dev else []

    def measure_of(session):
        def measure(advance):
            return choice_accuracy(session.model, session.tokenizer, items, score=args.score, dev=dev,
                                   shots=args.shots, pad_id=pad_token_id(session.tokenizer),
                                   batch_size=args.batch_size, on_batch=advance, dev_name=args.dev or "--dev")

        return measure, continuations_count(items), "choices"

    return measure_of


def _print_choice_table(args, results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def cell(counts) -> str:
        correct, total = counts
        return f"{correct / total:.2%} ({correct}/{total})" if total else "-"

    table = Table(title=f"choice accuracy ({args.score}, {args.shots}-shot) on {args.data}")
    table.add_column("subject")
    for name in results:
        table.add_column(name, justify="right")
    first = next(iter(results.values()))
    subjects = sorted(s for s in first.per_subject if s is not None)
    for subject in subjects + ([None] if None in first.per_subject and subjects else []):
        table.add_row(subject or "(none)", *(cell(r.per_subject[subject]) for r in results.values()))
    table.add_row("overall", *(cell((r.correct, r.total)) for r in results.values()))
    Console(highlight=False, soft_wrap=True).print(table)


def _perplexity(args, session):
    """(measure(advance) -> the value as text, steps per pass, their unit) for perplexity."""
    from loraforge.infer.evaluate import (
        perplexity_responses,
        perplexity_text,
        text_token_ids,
        windows,
    )
    from loraforge.infer.prompts import context_length, pad_token_id

    context = context_length(session.model) or 1024
    window = args.window or min(1024, context)
    if not 2 <= window <= context:
        raise UserError(f"expected a window of 2 to {context:,} tokens (the model's context), got {window:,}",
                        where="--window")
    if Path(args.data).suffix.lower() == ".txt":
        stride = args.stride or max(window // 2, 1)
        ids = text_token_ids(Path(args.data).read_text(encoding="utf-8"), session.tokenizer)
        stderr_console().print(f"[dim]{len(ids):,} tokens, window {window}, stride {stride}[/dim]")
        n_windows = len(windows(len(ids), window, stride))
        return lambda advance: _ppl(perplexity_text(session.model, ids, window, stride, advance)), n_windows, "windows"
    from loraforge.data import build_dataset

    template = args.template or session.trained_template or "auto"
    examples, stats = build_dataset(args.data, session.tokenizer, template=template, max_length=window)
    stderr_console().print(f"[dim]{stats.summary()}[/dim]")
    pad = pad_token_id(session.tokenizer)
    return (lambda advance: _ppl(perplexity_responses(session.model, examples, pad, args.batch_size, advance)),
            len(examples), "examples")


def _ppl(result) -> str:
    return f"{result.value:.4f}"


def _accuracy(args, session):
    """(measure(advance) -> the value as text, steps per pass, their unit) for accuracy."""
    from loraforge.infer.evaluate import accuracy, read_qa_rows
    from loraforge.infer.generate import GenerationSettings, generate
    from loraforge.infer.prompts import (
        context_length,
        encode_text,
        fit_context,
        pad_token_id,
        resolve_template,
        stop_token_ids,
    )

    rows = read_qa_rows(args.data)
    tokenizer = session.tokenizer
    template = None if args.raw else resolve_template(tokenizer, args.template, session.trained_template)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    prompts, notice = fit_context([encode_text(row["prompt"], tokenizer, template) for row in rows],
                                  context_length(session.model), settings.max_new_tokens)
    print_note(notice)
    stops = stop_token_ids(tokenizer, session.model, chat=template is not None)

    def measure(advance) -> str:
        outs = generate(session.model, tokenizer, prompts, settings, stop_ids=stops, pad_id=pad_token_id(tokenizer),
                        batch_size=args.batch_size, on_batch=lambda done, tokens: advance(done))
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        correct, total = accuracy(texts, [row["answer"] for row in rows], args.match)
        return f"{correct / total:.2%} ({correct}/{total})"

    return measure, len(prompts), "prompts"


def _print_table(args, results: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    what = args.metric if args.metric == "perplexity" else f"accuracy ({args.match} match)"
    table = Table(title=f"{what} on {args.data}")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    table.add_row(what, *results.values())
    Console(highlight=False, soft_wrap=True).print(table)
