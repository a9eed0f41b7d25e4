"""Training: the config (schema, YAML, overrides, did-you-mean), the loop, checkpoints that resume
exactly, logging (console, JSONL, loss plot) and the embedded demo.

    from loraforge.train import load_config, train
    result = train(load_config("run.yaml", ["train.lr=1e-4"]))

config.py     YAML + ``key=value`` overrides -> validated dataclasses (UserError with file:line)
build.py      config -> base model, adapter config, tokenized data (via models / adapters / data)
batches.py    which examples each optimizer step sees (a function of seed, epoch, index)
schedule.py   constant / linear / cosine with warm-up
optimizers.py ``train.optimizer`` -> an optimizer (loraforge.optim)
loop.py       the recipe, top to bottom: setup -> fit -> save over a Run state
distributed.py the processes of a run (torchrun, torch.distributed): rank, world, ddp / fsdp wrapping
fsdp.py       FSDP2 sharding per decoder layer, the 4-bit base included
checkpoint.py atomic checkpoints, exact resume
logging.py    banner, progress, eval lines, JSONL, loss-curve PNG, TensorBoard
summary.py    banner rows, closing summary, model card
demo.py       the embedded demo (``loraforge train`` with no arguments)
command.py    ``loraforge train [CONFIG.yaml] [key=value ...] [--resume] [--nproc N]``
"""

from loraforge.train.config import Config, load_config
from loraforge.train.loop import TrainResult, train

__all__ = ["Config", "TrainResult", "load_config", "train"]
