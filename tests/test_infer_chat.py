"""``loraforge chat`` at the terminal: Ctrl-C stops a reply and the chat goes on, typed-ahead
input neither echoes into a reply nor reaches the next prompt (checked on a pseudo-terminal),
and the banner fits 80 columns one value per line."""

from __future__ import annotations

import os
import select
import signal

import pytest
import torch
from helpers_infer import bpe_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def test_ctrl_c_stops_the_reply_not_the_chat():
    """A real SIGINT during the first reply's third forward: that reply ends there (marked
    ``(stopped)``, what was shown kept in the history), the second line still gets a full reply,
    and the Ctrl-C handler the process had is back afterwards (``SIG_IGN`` where the suite was
    started in the background, Python's default otherwise)."""
    from loraforge.infer.chat import chat_loop
    from loraforge.infer.generate import GenerationSettings

    before = signal.getsignal(signal.SIGINT)
    tok = bpe_tokenizer()
    model = tiny_model(tok)
    settings = GenerationSettings(max_new_tokens=12)
    full = chat_loop(model, tok, "tokenizer", settings, ["hello"], lambda text: None)[1]["content"]
    forwards = []

    def interrupt_third_forward(module, args, output):
        forwards.append(1)
        if len(forwards) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    model.register_forward_hook(interrupt_third_forward)
    out: list[str] = []
    history = chat_loop(model, tok, "tokenizer", settings, ["hello", "the quick"], out.append)
    text = "".join(out)
    assert text.count("(stopped)") == 1 and text.index("(stopped)") < text.index(history[3]["content"])
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    stopped = history[1]["content"]
    assert full.startswith(stopped) and len(stopped) < len(full)  # the same reply, cut short
    assert len(forwards) > 3 + 6  # the second reply ran on after the stop
    assert signal.getsignal(signal.SIGINT) is before


def test_no_echo_hides_and_drops_typed_ahead_input_on_a_pty():
    import pty
    import termios

    from loraforge.infer.terminal import no_echo

    master, slave = pty.openpty()
    with os.fdopen(slave, "r") as terminal:
        assert termios.tcgetattr(slave)[3] & termios.ECHO
        with no_echo(terminal):
            assert not termios.tcgetattr(slave)[3] & termios.ECHO
            assert termios.tcgetattr(slave)[3] & termios.ISIG  # Ctrl-C still signals
            os.write(master, b"typed during the reply\n")
            assert select.select([slave], [], [], 5)[0]  # the line has reached the terminal
            assert not select.select([master], [], [], 0.2)[0]  # and was not echoed
        assert termios.tcgetattr(slave)[3] & termios.ECHO  # restored
        assert not select.select([slave], [], [], 0.2)[0]  # and the typed-ahead line is gone
    os.close(master)


def test_no_echo_outside_a_terminal_changes_nothing(tmp_path):
    from loraforge.infer.terminal import no_echo

    with open(tmp_path / "f", "w+") as f, no_echo(f):
        f.write("x")


def test_banner_one_value_per_line_within_80_columns():
    from loraforge.infer.chat import HELP
    from loraforge.infer.chat_command import banner_lines

    model, adapter = "smollm2-135m-instruct", "runs/smollm2-alpaca-lora-r16-2026-12-01"
    lines = banner_lines(model, adapter, "chatml", HELP)
    assert all(len(line) <= 80 for line in lines), lines
    assert [line.split()[-1] for line in lines[:3]] == [model, adapter, "chatml"]
    assert "Ctrl-C stops a reply" in lines[-1]


def test_ctrl_c_at_the_prompt_gives_a_fresh_prompt(monkeypatch, capsys):
    from loraforge.infer import chat_command

    answers = iter([KeyboardInterrupt, "hi", EOFError])

    def fake_input():
        value = next(answers)
        if isinstance(value, type):
            raise value
        return value

    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Tty())
    monkeypatch.setattr("builtins.input", fake_input)
    assert list(chat_command._lines()) == ["", "hi"]
    assert "/exit or Ctrl-D quits" in capsys.readouterr().err
    torch.manual_seed(0)  # nothing else global was touched
