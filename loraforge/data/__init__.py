"""Data: files -> rows -> conversations or segments -> token ids + labels -> packed, collated batches.

    records.py    read .json / .jsonl / .parquet / .txt into rows that remember file and line
    formats.py    alpaca, input_output, sharegpt, messages -> messages; segments, text -> segments
    templates.py  chat templates (the tokenizer's own, chatml, alpaca, llama3, plain) -> segments
    tokens.py     segments -> input_ids + labels, piece by piece (-100 = not trained)
    dataset.py    build_dataset: all of the above, truncation, dropped rows, stats
    packing.py    several rows per sequence, positions restarting, no labels across rows
    collate.py    padded tensors; a block-diagonal causal mask for packed rows
    prompts.py    inference prompts rendered exactly as in training
"""

from loraforge.data.collate import block_causal_mask, collate
from loraforge.data.dataset import DataStats, build_dataset
from loraforge.data.formats import FORMATS, Message, Segment, detect_format
from loraforge.data.packing import pack
from loraforge.data.prompts import encode_prompt, render_prompt
from loraforge.data.records import Record, load_records
from loraforge.data.templates import TEMPLATES, get_template
from loraforge.data.tokens import IGNORE

__all__ = [
    "FORMATS", "IGNORE", "TEMPLATES", "DataStats", "Message", "Record", "Segment",
    "block_causal_mask", "build_dataset", "collate", "detect_format", "encode_prompt",
    "get_template", "load_records", "pack", "render_prompt",
]
