"""The terminal while a chat reply streams: Ctrl-C stops the reply (not the program), and keys
typed meanwhile neither print into the reply nor reach the next prompt.

- :class:`CtrlC` replaces the SIGINT handler for the duration of a ``with`` block by one that only
  records the press; generation checks ``pressed`` after every token (a stopping criterion) and
  ends the reply there. Outside the block Ctrl-C raises ``KeyboardInterrupt`` as usual. Python
  runs signal handlers in the main thread only; elsewhere the block changes nothing.
- :func:`no_echo` turns the terminal's echo off (``termios``; signals stay on, so Ctrl-C still
  arrives) and, on leaving, discards what was typed (``tcflush``) and restores the settings. It
  does nothing when the stream is not a terminal or the platform has no ``termios``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import TextIO


class CtrlC:
    """``with CtrlC() as ctrl_c:`` ... ``ctrl_c.pressed`` is True once Ctrl-C was pressed."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._press)
        return self

    def _press(self, signum, frame) -> None:
        self.pressed = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


@contextlib.contextmanager
def no_echo(stream: TextIO) -> Iterator[None]:
    """Echo off on the terminal ``stream`` inside the block; typed-ahead input dropped after it."""
    try:
        import termios

        fd = stream.fileno()
        saved = termios.tcgetattr(fd) if stream.isatty() else None
    except (ImportError, OSError, ValueError, AttributeError):  # no termios, no real file, closed
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # local flags: no echo (ISIG kept: Ctrl-C still signals)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)
