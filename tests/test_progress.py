"""Progress bars: drawn on a terminal for ``eval``, ``generate --prompts`` and the GGUF
conversion, and nothing at all when stderr is not a terminal (pipes, logs, these tests)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from helpers_infer import bpe_tokenizer, save_base, tiny_model

from loraforge.cli import main

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _base(tmp_path):
    tok = bpe_tokenizer()
    save_base(tiny_model(tok), tok, tmp_path / "base")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog " * 8)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in "abc"))
    return str(tmp_path / "base")


def _commands(tmp_path, base):
    return {
        "eval": (["eval", base, "--data", str(tmp_path / "text.txt"), "--window", "16"], "windows"),
        "generate": (["generate", base, "--prompts", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "2",
                      "--batch-size", "1"], "prompts"),
    }


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_bar_on_a_terminal_and_quiet_otherwise(tmp_path, capsys, monkeypatch, command):
    argv, unit = _commands(tmp_path, _base(tmp_path))[command]
    capsys.readouterr()
    assert main(argv) == 0
    quiet = capsys.readouterr().err
    assert "/3 " not in quiet and "\x1b" not in quiet and "\r" not in quiet  # no bar, no control codes
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(argv) == 0
    drawn = terminal.getvalue()
    assert f"/{3 if command == 'generate' else ''}" in drawn and f" {unit} " in drawn and "\x1b" in drawn, drawn


def test_no_progress_flag_and_library_default(monkeypatch):
    from loraforge.progress import progress

    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with progress("work", 2, unit="things", enabled=False) as advance:
        advance(2)
    assert terminal.getvalue() == ""
    with progress("work", 2, unit="things") as advance:
        advance(1, note="half")
        advance(1, description="finishing")
    assert "things" in terminal.getvalue() and "finishing" in terminal.getvalue()


def test_gguf_conversion_shows_its_steps_on_a_terminal(tmp_path, monkeypatch):
    from loraforge.infer.export_gguf import write_gguf
    from loraforge.models.gguf import convert_gguf

    tok = bpe_tokenizer()
    gguf_file = write_gguf(tiny_model(tok), tok, tmp_path / "tiny.gguf", "f32")
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    import loraforge.models.gguf as gguf_module
    from loraforge.progress import progress

    told = []  # what the bar is told: rich redraws ~10 times a second, so fast steps may never be drawn

    @contextlib.contextmanager
    def recording(description, total, **kwargs):
        told.append(description)
        with progress(description, total, **kwargs) as advance:
            def record(n=1, **fields):
                told.append(fields.get("description"))
                advance(n, **fields)

            yield record

    monkeypatch.setattr(gguf_module, "progress", recording)
    convert_gguf(gguf_file, tmp_path / "converted")
    assert "dequantizing the tensors" in told and "writing safetensors" in told
    drawn = terminal.getvalue()
    assert "3/3" in drawn and "\x1b" in drawn  # the final state is always drawn when the bar stops
    assert (tmp_path / "converted" / "model.safetensors").is_file()


def test_hashing_a_large_file_shows_a_bar(tmp_path, monkeypatch):
    import hashlib

    from loraforge.models import cache

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_BAR_BYTES", 1 << 20)  # "large" here: 1 MiB, not 1 GiB
    data = bytes(range(256)) * 12288  # 3 MiB
    (tmp_path / "big.gguf").write_bytes(data)
    (tmp_path / "small.gguf").write_bytes(data[:1000])
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert cache.file_digest(tmp_path / "small.gguf") == hashlib.sha256(data[:1000]).hexdigest()
    assert terminal.getvalue() == ""
    assert cache.file_digest(tmp_path / "big.gguf") == hashlib.sha256(data).hexdigest()
    assert "hashing big.gguf" in terminal.getvalue() and "3/3" in terminal.getvalue()
