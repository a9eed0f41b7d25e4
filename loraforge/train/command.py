"""``loraforge train [CONFIG.yaml] [key=value ...] [--resume]``; with no config, the embedded demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from loraforge.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
        help="a YAML config (none: the embedded demo) and dotted overrides such as train.lr=1e-4",
    )
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint in output_dir")


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """(config path or None, overrides): the first item is the config unless it is key=value."""
    if items and ("=" not in items[0] or Path(items[0]).is_file()):
        config, overrides = items[0], items[1:]
    else:
        config, overrides = None, list(items)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"expected key=value after the config file, got {item!r}", where="command line")
    return config, overrides


def run(args: argparse.Namespace) -> int:
    config_path, overrides = split_items(args.items)
    if args.resume:
        overrides.append("resume=true")
    if config_path is None:
        from loraforge.train.demo import run_demo

        return run_demo(overrides)
    from loraforge.train.config import load_config
    from loraforge.train.loop import train

    train(load_config(config_path, overrides))
    return 0
