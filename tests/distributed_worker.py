"""One rank of the multi-process tests (started by torchrun from test_train_distributed.py):
joins the gloo process group once, then trains each (name, overrides) of the JSON file given."""

import io
import json
import sys

import torch.distributed as dist
from rich.console import Console

from loraforge.train import load_config, train

dist.init_process_group("gloo")
for name, overrides in json.loads(open(sys.argv[1], encoding="utf-8").read()):
    quiet = dist.get_rank() != 0
    print(f"== {name}", flush=True) if not quiet else None
    train(load_config(None, overrides), console=Console(file=io.StringIO()) if quiet else None)
dist.destroy_process_group()
