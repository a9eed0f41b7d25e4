"""The web UI's layers without a browser: the form read off the config schema and checked as
``loraforge train`` checks, runs as subprocesses (stop = Ctrl-C's checkpoint, resume, one run per
folder), the side-by-side chat against the library's own generation, the merge options read off
``loraforge merge``, and the ``loraforge webui`` command's arguments (the browser itself:
test_webui_browser.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_infer import bpe_tokenizer, make_adapter, save_base, tiny_model  # noqa: E402
from helpers_train import log_rows, write_chat_data  # noqa: E402

from loraforge.errors import UserError
from loraforge.train import config as schema
from loraforge.webui.form import FORM_KEYS, check_form, error_key, form_fields, form_paths


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    tokenizer = bpe_tokenizer()
    return save_base(tiny_model(tokenizer), tokenizer, tmp_path_factory.mktemp("base") / "base")


def form_values(base: Path, folder: Path, **changes) -> dict:
    """The form as a user leaves it: schema defaults, a tiny run filled in (text, as typed)."""
    data = write_chat_data(folder / "chat.jsonl", n=12) if not (folder / "chat.jsonl").exists() else folder / "chat.jsonl"
    values = {f.key: "" if f.default is None else (f.default if f.kind in ("bool", "choice") else str(f.default))
              for f in form_fields()}
    values.update({"model": str(base), "quantization.type": "none", "data.train": str(data), "adapter.r": "4",
                   "train.steps": "3", "train.batch_size": "2", "data.max_length": "64",
                   "output_dir": str(folder / "run")})
    values.update(changes)
    return values


def test_the_form_is_read_off_the_schema():
    fields = {f.key: f for f in form_fields()}
    every_key = schema._all_keys(schema.Config)
    assert set(fields) == set(FORM_KEYS) and all(k in every_key for k in FORM_KEYS)
    assert fields["adapter.method"].choices == schema.METHODS
    assert fields["train.schedule"].choices == schema.SCHEDULES
    assert fields["quantization.type"].choices[0] == "none" and "nf4" in fields["quantization.type"].choices
    assert (fields["adapter.r"].kind, fields["adapter.r"].optional, fields["adapter.r"].default) == ("int", True, None)
    assert (fields["train.lr"].kind, fields["train.lr"].default) == ("float", schema.TrainSection().lr)
    assert (fields["overwrite"].kind, fields["data.train"].kind) == ("bool", "text")
    assert fields["data.max_length"].default == schema.DataSection().max_length


def test_the_resolved_yaml_is_what_loraforge_train_runs(base, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    values = form_values(base, tmp_path, **{"data.train": "chat.jsonl", "output_dir": "run",
                                            "train.lr": "2e-4", "adapter.targets": "[q_proj, v_proj]"})
    checked = check_form(values, cwd=tmp_path)
    c = checked.config
    assert (c.data.train, c.output_dir) == (str(tmp_path / "chat.jsonl"), str(tmp_path / "run"))  # absolute
    assert (c.train.lr, c.adapter.targets, c.adapter.r, c.quantization) == (2e-4, ["q_proj", "v_proj"], 4, None)
    assert c.adapter.alpha is None and c.train.epochs is None  # empty fields: the schema's defaults
    assert checked.data_summary.endswith("12 rows, format messages (detected)")
    file = tmp_path / "elsewhere" / "run.yaml"
    file.write_text(checked.yaml_text)
    assert schema.to_dict(schema.load_config(file)) == schema.to_dict(c)  # from any folder, the same run


@pytest.mark.parametrize("changes, key, message", [
    ({"adapter.r": "-1"}, "adapter.r", "expected a rank r > 0, got -1"),
    ({"data.train": "missing.jsonl"}, "data.train", "data file"),
    ({"train.lr": "fast"}, "train.lr", "expected a number, got str 'fast'"),
    ({"train.batch_size": ""}, "train.batch_size", "expected an integer, got nothing (null)"),
    ({"adapter.method": "lorra"}, "adapter.method", 'did you mean "lora"'),
    ({"quantization.type": "nf4", "adapter.method": "full"}, "quantization.type", "full fine-tuning trains every weight"),
    ({"train.epochs": "2"}, "train.epochs", "give either train.steps or train.epochs, not both"),
])
def test_a_bad_value_gets_the_cli_message_and_names_its_field(base, tmp_path, changes, key, message):
    values = form_values(base, tmp_path, **changes)
    with pytest.raises(UserError) as err:
        check_form(values, cwd=tmp_path)
    assert message in str(err.value)
    assert error_key(err.value, form_paths(values, tmp_path)) == key


def test_an_output_dir_holding_a_run_is_refused_as_the_cli_refuses_it(base, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: x\n")
    values = form_values(base, tmp_path)
    with pytest.raises(UserError, match="output_dir already holds a run") as err:
        check_form(values, cwd=tmp_path)
    assert error_key(err.value, form_paths(values, tmp_path)) == "output_dir"
    assert check_form(values, cwd=tmp_path, extra=("resume=true",)).config.resume  # Resume passes the check


def test_stop_is_ctrl_c_it_saves_a_checkpoint_and_resume_continues(base, tmp_path):
    from loraforge.webui.runs import Runs, progress

    runs = Runs(tmp_path / "workdir")
    values = form_values(base, tmp_path, **{"train.steps": "400", "train.batch_size": "1"})
    run = runs.start(check_form(values, cwd=tmp_path).yaml_text, tmp_path / "run")
    with pytest.raises(UserError, match="this web UI"):  # one run per folder, whichever tab asks
        runs.start(check_form(values, cwd=tmp_path, check_output=False).yaml_text, tmp_path / "run")
    log = tmp_path / "run" / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().strip()) and run.running and time.time() < deadline:
        time.sleep(0.05)
    runs.stop(tmp_path / "run")
    assert run.process.wait(60) == 130, run.console()  # loraforge train's status after Ctrl-C
    stopped_at = log_rows(tmp_path / "run")[-1]["step"]
    assert 1 <= stopped_at < 400 and "interrupted: saved" in run.console()
    assert "Resume continues it" in run.state()
    assert (tmp_path / "run" / "checkpoints").is_dir()

    resume = {"train.steps": str(stopped_at + 2), "train.batch_size": "1"}
    resumed = runs.start(check_form(form_values(base, tmp_path, **resume), cwd=tmp_path,
                                    extra=("resume=true",)).yaml_text, tmp_path / "run", resume=True)
    assert resumed.process.wait(120) == 0, resumed.console()
    assert "resumed from" in resumed.console()
    steps = [r["step"] for r in log_rows(tmp_path / "run") if "loss" in r]
    assert steps == list(range(1, stopped_at + 3))
    shown = progress(tmp_path / "run", resumed)
    assert shown.total == stopped_at + 2 and f"step {stopped_at + 2}/{stopped_at + 2}" in shown.line
    assert shown.line.startswith("**finished**")


def test_progress_eta_counts_only_this_process_steps():
    from loraforge.webui.runs import _eta

    earlier = [{"step": s, "loss": 1.0, "elapsed_s": 10.0 * s} for s in (1, 2, 3)]  # a stopped run: 10 s/step
    resumed = [{"step": 4, "loss": 1.0, "elapsed_s": 1.0}, {"step": 5, "loss": 1.0, "elapsed_s": 2.0}]
    assert _eta(earlier + resumed, total=10) == pytest.approx(1.0 * 5)
    assert _eta(earlier, total=5) == pytest.approx(10.0 * 2)


def test_the_chat_replies_are_the_library_replies_base_and_adapter(base, tmp_path):
    from transformers import AutoModelForCausalLM

    from loraforge.infer.generate import GenerationSettings, generate_ids
    from loraforge.infer.prompts import encode_messages, pad_token_id, stop_token_ids
    from loraforge.webui.compare import Compare

    tokenizer = bpe_tokenizer()
    make_adapter(AutoModelForCausalLM.from_pretrained(str(base)), "lora").save_pretrained(tmp_path / "adapter")
    compare = Compare()
    loaded = compare.load(str(base), str(tmp_path / "adapter"))
    assert loaded.template == "tokenizer"  # no training config beside the adapter: the tokenizer's own
    history = [{"role": "user", "content": "the quick brown fox"}]
    settings = GenerationSettings(max_new_tokens=10)
    shown = {flag: list(compare.reply(loaded, history, settings, adapter=flag)) for flag in (False, True)}
    model = loaded.session.model
    ids = encode_messages(history, tokenizer, "tokenizer")

    def want() -> str:
        out = generate_ids(model, [ids], settings, stop_ids=stop_token_ids(tokenizer, model), pad_id=pad_token_id(tokenizer))
        return tokenizer.decode(out[0], skip_special_tokens=True)

    with loaded.session.adapter.disable_adapter():
        base_reply = want()
    assert shown[False][-1] == base_reply and shown[True][-1] == want()
    assert shown[False][-1] != shown[True][-1]  # the adapter changes the reply: the two columns differ
    assert len(shown[True]) > 1  # it streamed, piece by piece
    with pytest.raises(UserError, match="adapter folder"):
        compare.load(str(base), str(tmp_path))


def test_export_takes_loraforge_merge_options_and_checks_them():
    from loraforge.infer.merge_command import DTYPES, FORMATS
    from loraforge.webui.export import merge_argv, option_specs

    specs = option_specs()
    assert tuple(specs["--format"].choices) == FORMATS and tuple(specs["--dtype"].choices) == DTYPES
    argv = merge_argv("base", "run", "out", {"--format": "gguf", "--gguf-type": "q8_0", "--overwrite": True,
                                             "--dtype": None})
    assert argv == ["base", "--adapter", "run", "--out", "out", "--format", "gguf", "--gguf-type", "q8_0", "--overwrite"]
    with pytest.raises(UserError, match="invalid choice") as err:
        merge_argv("base", "run", "out", {"--format": "zip"})
    assert err.value.where == "--format"
    with pytest.raises(UserError) as err:
        merge_argv("base", "run", " ", {})
    assert err.value.where == "--out"


def test_the_webui_command(monkeypatch, capsys):
    from loraforge.cli import build_parser, main
    from loraforge.webui.command import parse_auth

    assert parse_auth("ann:secret:2") == ("ann", "secret:2") and parse_auth(None) is None
    assert main(["webui", "--auth", "ann"]) == 2
    assert "expected USER:PASSWORD" in capsys.readouterr().err
    args = build_parser().parse_args(["webui"])
    assert (args.host, args.port, args.auth) == ("127.0.0.1", 7860, None)  # this machine only by default
    monkeypatch.setitem(sys.modules, "gradio", None)  # the extra not installed
    assert main(["webui"]) == 2
    assert "pip install 'loraforge[webui]'" in capsys.readouterr().err
