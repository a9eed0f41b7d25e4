"""Which examples each optimizer step sees, as a pure function of (seed, epoch, index).

Epoch e visits the examples in the order ``randperm(n)`` drawn from a generator seeded with
``seed + e`` (independent of the global RNG, so resuming needs only the position). An optimizer
step takes the next ``batch_size * grad_accum`` examples of that order, cut into ``grad_accum``
micro-batches of ``batch_size``; the last step of an epoch may be shorter, and the next step
starts the next epoch. Hence ``steps_per_epoch = ceil(n / (batch_size * grad_accum))``.

With ``world_size`` processes the step takes ``batch_size * grad_accum * world_size`` examples
(the global batch), cut into micro-batches of ``batch_size * world_size``; rank r trains on the
r-th slice of ``batch_size`` of each. Micro-batch k of N processes thus holds exactly the
examples of micro-batch k of one process with ``batch_size * world_size``, and every rank runs
the same number of micro-batches (in a short last step a rank's slice may be empty; the loop
then runs a zero-weight pass so that the collectives still line up).
"""

from __future__ import annotations

import math

import torch

from loraforge.train.checkpoint import Position


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


def steps_per_epoch(n: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    return math.ceil(n / (batch_size * grad_accum * world_size))


def total_steps(n: int, batch_size: int, grad_accum: int, steps: int | None, epochs: int | None,
                world_size: int = 1) -> int:
    if steps is not None:
        return steps
    return (epochs or 1) * steps_per_epoch(n, batch_size, grad_accum, world_size)


class StepSampler:
    """Yields this rank's micro-batches (lists of example indices) of successive optimizer steps."""

    def __init__(self, n: int, *, batch_size: int, grad_accum: int, seed: int, position: Position,
                 world_size: int = 1, rank: int = 0):
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed
        self.world_size, self.rank = world_size, rank
        self.position = position
        self._order = epoch_order(n, seed, position.epoch)

    def next_step(self) -> list[list[int]]:
        p = self.position
        width = self.batch_size * self.world_size  # one micro-batch over all ranks
        take = self._order[p.index : p.index + width * self.grad_accum]
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        micro = [take[i : i + width][mine] for i in range(0, len(take), width)]
        index = p.index + len(take)
        if index >= self.n:
            self.position = Position(step=p.step + 1, epoch=p.epoch + 1, index=0)
            self._order = epoch_order(self.n, self.seed, p.epoch + 1)
        else:
            self.position = Position(step=p.step + 1, epoch=p.epoch, index=index)
        return micro
