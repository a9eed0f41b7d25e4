"""``loraforge chat MODEL [--adapter DIR]``: a terminal chat (see chat.py). Type ``/reset`` to
start over and ``/exit`` (or Ctrl-D) to quit; Ctrl-C stops the reply being generated and the chat
goes on (at the prompt it only clears the line). While a reply streams the terminal does not echo what is typed, and that input is
dropped afterwards (terminal.py). The start banner puts each value on its own line, so that an
80-column terminal never wraps one in the middle of another. A conversation too long for the
model's context loses its oldest turns; a message still too long is cut from the left, with a
note."""

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
    from loraforge.infer.terminal import no_echo

    settings = settings_from_args(args)
    session = load_session(args)
    template = resolve_template(session.tokenizer, args.template, session.trained_template, raw_option=False)
    interactive = sys.stdin.isatty()
    if interactive:
        stderr_console().print("\n".join(banner_lines(args.model, args.adapter, template, HELP)), style="dim",
                               markup=False)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def marker() -> None:
        if interactive:
            sys.stdout.write("\n> ")
            sys.stdout.flush()

    chat_loop(session.model, session.tokenizer, template, settings, _lines(), write, system=args.system,
              prompt_marker=marker, during_reply=lambda: no_echo(sys.stdin))
    return 0


def banner_lines(model: str, adapter: str | None, template: str, help_text: str) -> list[str]:
    """The start banner: one labelled value per line (a long path wraps alone, if at all)."""
    rows = [("model", str(model))] + ([("adapter", str(adapter))] if adapter else []) + [("template", template)]
    return [f"{label:<9} {value}" for label, value in rows] + [help_text]


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
            except KeyboardInterrupt:  # at the prompt: a fresh prompt, as in Python's REPL
                sys.stderr.write("\n(/exit or Ctrl-D quits)")
                yield ""
    else:
        yield from sys.stdin
