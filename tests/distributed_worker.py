"""One rank of the multi-process tests (started by torchrun from test_train_distributed.py):
joins the gloo process group once, then trains each (name, overrides, resume_from) of the JSON
file given; ``resume_from`` (a checkpoint folder or null) is copied into the run's output_dir
by rank 0 first, so the run resumes from it."""

import io
import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from rich.console import Console

from loraforge.train import load_config, train

dist.init_process_group("gloo")
for name, overrides, resume_from in json.loads(open(sys.argv[1], encoding="utf-8").read()):
    quiet = dist.get_rank() != 0
    config = load_config(None, overrides)
    if resume_from and not quiet:
        shutil.copytree(resume_from, Path(config.output_dir) / "checkpoints" / Path(resume_from).name)
    dist.barrier()
    print(f"== {name}", flush=True) if not quiet else None
    train(config, console=Console(file=io.StringIO()) if quiet else None)
dist.destroy_process_group()
