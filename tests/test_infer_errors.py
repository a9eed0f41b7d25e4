"""The inference commands facing broken files and over-long prompts: a truncated or garbage
adapter / model shard is one message naming the file (exit 2, no traceback, nothing written);
a prompt longer than the model's context is cut from the left with a one-line note."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers_infer import bpe_tokenizer, make_adapter, save_base, tiny_model

from loraforge.cli import main

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

COMMANDS = ("generate", "chat", "merge", "eval")
DAMAGE = ("truncated-adapter", "garbage-adapter", "truncated-shard", "missing-shard")


def _folders(tmp_path, **overrides):
    tok = bpe_tokenizer()
    model = tiny_model(tok, **overrides)
    save_base(model, tok, tmp_path / "base")
    make_adapter(model, "lora").save_pretrained(tmp_path / "adapter")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog " * 4)
    return tok


def _damage(tmp_path, kind: str):
    """Break one file the way ``kind`` says; the file the message must name."""
    if kind == "missing-shard":
        index = tmp_path / "base" / "model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
        return index
    file = tmp_path / ("adapter/adapter_model.safetensors" if kind.endswith("adapter") else "base/model.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if kind.startswith("truncated") else bytes(range(256)) * 8)
    return file


def _command(tmp_path, name: str) -> list[str]:
    base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
    return {
        "generate": ["generate", base, "--adapter", adapter, "--prompt", "hello", "--max-new-tokens", "2"],
        "chat": ["chat", base, "--adapter", adapter, "--max-new-tokens", "2"],
        "merge": ["merge", base, "--adapter", adapter, "--out", str(tmp_path / "merged")],
        "eval": ["eval", base, "--adapter", adapter, "--data", str(tmp_path / "text.txt")],
    }[name]


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("command", COMMANDS)
def test_broken_adapter_or_shard_is_one_message_naming_the_file(tmp_path, capsys, monkeypatch, command, kind):
    _folders(tmp_path)
    broken = _damage(tmp_path, kind)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    capsys.readouterr()
    assert main(_command(tmp_path, command)) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert f"loraforge {command}: error: {broken}" in err, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert err.strip().splitlines()[-1].startswith(f"loraforge {command}: error: "), err
    expected = "missing" if kind == "missing-shard" else ("truncated" if kind.startswith("truncated") else "corrupt")
    assert expected in err, err
    assert captured.out == "" and not (tmp_path / "merged").exists()


def test_legacy_adapter_bin_garbage_is_a_user_error(tmp_path):
    from loraforge.adapters.io import read_adapter
    from loraforge.errors import UserError

    _folders(tmp_path)
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"PK\x03\x04 not a zip archive" * 10)
    with pytest.raises(UserError, match="truncated or corrupt PyTorch weights file") as err:
        read_adapter(tmp_path / "adapter")
    assert err.value.where == str(tmp_path / "adapter" / "adapter_model.bin")


def test_fit_context_keeps_the_end_and_room_for_the_reply():
    from loraforge.infer.prompts import fit_context

    prompts = [list(range(100)), list(range(10)), list(range(70))]
    kept, notice = fit_context(prompts, context=64, max_new_tokens=16)
    assert kept == [list(range(52, 100)), list(range(10)), list(range(22, 70))]  # the last 64 - 16 tokens
    assert "2 prompts (number 1, 3; up to 100 tokens) were cut from the left to the last 48 tokens" in notice
    kept, notice = fit_context([list(range(100))], context=64, max_new_tokens=500)  # never below half the context
    assert kept == [list(range(68, 100))] and "the prompt (100 tokens) was cut" in notice
    assert fit_context(prompts[1:2], context=64, max_new_tokens=16) == (prompts[1:2], None)
    assert fit_context(prompts, context=None, max_new_tokens=16) == (prompts, None)


def test_generate_cuts_a_long_prompt_from_the_left_with_a_note(tmp_path, capsys):
    """The reply to an over-long prompt is the reply to its last tokens, and a note says so."""
    from loraforge.infer.generate import GenerationSettings, generate_ids
    from loraforge.infer.prompts import pad_token_id, stop_token_ids
    from loraforge.models import load_model

    tok = _folders(tmp_path, max_position_embeddings=48)
    long_prompt = "the quick brown fox jumps over the lazy dog " * 12
    ids = tok.encode(long_prompt)
    assert len(ids) > 48
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"prompt": long_prompt}) + "\n")
    capsys.readouterr()
    base = str(tmp_path / "base")
    assert main(["generate", base, "--prompt", long_prompt, "--raw", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert f"note: the prompt ({len(ids)} tokens) was cut from the left to the last 40 tokens" in err
    assert "context is 48 tokens, 8 of them left for the reply" in err
    model, _ = load_model(base)
    want = generate_ids(model, [ids[-40:]], GenerationSettings(max_new_tokens=8), stop_ids=stop_token_ids(tok, model, False),
                        pad_id=pad_token_id(tok))[0]
    assert out == tok.decode(want, skip_special_tokens=True) + "\n"
    assert main(["generate", base, "--prompts", str(rows), "--raw", "--max-new-tokens", "8"]) == 0
    assert "1 prompt (number 2; " in capsys.readouterr().err


def test_chat_cuts_a_long_message_and_eval_refuses_a_window_beyond_the_context(tmp_path, capsys):
    from loraforge.infer.chat import chat_loop
    from loraforge.infer.generate import GenerationSettings
    from loraforge.models import load_model

    tok = _folders(tmp_path, max_position_embeddings=48)
    model, _ = load_model(tmp_path / "base")
    out: list[str] = []
    chat_loop(model, tok, "tokenizer", GenerationSettings(max_new_tokens=4), ["the lazy dog " * 30], out.append)
    assert "(the conversation (" in "".join(out) and "cut from the left to the last 44 tokens" in "".join(out)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "base"), "--data", str(tmp_path / "text.txt"), "--window", "64"]) == 2
    assert "expected a window of 2 to 48 tokens (the model's context), got 64" in capsys.readouterr().err


def test_a_damaged_gguf_cache_entry_is_converted_again(tmp_path, monkeypatch, capsys):
    from loraforge.infer.export_gguf import write_gguf
    from loraforge.models import load_model
    from loraforge.models.gguf import gguf_cache_entry

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    tok = bpe_tokenizer()
    gguf_file = write_gguf(tiny_model(tok), tok, tmp_path / "tiny.gguf", "f32")
    ids = torch.tensor([tok.encode("the quick brown fox")])
    want = load_model(gguf_file)[0](input_ids=ids).logits
    weights = gguf_cache_entry(gguf_file) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    torch.testing.assert_close(load_model(gguf_file)[0](input_ids=ids).logits, want, rtol=0, atol=0)
    assert "converting tiny.gguf to safetensors again (the cached copy was damaged)" in capsys.readouterr().err
