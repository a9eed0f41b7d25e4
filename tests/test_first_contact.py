"""What a newcomer meets first: config-relative paths, the demo's defaults never blocking a method
switch, a run of their own without the demo's quiz, an unwritable output folder refused before the
model loads, damaged checkpoints, feedback data refused, written files' modes, --version and env."""

from __future__ import annotations

import json
import os
import stat

import pytest

import loraforge.train.loop as loop
from loraforge.cli import main
from loraforge.errors import UserError
from loraforge.train import build
from loraforge.train.config import load_config
from loraforge.train.demo import demo_config, is_demo

from helpers_train import smollm2_tokenizer, use_tiny_model, write_chat_data


@pytest.fixture
def tokenizer(smollm2_gguf):
    return smollm2_tokenizer(smollm2_gguf)


# --------------------------------------------------------------------------- paths
def test_relative_paths_in_a_config_resolve_against_its_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    write_chat_data(project / "data" / "train.jsonl", n=4)
    (project / "run.yaml").write_text("data: {train: data/train.jsonl, eval: data/train.jsonl}\n"
                                      "output_dir: runs/x\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    c = load_config(project / "run.yaml")
    assert c.data.train == str(project / "data" / "train.jsonl")
    assert c.data.eval == str(project / "data" / "train.jsonl")
    assert c.output_dir == str(project / "runs" / "x")
    assert build.read_records(c)[0]  # the file is found from another working directory
    # command-line overrides resolve against the current directory
    c = load_config(project / "run.yaml", ["data.train=mine.jsonl", "output_dir=out"])
    assert c.data.train == "mine.jsonl" and c.output_dir == "out"
    with pytest.raises(UserError) as err:
        build.read_records(c)
    assert err.value.where == "data.train"
    assert "'mine.jsonl' not found" in err.value.message and str(elsewhere) in err.value.message


def test_a_missing_data_file_names_the_key_the_path_as_written_and_the_folder(tmp_path):
    (tmp_path / "run.yaml").write_text("data: {train: ../nope.jsonl}\n")
    c = load_config(tmp_path / "run.yaml")
    with pytest.raises(UserError) as err:
        build.read_records(c)
    assert err.value.where == "data.train"
    assert "'../nope.jsonl' not found (looked for in " + str(tmp_path) + ")" in err.value.message


def test_a_model_path_in_a_config_resolves_but_an_alias_stays(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "a.yaml").write_text("model: base\ndata: {train: t.jsonl}\n")
    (tmp_path / "b.yaml").write_text("model: smollm2-135m-instruct\ndata: {train: t.jsonl}\n")
    assert load_config(tmp_path / "a.yaml").model == str(tmp_path / "base")
    assert load_config(tmp_path / "b.yaml").model == "smollm2-135m-instruct"


# --------------------------------------------------------------------------- demo defaults
@pytest.mark.parametrize("method", ["vera", "adalora", "sora", "dora"])
def test_a_method_switch_on_the_command_line_is_not_blocked_by_the_demo_defaults(method):
    c = demo_config([f"adapter.method={method}"])
    assert c.adapter.method == method
    build.adapter_config(c.adapter, c.quantization)  # the method's config accepts what is left
    if method == "vera":
        assert c.adapter.r is None and c.adapter.alpha is None  # VeRA's own default rank (256)


def test_keys_the_user_wrote_that_do_not_apply_stay_errors(tmp_path):
    with pytest.raises(UserError, match="does not apply to adapter method 'vera'"):
        demo_config(["adapter.method=vera", "adapter.alpha=32"])
    (tmp_path / "mine.yaml").write_text("adapter: {method: lora, alpha: 16}\ndata: {train: t.jsonl}\n")
    with pytest.raises(UserError, match="does not apply to adapter method 'vera'"):
        load_config(tmp_path / "mine.yaml", ["adapter.method=vera"])


def test_overrides_naming_a_model_or_data_make_it_the_users_run_not_the_demo():
    assert is_demo([]) and is_demo(["train.steps=2", "adapter.method=vera", "output_dir=x"])
    assert not is_demo(["data.train=my.jsonl"])
    assert not is_demo(["model=my-model", "train.steps=3"])


def test_the_users_run_without_a_config_trains_without_the_quiz(tmp_path, monkeypatch, tokenizer):
    data = write_chat_data(tmp_path / "my.jsonl", n=8)
    use_tiny_model(monkeypatch, tokenizer)
    quizzed = []
    monkeypatch.setattr("loraforge.train.demo.run_demo", lambda *a, **k: quizzed.append(a) or 0)
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"data.train={data.name}", "adapter.method=vera", "train.steps=1",
                 "quantization=null", "data.max_length=64", "output_dir=out"]) == 0
    assert not quizzed
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["r"] == 256


# --------------------------------------------------------------------------- output folder
def test_an_unwritable_output_dir_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, tokenizer):
    data = write_chat_data(tmp_path / "d.jsonl", n=4)
    calls = use_tiny_model(monkeypatch, tokenizer)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["train", f"data.train={data}", "quantization=null", "train.steps=1"]
    assert main([*args, f"output_dir={blocker / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and str(blocker / "run") in err and "Traceback" not in err
    readonly = "/proc/loraforge-test-run"  # a read-only file system, even for root
    assert main([*args, f"output_dir={readonly}"]) == 2
    err = capsys.readouterr().err
    assert readonly in err and "cannot be written" in err and "Traceback" not in err
    assert calls == []  # refused before any model was loaded


def test_a_failed_final_save_says_so_in_one_message(tmp_path, monkeypatch, capsys, tokenizer):
    data = write_chat_data(tmp_path / "d.jsonl", n=4)
    use_tiny_model(monkeypatch, tokenizer)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("loraforge.adapters.io.save_tensors", full_disk)
    out = tmp_path / "run"
    assert main(["train", f"data.train={data}", "quantization=null", "train.steps=1", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "could not write the trained adapter: the disk is full" in err and "Traceback" not in err


def test_a_corrupt_checkpoint_on_resume_is_one_message(tmp_path, monkeypatch, capsys, tokenizer):
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    use_tiny_model(monkeypatch, tokenizer)
    out = tmp_path / "run"
    args = ["train", f"data.train={data}", "quantization=null", "train.steps=2", "train.batch_size=2",
            "train.save_every=1", "train.keep_last=2", f"output_dir={out}"]
    assert main(args) == 0
    state = out / "checkpoints" / "step-000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(state) in err and "truncated or corrupt" in err and "step-000001" in err
    assert "Traceback" not in err


def test_written_files_follow_the_umask(tmp_path, monkeypatch, tokenizer):
    data = write_chat_data(tmp_path / "d.jsonl", n=4)
    use_tiny_model(monkeypatch, tokenizer)
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(["train", f"data.train={data}", "quantization=null", "train.steps=1", f"output_dir={out}"]) == 0
    finally:
        os.umask(old)
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.yaml"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_base_model_name_or_path_is_what_the_user_passed(smollm2_gguf):
    from loraforge.adapters import LoraConfig, attach
    from loraforge.adapters.io import peft_config_dict
    from loraforge.models import load_model

    model, _ = load_model("smollm2-135m-instruct")
    assert peft_config_dict(attach(model, LoraConfig(r=2)), "default")["base_model_name_or_path"] == \
        "smollm2-135m-instruct"
    model, _ = load_model(smollm2_gguf)
    assert model.name_or_path == smollm2_gguf  # the GGUF path as given, not the cache folder


# --------------------------------------------------------------------------- data
@pytest.mark.parametrize("extra, what", [({"label": True}, "KTO"), ({"chosen": "a", "rejected": "b"}, "preference")])
def test_feedback_rows_are_refused_not_trained_as_sft(tmp_path, extra, what):
    from loraforge.data import build_dataset

    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], **extra}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=what) as err:
        build_dataset(path, tokenizer=None, format="messages")
    assert err.value.where.endswith("d.jsonl:1")


# --------------------------------------------------------------------------- commands
def test_version_and_env(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("loraforge ")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("loraforge", "torch", "transformers", "peft", "device", "threads", "cache"):
        assert any(line.split()[0] == key for line in out.splitlines()), key


@pytest.fixture
def small_disk(tmp_path):
    """A real size-limited file system (tmpfs), or a skip where this process may not mount one."""
    import subprocess

    mounted = []

    def mount(size_bytes: int):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(point)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the ENOSPC path is "
                        "also covered by test_crash_while_saving_keeps_the_previous_checkpoint")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, tokenizer,
                                                                       small_disk):
    from loraforge.train import checkpoint

    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    use_tiny_model(monkeypatch, tokenizer)
    args = ["train", f"data.train={data}", "quantization=null", "train.batch_size=2", "train.save_every=1",
            "train.keep_last=9", "adapter.r=64"]
    probe = tmp_path / "probe"
    assert main([*args, "train.steps=1", f"output_dir={probe}"]) == 0  # how much one step's files take
    one = sum(f.stat().st_size for f in (probe / "checkpoints").rglob("*") if f.is_file())
    disk = small_disk(int(one * 1.6) + 64 * 1024)  # room for the run's small files and one checkpoint
    out = disk / "run"
    assert main([*args, "train.steps=4", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint step-000002: the disk is full" in err
    assert "step-000001 is intact" in err and "Traceback" not in err
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000001"]
    assert not list(checkpoint.checkpoint_dir(out).glob(".tmp-*"))
    state = checkpoint.torch.load(out / "checkpoints" / "step-000001" / "trainer_state.pt", weights_only=True)
    assert state["position"]["step"] == 1
