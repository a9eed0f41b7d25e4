"""The data order: every example once per epoch, steps cut into micro-batches, and a sampler
rebuilt from a saved position continuing the very same stream."""

from __future__ import annotations

from loraforge.train.batches import StepSampler, steps_per_epoch, total_steps
from loraforge.train.checkpoint import Position


def test_each_epoch_visits_every_example_once_in_a_new_order():
    n, bs, acc = 23, 3, 2
    sampler = StepSampler(n, batch_size=bs, grad_accum=acc, seed=5, position=Position(0, 0, 0))
    per_epoch = steps_per_epoch(n, bs, acc)
    assert per_epoch == 4 and total_steps(n, bs, acc, None, 3) == 12 and total_steps(n, bs, acc, 7, None) == 7
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(per_epoch):
            micro = sampler.next_step()
            assert all(len(m) <= bs for m in micro) and len(micro) <= acc
            seen += [i for m in micro for i in m]
        assert sorted(seen) == list(range(n))
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    assert sampler.position == Position(step=8, epoch=2, index=0)


def test_a_sampler_rebuilt_from_its_position_continues_identically():
    a = StepSampler(10, batch_size=2, grad_accum=2, seed=0, position=Position(0, 0, 0))
    for _ in range(4):
        a.next_step()
    b = StepSampler(10, batch_size=2, grad_accum=2, seed=0, position=a.position)
    assert [a.next_step() for _ in range(6)] == [b.next_step() for _ in range(6)]
