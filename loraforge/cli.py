"""The ``loraforge`` command: parses arguments, calls the package, maps errors to exit codes.

Exit status: 0 success, 2 bad input (one clear message, no traceback; ``--debug`` shows it;
under torchrun printed by rank 0 only), 1 anything else (a failed rank of a multi-process run:
one line naming it). Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported lazily so ``loraforge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from loraforge.errors import RunFailed, UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("loraforge.train.command", "fine-tune an adapter from a YAML config (none: the demo)"),
    "quantize": ("loraforge.models.quantize_command", "write a bitsandbytes-format 4-bit (nf4/fp4) or 8-bit (llm_int8) checkpoint"),
    "generate": ("loraforge.infer.generate_command", "generate replies for a prompt or a JSONL file of prompts"),
    "chat": ("loraforge.infer.chat_command", "chat with a model (and adapter) in the terminal"),
    "merge": ("loraforge.infer.merge_command", "merge an adapter into its base; write safetensors, nf4 or GGUF"),
    "eval": ("loraforge.infer.eval_command", "perplexity, accuracy or multiple-choice accuracy of a model (and adapter); --compare"),
    "serve": ("loraforge.infer.serve_command", "an OpenAI-compatible server: one base, many adapters picked per request"),
    "judge": ("loraforge.infer.judge_command", "a judged pairwise tournament of answer files: win/tie/loss and Elo"),
    "webui": ("loraforge.webui.command", "a web UI (Gradio): configure, train, watch, chat and export in the browser"),
    "env": ("loraforge.environment", "versions, device, threads and cache: the facts a bug report needs"),
}


def version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("loraforge")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraforge", description="Fine-tune LLMs cheaply: LoRA family on 4-bit bases."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"loraforge {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # positional items after an option (``train run.yaml --dry-run train.lr=1e-4``) belong to them
    if extra and isinstance(getattr(args, "items", None), list) and not any(e.startswith("-") for e in extra):
        args.items += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as err:
        if getattr(args, "debug", False):
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank sees it: say it once
            print(f"loraforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"loraforge {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"loraforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
