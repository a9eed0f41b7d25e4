"""The processes of one run, on torch.distributed: who we are (rank, world size), the process
group, and how the adapter model is wrapped for data parallelism.

Launch with PyTorch's own launcher, ``torchrun --nproc-per-node N -m loraforge train CONFIG``
(``--nnodes`` / ``--rdzv-*`` for several machines), or ``loraforge train CONFIG --nproc N``,
which starts the same thing through ``torch.distributed.run``. torchrun sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is one process (world size 1), which is
the same code path with every collective an identity.

Modes (``train.distributed``, default ``ddp`` when the world size is > 1):

- ``ddp``: ``DistributedDataParallel`` over the adapter model; the adapters are replicated, their
  gradients all-reduced (averaged) in the last micro-batch's backward (``no_sync`` before it).
- ``fsdp``: FSDP2, ``fully_shard`` per decoder layer and at the root, the frozen 4-bit base
  sharded too (see :mod:`loraforge.train.fsdp`); gradients are reduce-scattered (averaged) in the
  last micro-batch's backward.

Both average gradients over ranks, so the loop multiplies each micro-batch's loss by the world
size and divides by the trained tokens of the whole global step (all-reduced before the first
backward): N processes then compute the update one process computes on the same global batch.

The backend is NCCL on CUDA and gloo on CPU. Collectives time out after ``TIMEOUT`` so that a
lost peer ends the others even without torchrun's agent (which already stops every worker as
soon as one exits non-zero).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

MODES = ("ddp", "fsdp")
FSDP_METHODS = ("lora", "dora")  # AdaLoRA's allocator and SoRA's gate step need whole tensors
# why a method is not trained under fsdp (the default reason: its step between optimizer steps)
FSDP_REFUSALS = {
    "full": "full fine-tuning saves its model and checkpoints from the whole, unsharded model",
    "bottleneck": "bottleneck adapters have not been set up for sharding",
    "prefix": "prefix tuning's prefix has not been set up for sharding",
}
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place in the run; ``World()`` is one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mode: str = "single"  # single | ddp | fsdp
    owns_group: bool = False  # we created the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=collective_device(self))
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def launched_world_size() -> int:
    """The world size torchrun gave this process (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_mode(requested: str | None, world_size: int) -> str:
    if world_size == 1:
        return "single"
    return requested or "ddp"


def start(requested_mode: str | None) -> World:
    """Join the process group torchrun describes (one process: nothing to join)."""
    size = launched_world_size()
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    return World(rank=rank, size=size, local_rank=local_rank, mode=resolve_mode(requested_mode, size),
                 owns_group=owns)


def stop(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def device_of(world: World) -> torch.device:
    """This rank's GPU (``LOCAL_RANK``) when there is one, else the CPU."""
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def collective_device(world: World) -> torch.device:
    return device_of(world) if torch.cuda.is_available() else torch.device("cpu")


def wrap(adapter_model: torch.nn.Module, world: World) -> torch.nn.Module:
    """What the loop runs forward and backward through: the adapter model itself (one process),
    ``DistributedDataParallel`` of it (ddp), or it sharded in place by FSDP2 (fsdp)."""
    if world.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = device_of(world)
        return DistributedDataParallel(adapter_model, device_ids=[device.index] if device.type == "cuda" else None)
    if world.mode == "fsdp":
        from loraforge.train.fsdp import shard

        return shard(adapter_model, device_of(world))
    return adapter_model


def gradient_sync(engine: torch.nn.Module, world: World, enabled: bool):
    """A context in which the backward all-reduces (ddp) or reduce-scatters (fsdp) the gradients
    only when ``enabled`` (the step's last micro-batch); one process: nothing to do."""
    if world.mode == "ddp":
        return contextlib.nullcontext() if enabled else engine.no_sync()
    if world.mode == "fsdp":
        engine.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor gathered whole on every rank; others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
