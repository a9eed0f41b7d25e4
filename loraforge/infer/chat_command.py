"""``loraforge chat MODEL [--adapter DIR]``: a terminal chat (see chat.py). Type ``/reset`` to
start over and ``/exit`` (or Ctrl-D) to quit."""

from __future__ import annotations

import argparse
import sys

from loraforge.infer.cli_args import (
    add_model_arguments,
    add_sampling_arguments,
    load_session,
    settings_from_args,
    stderr_console,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=512)
    parser.add_argument("--system", metavar="TEXT", default=None, help="a system message at the start of the chat")


def run(args: argparse.Namespace) -> int:
    from loraforge.infer.chat import HELP, chat_loop
    from loraforge.infer.prompts import resolve_template

    settings = settings_from_args(args)
    session = load_session(args)
    template = resolve_template(session.tokenizer, args.template, session.trained_template, raw_option=False)
    interactive = sys.stdin.isatty()
    if interactive:
        stderr_console().print(f"[dim]chatting with {args.model}{' + ' + args.adapter if args.adapter else ''} "
                               f"(template {template}); {HELP}[/dim]")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def marker() -> None:
        if interactive:
            sys.stdout.write("\n> ")
            sys.stdout.flush()

    chat_loop(session.model, session.tokenizer, template, settings, _lines(), write, system=args.system,
              prompt_marker=marker)
    return 0


def _lines():
    """Lines from stdin (readline editing when interactive) until end of input."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        while True:
            try:
                yield input()
            except EOFError:
                return
    else:
        yield from sys.stdin
