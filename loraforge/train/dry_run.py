"""``loraforge train CONFIG --dry-run``: everything a run checks before it spends time, and what it
would train on, without loading model weights.

It validates the config (already done by loading it), checks that ``output_dir`` can be written,
reads and tokenizes the data with the model's tokenizer alone (a GGUF file's from its metadata),
and prints the resolved config, the data statistics (rows kept and dropped and why, tokens,
trained tokens), the optimizer steps it would run, the base's weight memory once loaded and
quantized (:func:`loraforge.models.memory.estimate_base_memory`, from the model config on a
meta-device skeleton) and the first ``show`` examples with their
trained spans marked: reverse video on a terminal, ``[[...]]`` around them otherwise. This is where
a user sees their masking before a long run.
"""

from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.text import Text

from loraforge.train import build
from loraforge.train.batches import total_steps
from loraforge.train.config import Config, dump_yaml
from loraforge.train.distributed import World, device_of
from loraforge.train.outputs import check_output_dir
from loraforge.train.precision import decide_precision

IGNORE = -100
OPEN, CLOSE = "[[", "]]"


def dry_run(config: Config, *, show: int = 3, console: Console | None = None) -> dict:
    """Print what ``train(config)`` would do; returns the numbers it printed (for tests)."""
    from loraforge import models

    console = console or Console(highlight=False, soft_wrap=True)
    check_output_dir(config)
    train_records, eval_records = build.read_records(config)
    choice_items = build.read_choice_items(config)
    tokenizer = models.load_tokenizer_for(config.model)
    train_set, stats = build.tokenize(train_records, tokenizer, config, source=str(config.data.train),
                                      pack=False)
    eval_stats = None
    if eval_records:
        _, eval_stats = build.tokenize(eval_records, tokenizer, config,
                                       source=str(config.data.eval or config.data.train), pack=False)
    t = config.train
    rows = len(build.pack_examples(train_set, config)) if config.data.packing else len(train_set)
    steps = total_steps(rows, t.batch_size, t.grad_accum, t.steps, t.epochs)

    console.rule("resolved config")
    console.print(dump_yaml(config).rstrip(), markup=False)
    console.rule("data")
    console.print(stats.summary(), markup=False)
    if eval_stats is not None:
        console.print(eval_stats.summary(), markup=False)
    if choice_items:
        console.print(f"{config.data.eval_choice}: {len(choice_items)} multiple-choice rows (choice accuracy at "
                      "each evaluation)", markup=False)
    if config.data.packing:
        console.print(f"packing: {len(train_set)} examples -> {rows} rows of up to {config.data.max_length} tokens",
                      markup=False)
    console.print(f"steps: {steps} optimizer steps of {t.batch_size} x {t.grad_accum} "
                  f"{'rows' if config.data.packing else 'examples'}", markup=False)
    quantization = None if config.quantization is None else dataclasses.asdict(config.quantization)
    precision = decide_precision(t.dtype, device_of(World()))
    console.print(f"precision: {precision.describe()}", markup=False)
    weights = models.estimate_base_memory(config.model, quantization,
                                          precision.base_dtype(trains_base=config.adapter.method == "full"))
    console.print(f"base weights (estimated from the model config, none loaded): {weights}", markup=False)
    n = min(show, len(train_set))
    mark = "reverse video" if console.is_terminal else f"{OPEN}...{CLOSE}"
    console.rule(f"first {n} example{'s' if n != 1 else ''} (trained tokens in {mark})")
    for i, example in enumerate(train_set[:n]):
        console.print(f"example {i + 1}: {len(example['input_ids'])} tokens, "
                      f"{sum(y != IGNORE for y in example['labels'])} trained", style="bold", markup=False)
        console.print(marked_text(example, tokenizer, terminal=console.is_terminal))
    console.rule("dry run: nothing was trained or written")
    return {"steps": steps, "examples": len(train_set), "stats": stats, "shown": train_set[:n], "weights": weights}


def trained_spans(example: dict) -> list[tuple[list[int], bool]]:
    """The example's token ids in runs of equal trained flag.

    A label ``labels[j] != -100`` means token ``j`` is a target (the loss at position j-1 predicts
    it), so the flag of token j is ``labels[j] != -100``."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example["input_ids"], example["labels"]):
        trained = label != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return runs


def marked_text(example: dict, tokenizer, *, terminal: bool) -> Text:
    """The decoded example with its trained runs in reverse video (terminal) or ``[[...]]``."""
    text = Text()
    for ids, trained in trained_spans(example):
        piece = tokenizer.decode(ids, skip_special_tokens=False)
        if not trained:
            text.append(piece)
        elif terminal:
            text.append(piece, style="reverse")
        else:
            text.append(f"{OPEN}{piece}{CLOSE}")
    return text
