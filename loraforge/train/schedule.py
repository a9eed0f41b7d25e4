"""Learning-rate schedules: linear warm-up, then constant, linear decay or cosine decay.

For optimizer step s (0-based: the multiplier applied to the update of step s + 1), warm-up W and
total T steps, the multiplier of the base learning rate is

    warm-up (s < W):   (s + 1) / (W + 1)   # never 0, so the first update is not wasted
    constant:          1
    linear:            (T - s) / (T - W)                     # 1 at s = W, 1/(T-W) at the last step
    cosine:            0.5 * (1 + cos(pi * (s - W) / (T - W)))  # 1 at s = W, towards 0 at s = T

Hugging Face's schedulers use s / W during warm-up, which makes the first update zero; here the
first step already moves (torchtune does the same). Decays reach 0 only after the last step.
"""

from __future__ import annotations

import math

from loraforge.train.config import SCHEDULES


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The factor on the base learning rate for the update of 0-based step ``step``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, *, schedule: str, warmup_steps: int, total_steps: int):
    """A LambdaLR over :func:`lr_multiplier` (its state_dict is what checkpoints store)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps
        ),
    )
