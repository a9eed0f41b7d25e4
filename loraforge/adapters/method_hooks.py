"""What a training loop must call for methods that act between steps (AdaLoRA, SoRA).

Plain LoRA needs nothing from the loop but ``loss.backward()`` and ``optimizer.step()``. Two
methods need more, and in PEFT the user has to remember to call it; in loraforge the loop asks
the adapter for its :class:`TrainingHooks` and drives them itself:

- AdaLoRA (``adalora.py``): an orthogonal regulariser added to the loss, and the rank allocator
  (importance EMA, budget schedule, masking) after the optimizer step, before ``zero_grad``
  (it reads the gradients);
- SoRA (``sora.py``): the proximal soft-threshold step on the gates after the optimizer step.

The loop, for one trainable adapter ``name`` and ``total_steps`` optimizer steps::

    hooks = training_hooks(adapter_model, name, total_steps)     # NoHooks for plain methods
    for step in 1..total_steps:
        data_loss.backward()                                      # all micro-batches
        extra = hooks.extra_loss()                                # once per optimizer step
        if extra is not None: extra.backward()                    # before clipping
        clip_grad_norm_(...); optimizer.step()
        logs = hooks.after_optimizer_step(step, lr)               # before zero_grad; lr used in step
        scheduler.step(); optimizer.zero_grad()
        log(..., **logs)                                          # e.g. budget, sparsity
    hooks.finish()                                                # final summary lines (list[str])

``state_dict()`` / ``load_state_dict()`` carry the hooks' own state (AdaLoRA's importance EMAs)
in a checkpoint so that a resumed run continues exactly.

``step`` counts optimizer steps from 1, so the last step of a run is ``total_steps``.
"""

from __future__ import annotations

from typing import Any

import torch


class TrainingHooks:
    """The per-step calls of a method; this base class does nothing (plain LoRA, DoRA, VeRA)."""

    def extra_loss(self) -> torch.Tensor | None:
        """A loss term to add once per optimizer step (already weighted), or None."""
        return None

    def after_optimizer_step(self, step: int, lr: float) -> dict[str, Any]:
        """Run after ``optimizer.step()`` and before ``zero_grad``; returns values to log."""
        return {}

    def finish(self) -> list[str]:
        """Lines summarising the method's state at the end of training (e.g. ranks kept)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def training_hooks(adapter_model, name: str = "default", total_steps: int | None = None) -> TrainingHooks:
    """The hooks of adapter ``name``: its config's ``training_hooks(adapter_model, name,
    total_steps)`` when the method defines one, else a :class:`TrainingHooks` that does nothing."""
    config = adapter_model.configs[name]
    make = getattr(config, "training_hooks", None)
    return make(adapter_model, name, total_steps) if make is not None else TrainingHooks()
