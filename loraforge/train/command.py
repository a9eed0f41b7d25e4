"""``loraforge train [CONFIG.yaml] [key=value ...] [--resume] [--dry-run] [--nproc N]``.

With no config file it is the embedded demo (its settings as defaults under the overrides), unless
the overrides name another model or other data (``model=...``, ``data.train=...``): then it is the
user's run on the schema's defaults, without the demo's before/after quiz.

``--nproc N`` starts N processes on this machine through PyTorch's launcher,
``torch.distributed.run`` (what ``torchrun --standalone --nproc-per-node N -m loraforge train
...`` does), after checking the config and the data once here. For several machines use
torchrun itself (``--nnodes``, ``--rdzv-*``). A failed rank stops the others (torchrun's agent
does) and the command exits non-zero naming the rank.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from loraforge.errors import RunFailed, UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
        help="a YAML config (none: the embedded demo) and dotted overrides such as train.lr=1e-4",
    )
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint in output_dir")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, read and tokenize the data (tokenizer only, no weights), print "
                             "the resolved config, the data statistics and the first examples with their trained "
                             "spans marked, then exit")
    parser.add_argument("--show", type=int, default=3, metavar="N",
                        help="with --dry-run: how many examples to print (default 3)")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="train with N processes on this machine (torch.distributed.run; "
                             "train.distributed: ddp or fsdp)")


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
    from loraforge.train.config import load_config
    from loraforge.train.demo import demo_config, is_demo, run_demo

    demo = config_path is None and is_demo(overrides)
    if demo:
        config = demo_config(overrides)
    else:
        config = load_config(config_path, overrides)
    if args.dry_run:
        from loraforge.train.dry_run import dry_run

        dry_run(config, show=args.show)
        return 0
    if demo:
        if args.nproc is not None:
            raise UserError("--nproc trains a config of yours; the demo runs in one process", where="--nproc")
        return run_demo(config)
    from loraforge.train.loop import train

    if args.nproc is not None:
        return launch(args.nproc, config, [*args.items, *(["--resume"] if args.resume else [])])
    train(config)
    return 0


def launch(nproc: int, config, argv: list[str]) -> int:
    """Run ``loraforge train ARGV`` on ``nproc`` local processes via torch.distributed.run."""
    if nproc < 1:
        raise UserError(f"expected --nproc >= 1, got {nproc}", where="--nproc")
    if "WORLD_SIZE" in os.environ:
        raise UserError("this process was started by torchrun already; leave --nproc out", where="--nproc")
    from loraforge.train.loop import read_inputs

    read_inputs(config)  # bad data fails once, here, before any process starts
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "loraforge", "train", *argv])
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
        raise RunFailed(f"rank {rank} of {nproc} failed ({how}); every rank was stopped") from None
    return 0
