"""The embedded demo, shortened: after QLoRA training on the shipped identity data, the model
answers more held-out paraphrases correctly than the base model (real SmolLM2-135M, NF4)."""

from __future__ import annotations

import json

import pytest

from loraforge.train.demo import DEMO_DIR, demo_config, heldout_rows, run_demo, score

SHORT = ["train.steps=14", "train.lr=2e-3", "train.warmup_steps=1", "data.max_length=96"]


def test_demo_data_is_sound():
    rows = heldout_rows()
    train = [json.loads(line) for line in (DEMO_DIR / "identity.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len(train) >= 100
    trained_questions = {r["messages"][0]["content"].strip().lower() for r in train}
    assert not any(r["messages"][0]["content"].strip().lower() in trained_questions for r in rows)
    assert score(rows[:2], ["I'm Quillon.", "No idea."]) == [True, False]


@pytest.mark.slow
def test_shortened_demo_beats_the_base_model(tmp_path, smollm2_gguf):
    from rich.console import Console

    console = Console(record=True, width=120)
    assert run_demo(demo_config(SHORT + [f"output_dir={tmp_path / 'demo'}"]), console=console) == 0
    text = console.export_text()
    before = int(text.split("before training (base model): ")[1].split("/")[0])
    after = int(text.split("after training: ")[1].split("/")[0])
    assert after > before, text[-3000:]
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()
