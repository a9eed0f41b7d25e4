"""The one error type for bad user input.

Anything the user can fix (a missing file, a malformed data row, an unknown config key, an
unsupported architecture) raises :class:`UserError` naming the thing it concerns and what was
expected. Only the CLI turns it into a one-line message and exit status 2; library callers get
an ordinary exception they can catch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input. ``where`` is a file, ``file:line``, a config key or a module name."""

    def __init__(self, message: str, *, where: str | None = None):
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class RunFailed(Exception):
    """A run that failed for a reason already reported (e.g. one rank of a multi-process run
    died; its own output says why). The CLI prints the one-line summary and exits 1."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def check_choice(value: str, choices: Iterable[str], what: str, where: str | None = None) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a UserError with a did-you-mean."""
    choices = list(choices)
    if value not in choices:
        raise UserError(
            f"unknown {what} {value!r}{did_you_mean(str(value), choices)}; "
            f"expected one of: {', '.join(map(str, choices))}",
            where=where,
        )
    return value
