"""``loraforge webui [--host 127.0.0.1] [--port 7860] [--auth user:password] [--workdir runs/webui]``.

Serves the web UI on ``host:port`` (the loopback interface unless ``--host`` says otherwise; a
public Gradio share link is never made). ``--auth`` asks for that user and password before
anything is shown. ``--workdir`` keeps the configs the UI writes (one YAML per run, the one the
run reads, beside the run's console output) and uploaded data files. Ctrl-C (or SIGTERM) stops the
server; runs it started are stopped as by Ctrl-C (each saves a checkpoint).
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from loraforge.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--auth", metavar="USER:PASSWORD", default=None, help="ask for this user and password")
    parser.add_argument("--workdir", default="runs/webui", metavar="DIR",
                        help="where the UI writes run configs and uploaded data (default runs/webui)")


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError("expected USER:PASSWORD, both non-empty", where="--auth")
    return user, password


def run(args: argparse.Namespace) -> int:
    from loraforge.webui import require_gradio

    auth = parse_auth(args.auth)
    if not 0 < args.port < 65536:
        raise UserError(f"expected a port in 1..65535, got {args.port}", where="--port")
    gr = require_gradio()
    from loraforge.webui.app import CSS, build_app
    from loraforge.webui.compare import Compare
    from loraforge.webui.runs import Runs

    workdir = Path(args.workdir).resolve()
    runs = Runs(workdir)
    app = build_app(gr, workdir, runs, Compare())
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl-C does (runs save a checkpoint)
    print(f"loraforge webui: http://{args.host}:{args.port}  (workdir {workdir}; Ctrl-C stops)", flush=True)
    try:
        app.queue(default_concurrency_limit=4).launch(
            server_name=args.host, server_port=args.port, auth=auth, share=False, inbrowser=False,
            show_error=True, quiet=True, css=CSS, footer_links=[], allowed_paths=[str(workdir)], mcp_server=False)
    finally:
        runs.stop_all()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
