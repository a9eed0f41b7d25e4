"""``loraforge serve MODEL [--adapter DIR | --adapter NAME=DIR ...] [--host H] [--port P] [--api-key-env VAR]``

An OpenAI-compatible server (``/v1/chat/completions`` with streaming, ``/v1/completions``,
``/v1/models``) for one base and any number of adapters on it (see serve.py). ``--adapter DIR``
names the adapter after its folder; ``NAME=DIR`` names it explicitly. The base answers to its
own name (``--base-name``, default: the model's file or folder name). Binds 127.0.0.1 unless
``--host`` says otherwise; ``--api-key-env VAR`` requires ``Authorization: Bearer $VAR``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from loraforge.errors import UserError
from loraforge.infer.cli_args import TEMPLATE_CHOICES, stderr_console


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="base model: HF folder, .gguf file, bitsandbytes 4-bit folder or alias (smollm2-135m-instruct)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="an adapter folder to serve under NAME (default: the folder's name); repeat for more")
    parser.add_argument("--base-name", default=None, metavar="NAME",
                        help="the name the base answers to (default: the model's file or folder name)")
    parser.add_argument("--quantize", choices=("nf4", "fp4"), default=None,
                        help="load a full-precision base in 4 bits (QLoRA-style) before adding the adapters")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--template", choices=TEMPLATE_CHOICES, default=None,
                        help="chat template for every model (default: each adapter's training template, else the tokenizer's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--api-key-env", default=None, metavar="VAR",
                        help="require the key held in environment variable VAR as 'Authorization: Bearer KEY'")
    parser.add_argument("--max-tokens", type=int, default=1024, metavar="N",
                        help="the most tokens one request may ask for (default 1024)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                        help="largest request body accepted (default 1 MiB)")


def adapter_names(specs: list[str]) -> dict[str, str]:
    """``NAME=DIR`` / ``DIR`` arguments -> {name: folder}; duplicates are an error."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            folder, name = spec, Path(spec.rstrip("/")).name
        if not name or not folder:
            raise UserError(f"expected DIR or NAME=DIR, got {spec!r}", where="--adapter")
        if name in out:
            raise UserError(f"two adapters are called {name!r}; name them with NAME=DIR", where="--adapter")
        out[name] = folder
    return out


def base_name(model: str) -> str:
    path = Path(model.rstrip("/"))
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def build(args: argparse.Namespace):
    """The bound server (not yet serving) for these arguments."""
    from loraforge.infer.serve import Limits, ModelServer, make_server
    from loraforge.infer.session import load_for_inference

    adapters = adapter_names(args.adapter)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError("the environment variable is unset or empty; export the API key in it",
                            where=args.api_key_env)
    for flag, value in (("--max-tokens", args.max_tokens), ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            raise UserError(f"expected a positive number, got {value}", where=flag)
    for name, folder in adapters.items():
        if not Path(folder).is_dir():
            raise UserError(f"adapter {name!r}: folder not found", where=folder)
    session = load_for_inference(args.model, quantize=args.quantize, device=args.device)
    models = ModelServer(session, base_name=args.base_name or base_name(args.model), adapters=adapters,
                         template=args.template, source=args.model)
    try:
        return make_server(models, args.host, args.port, api_key=api_key,
                           limits=Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens))
    except OSError as err:
        raise UserError(f"cannot listen there: {err.strerror or err}", where=f"{args.host}:{args.port}") from None


def run(args: argparse.Namespace) -> int:
    server = build(args)
    host, port = server.server_address[:2]
    names = ", ".join(server.RequestHandlerClass.models.names())
    stderr_console().print(f"serving {names} on http://{host}:{port}/v1 (Ctrl-C stops)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
