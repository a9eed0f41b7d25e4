"""Learning-rate schedules: warm-up, then the decays of transformers' schedulers."""

from __future__ import annotations

import math

import pytest
import torch

from loraforge.train.schedule import build_scheduler, lr_multiplier


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_then_decay_match_transformers(schedule):
    from transformers import get_constant_schedule, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    total, warm = 20, 4
    p = torch.nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([p], lr=1.0)
    ref = {"constant": lambda o: get_constant_schedule(o),
           "linear": lambda o: get_linear_schedule_with_warmup(o, warm, total),
           "cosine": lambda o: get_cosine_schedule_with_warmup(o, warm, total)}[schedule](ref_opt)
    ours_opt = torch.optim.SGD([p], lr=1.0)
    ours = build_scheduler(ours_opt, schedule=schedule, warmup_steps=warm, total_steps=total)
    for step in range(total):
        got = ours.get_last_lr()[0]
        assert got == pytest.approx(lr_multiplier(step, schedule=schedule, warmup_steps=warm, total_steps=total))
        if step < warm:  # our warm-up never starts at 0: (s + 1) / (W + 1)
            assert got == pytest.approx((step + 1) / (warm + 1))
        else:
            assert got == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        ours_opt.step(); ours.step(); ref_opt.step(); ref.step()


def test_known_values():
    assert lr_multiplier(0, schedule="cosine", warmup_steps=0, total_steps=10) == 1.0
    assert lr_multiplier(5, schedule="cosine", warmup_steps=0, total_steps=10) == pytest.approx(0.5)
    assert lr_multiplier(9, schedule="linear", warmup_steps=0, total_steps=10) == pytest.approx(0.1)
    assert lr_multiplier(7, schedule="cosine", warmup_steps=2, total_steps=12) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(0, schedule="constant", warmup_steps=3, total_steps=10) == pytest.approx(0.25)
