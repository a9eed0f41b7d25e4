"""Loss normalisation under gradient accumulation: the step's summed token loss divided by the
step's trained-token count, so 8 x 1 and 1 x 8 (and 2 x 4) give the same gradient and update."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from loraforge.data import collate
from loraforge.train.loop import accumulate_gradients, clip_gradients


def examples(n: int = 8, vocab: int = 128, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + 3 * i  # very different lengths: per-micro-batch means would weight them wrongly
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = 2 + i % 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def one_step(model_factory, data, batch_size: int):
    model = model_factory(seed=1)
    for p in model.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters()]
    # eps 1e-4: with the default 1e-8, AdamW's first step is lr * sign(g) even for g ~ 1e-9, which
    # turns float rounding in a near-zero gradient into a full-size difference
    opt = torch.optim.AdamW(params, lr=1e-2, eps=1e-4)
    micro = [collate(data[i : i + batch_size], pad_id=0) for i in range(0, len(data), batch_size)]
    loss, trained = accumulate_gradients(model, micro, contextlib.nullcontext())
    grads = [p.grad.clone() for p in params]
    norm = clip_gradients(params, 1.0)
    opt.step()
    return loss, trained, grads, norm, [p.detach().clone() for p in params]


def reference_loss_and_grads(model_factory, data):
    """Mean next-token loss over every trained token of the step, each example run alone."""
    model = model_factory(seed=1)
    logits, labels = [], []
    for ex in data:
        out = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
        logits.append(out)
        labels.append(torch.tensor(ex["labels"][1:]))
    loss = F.cross_entropy(torch.cat(logits), torch.cat(labels), ignore_index=-100)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_8x1_equals_1x8_equals_reference(tiny_llama):
    data = examples()
    results = {bs: one_step(tiny_llama, data, bs) for bs in (8, 1, 4)}
    ref_loss, ref_grads = reference_loss_and_grads(tiny_llama, data)
    trained = sum(sum(t != -100 for t in ex["labels"][1:]) for ex in data)
    for bs, (loss, n, grads, norm, params) in results.items():
        assert n == trained
        assert abs(loss - ref_loss) < 1e-5, bs
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    _, _, _, norm8, params8 = results[8]
    _, _, _, norm1, params1 = results[1]
    assert abs(norm8 - norm1) < 1e-5 * max(1.0, norm8)
    for a, b in zip(params8, params1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_per_micro_batch_mean_would_differ(tiny_llama):
    """Sensitivity check: averaging each micro-batch's own mean (the classic bug) changes the
    gradient on this data, so the equality above is not vacuous."""
    data = examples()
    model = tiny_llama(seed=1)
    for ex in data:
        out = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
        loss = F.cross_entropy(out, torch.tensor(ex["labels"][1:]), ignore_index=-100) / len(data)
        loss.backward()
    _, ref_grads = reference_loss_and_grads(tiny_llama, data)
    wrong = [p.grad for p in model.parameters()]
    assert max((w - r).abs().max().item() for w, r in zip(wrong, ref_grads)) > 1e-4


def test_clip_gradients_zero_disables(tiny_llama):
    model = tiny_llama(seed=1)
    batch = collate(examples(2), pad_id=0)
    accumulate_gradients(model, [batch], contextlib.nullcontext())
    params = list(model.parameters())
    before = [p.grad.clone() for p in params]
    norm = clip_gradients(params, 0.0)
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in before]))
    assert abs(norm - expected.item()) < 1e-4 * expected.item()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))
    clip_gradients(params, norm / 2)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert abs(total.item() - norm / 2) < 1e-3 * norm
