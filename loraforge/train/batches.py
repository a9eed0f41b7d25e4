"""Which examples each optimizer step sees, as a pure function of (seed, epoch, index).

Epoch e visits the examples in the order ``randperm(n)`` drawn from a generator seeded with
``seed + e`` (independent of the global RNG, so resuming needs only the position). An optimizer
step takes the next ``batch_size * grad_accum`` examples of that order, cut into ``grad_accum``
micro-batches of ``batch_size``; the last step of an epoch may be shorter, and the next step
starts the next epoch. Hence ``steps_per_epoch = ceil(n / (batch_size * grad_accum))``.
"""

from __future__ import annotations

import math

import torch

from loraforge.train.checkpoint import Position


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


def steps_per_epoch(n: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(n / (batch_size * grad_accum))


def total_steps(n: int, batch_size: int, grad_accum: int, steps: int | None, epochs: int | None) -> int:
    if steps is not None:
        return steps
    return (epochs or 1) * steps_per_epoch(n, batch_size, grad_accum)


class StepSampler:
    """Yields the micro-batches (lists of example indices) of successive optimizer steps."""

    def __init__(self, n: int, *, batch_size: int, grad_accum: int, seed: int, position: Position):
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed
        self.position = position
        self._order = epoch_order(n, seed, position.epoch)

    def next_step(self) -> list[list[int]]:
        p = self.position
        take = self._order[p.index : p.index + self.batch_size * self.grad_accum]
        micro = [take[i : i + self.batch_size] for i in range(0, len(take), self.batch_size)]
        index = p.index + len(take)
        if index >= self.n:
            self.position = Position(step=p.step + 1, epoch=p.epoch + 1, index=0)
            self._order = epoch_order(self.n, self.seed, p.epoch + 1)
        else:
            self.position = Position(step=p.step + 1, epoch=p.epoch, index=index)
        return micro
