"""The whole loop on a tiny Llama with SmolLM2's tokenizer: outputs, exact resume after Ctrl-C,
atomic checkpoints, and bad input failing before anything is written."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import loraforge.train.checkpoint as checkpoint
from loraforge.cli import main
from loraforge.errors import UserError
from loraforge.train.config import load_config
from loraforge.train.logging import RunLog
from loraforge.train.loop import pad_token_id, train

from helpers_train import log_rows, smollm2_tokenizer, tiny_model, use_tiny_model, write_chat_data


@pytest.fixture
def tokenizer(smollm2_gguf):
    return smollm2_tokenizer(smollm2_gguf)


def config(tmp_path, out: str, *extra: str):
    data = write_chat_data(tmp_path / "chat.jsonl")
    return load_config(None, [
        f"data.train={data}", "quantization=null", "adapter.r=4", "adapter.dropout=0.1",
        "train.steps=6", "train.batch_size=2", "train.grad_accum=2", "train.save_every=2", "train.keep_last=2",
        "train.eval_every=3", "data.eval_fraction=0.2", "train.lr=1e-2", "train.schedule=cosine",
        "train.warmup_steps=1", f"output_dir={tmp_path / out}", *extra,
    ])


def interrupt_after(monkeypatch, at_step: int):
    """Deliver a real SIGINT (Ctrl-C) right after step ``at_step`` is logged."""
    original = RunLog.step

    def step(self, **kw):
        original(self, **kw)
        if kw["step"] == at_step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunLog, "step", step)


def test_interrupted_and_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, tokenizer, monkeypatch):
    use_tiny_model(monkeypatch, tokenizer)
    full = train(config(tmp_path, "full", "train.gradient_checkpointing=true"))
    assert full.steps == 6 and len(full.losses) == 6

    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train(config(tmp_path, "split", "train.gradient_checkpointing=true"))
    split_dir = tmp_path / "split"
    assert [p.name for p in checkpoint.list_checkpoints(split_dir)] == ["step-000002", "step-000003"]
    assert not (split_dir / "adapter_model.safetensors").exists()  # nothing final yet

    resumed = train(config(tmp_path, "split", "train.gradient_checkpointing=true", "resume=true"))
    assert len(resumed.losses) == 3  # steps 4..6 only
    rows_full, rows_split = log_rows(tmp_path / "full"), log_rows(split_dir)
    assert [r["loss"] for r in rows_split if "loss" in r] == [r["loss"] for r in rows_full if "loss" in r]
    assert [r["eval_loss"] for r in rows_split if "eval_loss" in r] == [r["eval_loss"] for r in rows_full if "eval_loss" in r]
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(split_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_position_restore_would_differ(tmp_path, tokenizer, monkeypatch):
    """Sensitivity: resuming with fresh RNG/data position (as a naive trainer would) changes the
    curve, so the bit-for-bit equality above is a real check."""
    use_tiny_model(monkeypatch, tokenizer)
    full = train(config(tmp_path, "full"))
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train(config(tmp_path, "naive"))
    real_load = checkpoint.load_checkpoint

    def forgetful(path, **kw):
        real_load(path, **kw)
        torch.manual_seed(0)
        return checkpoint.Position(step=3, epoch=0, index=0)  # lost data position and RNG

    monkeypatch.setattr("loraforge.train.loop.load_checkpoint", forgetful)
    naive = train(config(tmp_path, "naive", "resume=true"))
    assert naive.losses != full.losses[3:]


def test_output_dir_holds_a_peft_loadable_adapter_and_run_files(tmp_path, tokenizer, monkeypatch):
    use_tiny_model(monkeypatch, tokenizer)
    result = train(config(tmp_path, "out", "train.steps=2", "train.eval_every=0", "data.eval_fraction=0"))
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "README.md",
                 "train_log.jsonl", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "im_start" in ((out / "chat_template.jinja").read_text() if (out / "chat_template.jinja").exists()
                          else json.loads((out / "tokenizer_config.json").read_text())["chat_template"])
    assert load_config(out / "config.yaml").train.steps == 2
    peft = pytest.importorskip("peft")
    base = tiny_model(tokenizer)
    model = peft.PeftModel.from_pretrained(base, str(out))
    ids = torch.tensor([tokenizer.encode("Say apple then river.")])
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    # a second run into the same folder must say how to continue, not mix the runs
    with pytest.raises(UserError, match="--resume"):
        train(config(tmp_path, "out", "train.steps=2"))


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_llama, monkeypatch):
    from loraforge.adapters import LoraConfig, attach

    model = attach(tiny_llama(), LoraConfig(r=2, alpha=2))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = dict(adapter_model=model, optimizer=opt, scheduler=sched, keep_last=2)
    first = checkpoint.save_checkpoint(tmp_path, position=checkpoint.Position(1, 0, 4), **kw)
    saved = checkpoint.trainable_state(model)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)

    real_save = torch.save

    def crash(obj, f, *a, **k):
        f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(UserError, match=r"step-000002: the disk is full .*step-000001 is intact"):
        checkpoint.save_checkpoint(tmp_path, position=checkpoint.Position(2, 0, 8), **kw)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)

    assert checkpoint.list_checkpoints(tmp_path) == [first]
    assert not list(checkpoint.checkpoint_dir(tmp_path).glob(".tmp-*"))  # nothing half-written left
    assert checkpoint.latest_checkpoint(tmp_path) == first
    position = checkpoint.load_checkpoint(first, adapter_model=model, optimizer=opt, scheduler=sched)
    assert position == checkpoint.Position(1, 0, 4)
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in saved.items())

    for step in (2, 3, 4):  # later saves clear the leftover temp folder and keep the newest two
        checkpoint.save_checkpoint(tmp_path, position=checkpoint.Position(step, 0, 0), **kw)
    root = checkpoint.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004"]


def test_bad_data_exits_2_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {{train: {data}}}\nquantization: null\noutput_dir: {out}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "Traceback" not in err
    assert not out.exists()
    data.write_text("")
    assert main(["train", str(cfg)]) == 2 and not out.exists()
    assert main(["train", str(cfg), "train.lr=-1"]) == 2 and not out.exists()
    assert main(["train", str(cfg), "adapter.lr=1"]) == 2
    assert "did you mean train.lr?" in capsys.readouterr().err


def test_eval_choice_logs_choice_accuracy_during_training(tmp_path, monkeypatch, tokenizer, capsys):
    """``data.eval_choice``: accuracy at every evaluation, in the JSONL, the console and the final
    line; the last value equals the scorer run afresh on the saved adapter (loaded from disk)."""
    from loraforge.adapters import load_adapter
    from loraforge.infer.choice import choice_accuracy, read_choice_rows

    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    mmlu = tmp_path / "mmlu.jsonl"
    rows = [{"question": f"Which word comes first: {a} or {b}?", "choices": [a, b, "both", "neither"], "answer": k % 4,
             "subject": "order"} for k, (a, b) in enumerate([("apple", "river"), ("stone", "cloud"), ("tiger", "paper")])]
    mmlu.write_text("".join(json.dumps(r) + "\n" for r in rows))
    use_tiny_model(monkeypatch, tokenizer)
    out = tmp_path / "run"
    config = load_config(None, [f"data.train={data}", f"data.eval_choice={mmlu}", "quantization=null", "adapter.r=4",
                                "train.steps=2", "train.batch_size=4", "train.eval_every=1", "train.lr=1e-2",
                                "train.save_every=0", f"output_dir={out}"])
    result = train(config)
    logged = [r for r in log_rows(out) if "choice_accuracy" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["choice_total"] == 3 and r["choice_accuracy"] == r["choice_correct"] / 3 for r in logged)
    assert "choice accuracy @ step 2" in capsys.readouterr().out
    fresh = load_adapter(tiny_model(tokenizer), out)
    again = choice_accuracy(fresh, tokenizer, read_choice_rows(mmlu), pad_id=pad_token_id(tokenizer))
    assert result.choice_accuracy == logged[-1]["choice_accuracy"] == again.correct / 3


def test_a_bad_eval_choice_file_fails_before_the_model_loads(tmp_path, monkeypatch, tokenizer):
    data = write_chat_data(tmp_path / "d.jsonl", n=4)
    bad = tmp_path / "mmlu.jsonl"
    bad.write_text(json.dumps({"question": "q?", "choices": ["a"], "answer": 0}) + "\n")
    calls = use_tiny_model(monkeypatch, tokenizer)
    assert main(["train", f"data.train={data}", f"data.eval_choice={bad}", "quantization=null",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    assert calls == [] and not (tmp_path / "run").exists()
