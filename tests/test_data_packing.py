"""Packing and collation: rows keep their tokens, positions restart, no label crosses a row
boundary, and a packed forward of a tiny random Llama gives exactly the logits (and the loss) of
running each row alone, with sdpa and eager attention, with and without a KV cache in play."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from loraforge.data import collate, pack


def random_examples(n, lo, hi, vocab=128, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]
        k = rng.randint(1, len(ids) - 1)  # a prompt of k tokens, then the trained response
        out.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
    return out


def split_rows(packed):
    """The rows of a packed example, cut where position ids restart."""
    starts = [i for i, p in enumerate(packed["position_ids"]) if p == 0] + [len(packed["input_ids"])]
    return [(packed["input_ids"][a:b], packed["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def test_pack_keeps_every_row_and_cuts_labels_at_boundaries():
    examples = random_examples(200, 2, 60)
    packed = pack(examples, 128)
    assert all(len(p["input_ids"]) <= 128 for p in packed)
    rows = [r for p in packed for r in split_rows(p)]
    want = sorted((e["input_ids"], [-100] + e["labels"][1:]) for e in examples)
    assert sorted(rows) == want
    for p in packed:
        assert p["position_ids"] == [j for ids, _ in split_rows(p) for j in range(len(ids))]
    used = sum(len(e["input_ids"]) for e in examples) / (len(packed) * 128)
    assert used > 0.95  # best-fit decreasing leaves little room on small rows


def test_pack_rejects_rows_longer_than_max_length():
    with pytest.raises(ValueError, match="cannot be packed"):
        pack([{"input_ids": [1] * 9, "labels": [1] * 9}], 8)


def test_collate_plain_rows():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch


def test_collate_packed_rows_builds_a_block_causal_mask():
    ex = {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "position_ids": [0, 1, 0, 1]}
    batch = collate([ex, {"input_ids": [9], "labels": [-100], "position_ids": [0]}], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 0, 1, 2]]
    allowed = (batch["attention_mask"][:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert allowed[1] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]  # padding: its own block
    assert batch["attention_mask"].dtype == torch.float32
    assert batch["attention_mask"].min() == torch.finfo(torch.float32).min


def row_loss_sum(logits, labels):
    """Sum of next-token cross-entropies over trained labels (the model's own shift)."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_separate_rows(tiny_llama, attn):
    model = tiny_llama(attn_implementation=attn)
    examples = random_examples(7, 3, 20, seed=1)
    packed = pack(examples, 32)
    assert len(packed) >= 2 and max(len(split_rows(p)) for p in packed) >= 2
    batch = collate(packed, pad_id=0)
    with torch.no_grad():
        separate = {tuple(e["input_ids"]): model(torch.tensor([e["input_ids"]])).logits[0] for e in examples}
        for use_cache in (True, False):  # the 4-D mask isolates rows whether or not a cache exists
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=use_cache).logits
            for b, p in enumerate(packed):
                start = 0
                for ids, _ in split_rows(p):
                    got = logits[b, start:start + len(ids)]
                    torch.testing.assert_close(got, separate[tuple(ids)], atol=1e-5, rtol=1e-5)
                    start += len(ids)
        # the loss over the packed batch is the sum of the rows' own losses: no label crosses a boundary
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        packed_sum = sum(row_loss_sum(logits[b], batch["labels"][b]) for b in range(len(packed)))
        alone_sum = sum(row_loss_sum(separate[tuple(e["input_ids"])], torch.tensor(e["labels"])) for e in examples)
        torch.testing.assert_close(packed_sum, alone_sum, atol=1e-4, rtol=1e-5)
        # and the model's own loss (mean over trained tokens) agrees with the reference
        n_trained = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
        torch.testing.assert_close(model(**batch).loss, alone_sum / n_trained, atol=1e-5, rtol=1e-5)


def test_without_the_block_mask_rows_would_leak(tiny_llama):
    """Control: the same packed tokens with only a padding mask (what a naive collator gives)
    attend across rows and change the second row's logits, so the test above can fail."""
    model = tiny_llama()
    a, b = random_examples(2, 6, 10, seed=2)
    joined = {"input_ids": a["input_ids"] + b["input_ids"], "labels": a["labels"] + b["labels"]}
    with torch.no_grad():
        leaky = model(**{k: v for k, v in collate([joined], 0).items() if k != "labels"}).logits[0]
        alone = model(torch.tensor([b["input_ids"]])).logits[0]
    assert (leaky[len(a["input_ids"]):] - alone).abs().max() > 1e-2


def test_padded_plain_batch_equals_separate_rows(tiny_llama):
    model = tiny_llama()
    examples = random_examples(3, 4, 12, seed=3)
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, e in enumerate(examples):
            alone = model(torch.tensor([e["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[i, :len(e["input_ids"])], alone, atol=1e-5, rtol=1e-5)
