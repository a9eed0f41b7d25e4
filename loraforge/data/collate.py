"""Batching: examples -> padded tensors ready for ``model(**batch)``.

Plain examples: ``input_ids`` right-padded with ``pad_id``, ``labels`` with -100 and a 2-D
``attention_mask`` (1 = token, 0 = padding).

Packed examples (they carry ``position_ids``, see ``packing.py``): ``position_ids`` and a 4-D
additive ``attention_mask`` of shape ``[batch, 1, length, length]``: 0 where query i may attend key
j (same row and j <= i), the dtype's most negative value elsewhere. transformers (4.56+ and 5.x)
passes a 4-D mask through untouched to the attention function, where both ``eager`` (adds it to
the scores) and ``sdpa`` (``attn_mask``) apply it, so every row is computed exactly as if alone.

Why not the alternatives transformers offers: with ``position_ids`` and no mask, transformers
detects packing only when no KV cache exists; any forward with ``use_cache=True`` (the config
default, e.g. training without gradient checkpointing, or evaluation) silently attends across
rows. A boolean 4-D mask works with ``sdpa`` but ``eager`` adds it as numbers (1/0), which masks
nothing. The additive float mask is right for both. (flash-attention kernels take no 4-D mask.)
Pass ``mask_dtype`` = the attention's compute dtype (e.g. ``torch.bfloat16``) on GPU.

Padding inside a packed batch forms its own block, so no query row is fully masked (no NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraforge.data.tokens import IGNORE


def collate(batch: Sequence[dict], pad_id: int, *, mask_dtype: torch.dtype = torch.float32) -> dict:
    """A dict of tensors for ``model(**batch)`` (see module docstring)."""
    if pad_id is None:
        raise ValueError("collate needs a pad_id (use the tokenizer's pad or eos token id)")
    length = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), length), int(pad_id), dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    for b, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(ex["labels"], dtype=torch.long)
    if not any("position_ids" in ex for ex in batch):
        lengths = torch.tensor([len(ex["input_ids"]) for ex in batch])
        attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    position_ids = torch.stack([_positions(ex, length) for ex in batch])
    return {
        "input_ids": input_ids,
        "attention_mask": block_causal_mask(position_ids, mask_dtype),
        "position_ids": position_ids,
        "labels": labels,
    }


def _positions(ex: dict, length: int) -> torch.Tensor:
    """The example's position ids (0.. if it has none), padding as one more row starting at 0."""
    n = len(ex["input_ids"])
    own = ex.get("position_ids", range(n))
    return torch.tensor([*own, *range(length - n)], dtype=torch.long)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask ``[B, 1, L, L]``: causal within each row of a packed sequence, blocked across.
    A row starts wherever the position id is 0."""
    row = (position_ids == 0).cumsum(-1)  # [B, L]: which packed row each token belongs to
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (row[:, :, None] == row[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
