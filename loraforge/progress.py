"""Live progress bars (rich) on stderr for long work, drawn only when stderr is a terminal.

``with progress("evaluating", total=120, unit="windows") as advance: ... advance(1)`` draws a
bar with the count, elapsed and remaining time; ``advance(n, note="1,234 tokens")`` also updates
a free text column, and ``advance(0, description="writing")`` renames the step. When stderr is
not a terminal (a pipe, a log file, the tests) or ``enabled`` is false, nothing is drawn and
``advance`` does nothing, so logs stay free of bar redraws.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


def stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def progress(description: str, total: int | None, *, unit: str = "", enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, *, note=None, description=None)`` for a bar of ``total`` steps."""
    if not (enabled and stderr_is_terminal()):
        yield lambda n=1, **fields: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn(unit), TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=Console(file=sys.stderr), transient=True)
    task = bar.add_task(description, total=total, note="")

    def advance(n: int = 1, *, note: str | None = None, description: str | None = None) -> None:
        fields = {k: v for k, v in (("note", note), ("description", description)) if v is not None}
        bar.update(task, advance=n, **fields)

    with bar:
        yield advance
