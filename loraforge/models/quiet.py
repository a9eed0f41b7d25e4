"""Keep transformers quiet while loraforge loads a model.

transformers logs warnings and draws progress bars ("Loading weights", and the GGUF converter's
own ``tqdm.auto`` bar, which ignores transformers' progress-bar switch). Inside
:func:`quiet_transformers` its logger only reports errors, its bars are off, and anything written
to ``sys.stderr`` (the GGUF bar) is dropped; all three are restored on exit.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers(*, capture_stderr: bool = False) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if capture_stderr:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
        else:
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
