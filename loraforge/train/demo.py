"""The embedded demo: QLoRA (NF4) on SmolLM2-135M-Instruct teaches it a new name and maker.

``loraforge/data/demo/`` ships ``demo.yaml`` (the config), ``identity.jsonl`` (100 short
conversations: who it is, who made it, plus a few ordinary questions so it stays itself) and
``heldout.jsonl`` (12 paraphrases never trained on, each with the keyword(s) a correct answer
contains). The held-out questions are answered greedily before training and after it, and both
are printed with a success count.

Generation runs with the adapter merged (``AdapterModel.merge``: each 4-bit layer becomes a dense
layer holding W + s B A, restored exactly by ``unmerge``), because a 4-bit layer dequantizes its
whole weight at every decoding step. Before training B = 0, so the merged model is the base model.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from loraforge.train.config import Config, load_config

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"
DEMO_CONFIG = DEMO_DIR / "demo.yaml"
HELDOUT = DEMO_DIR / "heldout.jsonl"


# Overrides that make a run the user's own rather than the demo: another model or other data.
NOT_THE_DEMO = ("model", "data.train", "data.eval")


def is_demo(overrides: list[str]) -> bool:
    """``loraforge train`` with no config is the demo unless the overrides name another model or
    other data: then it is the user's run on the schema's defaults (no identity quiz)."""
    keys = [item.partition("=")[0].strip() for item in overrides]
    return not any(k == name or k.startswith(name + ".") for k in keys for name in NOT_THE_DEMO)


def demo_config(overrides: list[str] = ()) -> Config:
    """The demo config: its data paths resolve against the demo folder, its output folder
    (``runs/demo``) against the current directory. Its keys are defaults the user did not write,
    so a method switch on the command line (``adapter.method=vera``) is never blocked by them."""
    return load_config(DEMO_CONFIG, ["output_dir=runs/demo", *overrides], user_file=False)


def heldout_rows(path: Path = HELDOUT) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextlib.contextmanager
def merged(model):
    """The adapter folded into dense weights for the duration of the block; a model without a
    merge rule (bottleneck adapters, a fully fine-tuned model) runs as it is."""
    if not getattr(model, "mergeable", lambda: False)():
        yield model
        return
    model.merge()
    try:
        yield model
    finally:
        model.unmerge()


def encode(messages: list[dict], tokenizer, template: str) -> list[int]:
    """Prompt token ids ending with the assistant header, encoded exactly as in training."""
    from loraforge import data

    return data.encode_prompt(messages, tokenizer, template)


@torch.no_grad()
def answer(model, tokenizer, rows: list[dict], template: str = "auto", max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to every row's ``messages``, in one left-padded batch (the generation path of
    ``loraforge generate``, stopping at the tokenizer's EOS)."""
    from loraforge.infer.generate import GenerationSettings, generate_ids

    prompts = [encode(r["messages"], tokenizer, template) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    was_training = model.training
    model.eval()
    try:
        out = generate_ids(model, prompts, GenerationSettings(max_new_tokens=max_new_tokens), stop_ids=stops, pad_id=pad)
    finally:
        model.train(was_training)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


def score(rows: list[dict], answers: list[str]) -> list[bool]:
    """A held-out answer is right when it contains every expected keyword (case-insensitive)."""
    return [all(k.lower() in a.lower() for k in r["expect"]) for r, a in zip(rows, answers)]


def show(console: Console, title: str, rows: list[dict], answers: list[str]) -> int:
    ok = score(rows, answers)
    table = Table(title=f"{title}: {sum(ok)}/{len(ok)} held-out answers right", title_justify="left")
    table.add_column("")
    table.add_column("question")
    table.add_column("answer")
    for r, a, good in zip(rows, answers, ok):
        table.add_row("[green]ok[/]" if good else "[red]--[/]", r["messages"][-1]["content"], a.replace("\n", " ")[:90])
    console.print(table)
    return sum(ok)


def run_demo(config: Config | None = None, console: Console | None = None) -> int:
    """Train ``config`` (default: the demo's own) and quiz the model before and after."""
    from loraforge.train.loop import train

    console = console or Console()
    started = time.perf_counter()
    config = config or demo_config()
    rows = heldout_rows()
    template = config.data.template
    scores = {}

    def before(adapter_model, tokenizer):
        with merged(adapter_model):
            answers = answer(adapter_model, tokenizer, rows, template)
        scores["before"] = show(console, "before training (base model)", rows, answers)

    result = train(config, on_start=before, console=console)
    with merged(result.model):
        answers = answer(result.model, result.tokenizer, rows, template)
    scores["after"] = show(console, "after training", rows, answers)
    console.print(
        f"[bold]demo[/]: held-out {scores['before']}/{len(rows)} before -> {scores['after']}/{len(rows)} after, "
        f"{time.perf_counter() - started:.0f} s in all. Output: {result.output_dir}; "
        f"plot: {result.output_dir}/loss_curve.png"
    )
    return 0
