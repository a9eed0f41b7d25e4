"""``loraforge generate MODEL [--adapter DIR] (--prompt TEXT | --prompts FILE.jsonl [--out FILE.jsonl])``

One prompt: the reply streams to stdout. A prompts file (JSONL rows with ``prompt``, or
``messages`` for a whole conversation; other fields are carried through): batches of
``--batch-size`` prompts of similar length, left-padded, with a progress bar on stderr when it
is a terminal; each row is written back with its generated ``output`` to ``--out`` (atomically)
or to stdout. A prompt too long for the model's context is cut from the left, leaving room for
the reply, with a one-line note on stderr (see prompts.py).
"""

from __future__ import annotations

import argparse
import sys
import time

from loraforge.errors import UserError
from loraforge.infer.cli_args import (
    add_model_arguments,
    add_sampling_arguments,
    load_session,
    print_note,
    settings_from_args,
    stderr_console,
)
from loraforge.progress import progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="one prompt (the reply is printed as it is generated)")
    source.add_argument("--prompts", metavar="FILE.jsonl", help='JSONL rows with a "prompt" (or "messages") field')
    parser.add_argument("--out", metavar="FILE.jsonl", default=None,
                        help="where to write the rows with their output (default: stdout)")
    add_sampling_arguments(parser)
    parser.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per batch (default 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")


def run(args: argparse.Namespace) -> int:
    from loraforge.infer.generate import (
        encode_row,
        generate,
        generate_ids,
        read_prompt_rows,
        stream_writer,
        write_jsonl,
    )
    from loraforge.infer.prompts import (
        context_length,
        encode_text,
        fit_context,
        pad_token_id,
        resolve_template,
        stop_token_ids,
    )

    if args.out and not args.prompts:
        raise UserError("--out goes with --prompts (a single --prompt prints its reply)", where="--out")
    settings = settings_from_args(args)
    rows = read_prompt_rows(args.prompts) if args.prompts else None  # bad input before the slow load
    session = load_session(args)
    model, tokenizer = session.model, session.tokenizer
    template = None if args.raw else resolve_template(tokenizer, args.template, session.trained_template)
    stops = stop_token_ids(tokenizer, model, chat=template is not None)
    pad = pad_token_id(tokenizer)

    if rows is None:
        if settings.seed is not None:
            import torch

            torch.manual_seed(settings.seed)
        (ids,), notice = fit_context([encode_text(args.prompt, tokenizer, template)], context_length(model),
                                     settings.max_new_tokens)
        print_note(notice)
        write = _stdout_writer()
        generate_ids(model, [ids], settings, stop_ids=stops, pad_id=pad, streamer=stream_writer(tokenizer, write))
        write("\n")
        return 0

    prompts, notice = fit_context([encode_row(row, tokenizer, template) for row in rows], context_length(model),
                                  settings.max_new_tokens)
    print_note(notice)
    started = time.perf_counter()
    with progress("generating", len(prompts), unit="prompts", enabled=not args.no_progress) as advance:
        tokens = 0

        def on_batch(done: int, new_tokens: int) -> None:
            nonlocal tokens
            tokens += new_tokens
            advance(done, note=f"{tokens:,} tokens")

        outputs = generate(model, tokenizer, prompts, settings, stop_ids=stops, pad_id=pad,
                           batch_size=args.batch_size, on_batch=on_batch)
    seconds = time.perf_counter() - started
    new_tokens = sum(len(o) for o in outputs)
    out_rows = [{**row, "output": tokenizer.decode(o, skip_special_tokens=True)} for row, o in zip(rows, outputs)]
    write_jsonl(out_rows, args.out)
    stderr_console().print(f"generated {new_tokens:,} tokens for {len(rows)} prompts in {seconds:.1f} s "
                           f"({new_tokens / max(seconds, 1e-9):.1f} tokens/s)" + (f"; wrote {args.out}" if args.out else ""))
    return 0


def _stdout_writer():
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return write
