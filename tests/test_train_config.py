"""The train config: YAML + overrides -> validated dataclasses; every mistake a UserError that
names the file, line and key."""

from __future__ import annotations

import pytest

from loraforge.errors import UserError
from loraforge.train.config import Config, dump_yaml, load_config
from loraforge.train.demo import DEMO_CONFIG, demo_config

BASE = ["data.train=train.jsonl"]


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def error(path, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_full_config_round_trips(tmp_path):
    path = write(tmp_path, """
model: some/folder
quantization: {type: nf4, double_quant: false, blocksize: 128}
adapter: {method: lora, r: 8, alpha: 32, dropout: 0.05, targets: [q_proj, v_proj], rslora: true}
data: {train: a.jsonl, eval_fraction: 0.1, format: alpaca, max_length: 256, packing: true}
train: {epochs: 2, batch_size: 2, grad_accum: 4, lr: 2e-4, schedule: cosine, warmup_steps: 3}
output_dir: out
""")
    c = load_config(path)
    assert c.quantization.blocksize == 128 and c.quantization.double_quant is False
    assert c.adapter.targets == ["q_proj", "v_proj"] and c.adapter.alpha == 32.0 and c.adapter.rslora
    assert c.train.lr == 2e-4  # YAML 1.1 reads 2e-4 as a string; the schema turns it into a float
    assert c.train.epochs == 2 and c.train.steps is None
    assert c.data.packing and c.data.eval_fraction == 0.1
    again = load_config(write(tmp_path, dump_yaml(c)))
    assert dump_yaml(again) == dump_yaml(c)


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, "data: {train: a.jsonl}\ntrain:\n  steps: 5\n  learning_rat: 1.0e-4\n")
    msg = error(path)
    assert f"{path}:4" in msg and "learning_rat" in msg
    msg = error(write(tmp_path, "data: {train: a.jsonl}\ntrain:\n  bacth_size: 2\n"))
    assert 'did you mean "batch_size"' in msg and ":3" in msg


def test_misplaced_key_names_its_section(tmp_path):
    path = write(tmp_path, "data: {train: a.jsonl}\nadapter:\n  method: lora\n  lr: 1.0e-4\n")
    msg = error(path)
    assert f"{path}:4" in msg and "did you mean train.lr?" in msg
    assert "did you mean adapter.r?" in error(None, BASE + ["train.r=4"])
    assert "did you mean data.max_length?" in error(None, BASE + ["max_length=64"])


def test_bad_types_and_ranges(tmp_path):
    assert "expected an integer" in error(None, BASE + ["train.batch_size=two"])
    assert "expected a number" in error(None, BASE + ["train.lr=fast"])
    assert "expected true/false" in error(None, BASE + ["data.packing=maybe"])
    for override, words in [
        ("adapter.r=0", "r > 0"), ("train.lr=0", "learning rate > 0"), ("train.lr=-1e-4", "> 0"),
        ("adapter.dropout=1.5", "dropout"), ("train.grad_accum=0", "grad_accum > 0"),
        ("quantization.blocksize=100", "power of two"), ("data.eval_fraction=1.0", "eval_fraction"),
        ("train.schedule=cosin", 'did you mean "cosine"'), ("adapter.method=loar", 'did you mean "lora"'),
        ("data.format=alpacca", 'did you mean "alpaca"'), ("train.optimizer=adamww", 'did you mean "adamw"'),
    ]:
        assert words in error(None, BASE + [override]), override
    msg = error(None, BASE + ["train.steps=10", "train.epochs=1"])
    assert "either train.steps or train.epochs" in msg
    assert "data.train" in error(None, [])
    path = write(tmp_path, "data: {train: a.jsonl}\ntrain: {steps: 3}\ntrain: {steps: 4}\n")
    assert "given twice" in error(path)
    assert "not valid YAML" in error(write(tmp_path, "train: [1, 2\n"))


def test_overrides_are_yaml_values_on_dotted_keys():
    c = load_config(None, BASE + ["train.lr=1e-3", "adapter.targets=[q_proj, o_proj]", "quantization=null",
                                  "train.gradient_checkpointing=false", "adapter.rank_pattern={q_proj: 4}",
                                  "train.steps=7", "output_dir=runs/x=y"])
    assert c.train.lr == 1e-3 and c.adapter.targets == ["q_proj", "o_proj"] and c.quantization is None
    assert c.train.gradient_checkpointing is False and c.adapter.rank_pattern == {"q_proj": 4}
    assert c.train.steps == 7 and c.output_dir == "runs/x=y"
    assert "command-line override train.lr" in error(None, BASE + ["train.lr=abc"])
    assert "key=value" in error(None, BASE + ["train.lr"])


def test_method_subsections_are_checked_and_unavailable_methods_refused():
    c = load_config(None, BASE + ["adapter.method=vera", "adapter.vera.d_initial=0.2"])
    assert c.adapter.vera.d_initial == 0.2
    assert "adapter.method is 'lora'" in error(None, BASE + ["adapter.vera.d_initial=0.2"])
    assert "does not apply to adapter method 'vera'" in error(None, BASE + ["adapter.method=vera", "adapter.alpha=4"])
    assert "expected an integer" in error(None, BASE + ["adapter.adalora.init_r=big"])
    assert "expected a number" in error(None, BASE + ["adapter.sora.lambda=lots"])
    from loraforge.train.build import registered_methods

    for method in ("adalora", "sora"):
        if method not in registered_methods():
            assert "not available in this build" in error(None, BASE + [f"adapter.method={method}"])


def test_the_shipped_demo_config_is_valid():
    c = demo_config()
    assert isinstance(c, Config) and c.source == str(DEMO_CONFIG)
    assert c.quantization.type == "nf4" and c.adapter.method == "lora"
    assert c.data.train.endswith("identity.jsonl")
