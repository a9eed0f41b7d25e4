"""The Export tab: ``loraforge merge`` with the options the form sets, run as that command.

The option list and each option's choices and default are read from the merge command's own
argument parser (``loraforge.infer.merge_command.add_arguments``), the command line is checked by
that parser, and the merge runs as ``python -m loraforge merge ...`` in a subprocess: the same
checks (an existing ``--out`` without ``--overwrite``, a GGUF export llama.cpp cannot express),
the same messages and the same files as on the command line.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass

from loraforge.errors import UserError

# merge's options the tab shows (its positional MODEL, --adapter and --out are fields of their own)
OPTIONS = ("--into", "--format", "--dtype", "--gguf-type", "--overwrite")


def merge_parser() -> argparse.ArgumentParser:
    from loraforge.infer.merge_command import add_arguments

    parser = argparse.ArgumentParser(prog="loraforge merge", exit_on_error=False)
    add_arguments(parser)
    return parser


def option_specs() -> dict[str, argparse.Action]:
    """Each shown option's argparse action (choices, default, help)."""
    actions = {a.option_strings[0]: a for a in merge_parser()._actions if a.option_strings}
    return {name: actions[name] for name in OPTIONS}


def merge_argv(model: str, adapter: str, out: str, options: dict[str, object]) -> list[str]:
    """The ``loraforge merge`` arguments; ``options``: option -> value (None / False: left out).
    Checked by merge's parser; a bad value is a UserError naming the option."""
    argv = [(model or "").strip(), "--adapter", (adapter or "").strip(), "--out", (out or "").strip()]
    for name, value in options.items():
        if value is True:
            argv.append(name)
        elif value not in (None, False, ""):
            argv += [name, str(value)]
    for key, value in (("MODEL", argv[0]), ("--adapter", argv[2]), ("--out", argv[4])):
        if not value:
            raise UserError("expected a value", where=key)
    try:
        merge_parser().parse_args(argv)
    except argparse.ArgumentError as err:
        raise UserError(err.message, where=err.argument_name) from None
    return argv


@dataclass
class MergeResult:
    command: str  # the command line it ran
    returncode: int
    output: str  # what the command printed

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_merge(argv: list[str], timeout: float | None = None) -> MergeResult:
    command = [sys.executable, "-m", "loraforge", "merge", *argv]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    shown = shlex.join(["loraforge", "merge", *argv])
    return MergeResult(shown, done.returncode, (done.stdout + done.stderr).strip())
