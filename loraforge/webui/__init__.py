"""``loraforge webui``: configure, train, watch, chat and export in the browser (Gradio).

A thin layer over the library and the config schema the CLI uses; nothing here decides what a
run, a chat turn or a merge does:

    form.py      the train form, read off the config schema; values -> the config ``loraforge train`` runs
    runs.py      runs as ``loraforge train`` subprocesses: start, stop (SIGINT, as Ctrl-C), resume, progress
    compare.py   the base and base + adapter replying side by side (streamed)
    export.py    ``loraforge merge`` with its own options
    app.py       the Gradio Blocks: Train, Chat and Export tabs
    command.py   the ``loraforge webui`` command (127.0.0.1 by default; never a public share link)

Gradio is the optional extra ``webui`` (``pip install loraforge[webui]``), imported on first use.
"""

from __future__ import annotations

import os

from loraforge.errors import UserError


def require_gradio():
    """The gradio module, with its analytics off; a UserError naming the extra when missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no phoning home
    try:
        import gradio
    except ImportError:
        raise UserError("the web UI needs gradio: pip install 'loraforge[webui]'", where="webui") from None
    return gradio
