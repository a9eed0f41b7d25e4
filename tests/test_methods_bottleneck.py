"""Bottleneck adapters (Houlsby / Pfeiffer) on a tiny Llama, plain and nf4: identity at
initialisation, the output equal to the formula re-implemented here with forward hooks on an
untouched model, save/load round trip, merging refused, and ``loraforge train`` lowering the eval
loss with ``adapter.method: bottleneck``."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

import loraforge.models
from loraforge.adapters import BottleneckConfig, attach, load_adapter
from loraforge.adapters.bottleneck import BottleneckLayer
from loraforge.errors import UserError
from loraforge.quant.replace import quantize_model
from loraforge.train.build import adapter_config
from loraforge.train.config import load_config
from loraforge.train.loop import train

from helpers_methods import make_tiny_tokenizer
from helpers_train import log_rows, tiny_model, write_segment_data

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

IDS = torch.tensor([[5, 9, 3, 7, 8, 7, 11, 12, 40, 2]])


def base(quantized: bool = False):
    model = tiny_model(make_tiny_tokenizer())
    return quantize_model(model, "nf4") if quantized else model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomise(adapter_model) -> None:
    """Non-zero up-projections and biases (the init is exactly the identity)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapter_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_identity_at_init(placement, quantized):
    model = base(quantized)
    expected = logits(model)
    am = attach(model, BottleneckConfig(placement=placement, bottleneck_size=4))
    wrapped = [k for k, m in am.model.named_modules() if isinstance(m, BottleneckLayer)]
    suffixes = {"houlsby": {"o_proj", "down_proj"}, "pfeiffer": {"down_proj"}}[placement]
    assert len(wrapped) == 2 * len(suffixes) and {k.rsplit(".", 1)[1] for k in wrapped} == suffixes
    torch.testing.assert_close(logits(am), expected, rtol=0, atol=0)
    n = sum(p.numel() for p in am.parameters() if p.requires_grad)
    assert n == len(wrapped) * (32 * 4 + 4 + 4 * 32 + 32)  # hidden size 32, bottleneck 4


def reference_logits(model, adapter_model, residual: bool, act) -> torch.Tensor:
    """h' = h + W_up f(W_down h + b_down) + b_up at each adapted module's output, by forward
    hooks on a model without adapters."""
    handles = []
    for key in adapter_model.targets["default"]:
        layer = adapter_model.model.get_submodule(key)
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        w_down, b_down, w_up, b_up = (t.detach().clone() for t in (down.weight, down.bias, up.weight, up.bias))

        def hook(module, inputs, h, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up):
            z = act(h.float() @ w_down.T + b_down) @ w_up.T + b_up
            return h + z if residual else z

        handles.append(model.get_submodule(key).register_forward_hook(hook))
    try:
        return logits(model)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("placement,non_linearity,residual,act", [
    ("houlsby", None, True, F.silu),  # AdapterHub's Houlsby default: swish
    ("pfeiffer", None, True, F.relu),  # AdapterHub's Pfeiffer default: relu
    ("houlsby", "tanh", False, torch.tanh),
])
def test_output_equals_the_formula(placement, non_linearity, residual, act, quantized):
    am = attach(base(quantized), BottleneckConfig(placement=placement, reduction_factor=8,
                                                  non_linearity=non_linearity, residual=residual))
    assert am.model.get_submodule(am.targets["default"][0]).adapter_down["default"].weight.shape == (4, 32)
    randomise(am)
    got = logits(am)
    expected = reference_logits(base(quantized), am, residual, act)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(base(quantized)), atol=1e-3)  # the adapters do act


def test_save_load_round_trip_and_no_merge(tmp_path):
    am = attach(base(), BottleneckConfig(placement="houlsby", bottleneck_size=6, non_linearity="gelu"))
    randomise(am)
    am.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["placement"] == "houlsby" and saved["bottleneck_size"] == 6
    assert saved["non_linearity"] == "gelu" and saved["residual"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.o_proj.adapter_down.weight"
    assert tensors[key].shape == (6, 32) and len(tensors) == 4 * 4
    loaded = load_adapter(base(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(am), rtol=0, atol=0)

    assert not loaded.mergeable()
    with pytest.raises(UserError, match="cannot be merged.*nonlinear"):
        loaded.merge_and_unload()
    torch.testing.assert_close(logits(loaded), logits(am), rtol=0, atol=0)  # nothing changed


def test_config_mistakes_are_named():
    with pytest.raises(UserError, match="not both"):
        BottleneckConfig(reduction_factor=4, bottleneck_size=8)
    with pytest.raises(UserError, match="unknown non-linearity 'swishh'.*did you mean"):
        BottleneckConfig(non_linearity="swishh")
    with pytest.raises(UserError) as info:
        load_config(None, ["data.train=a.jsonl", "adapter.method=bottleneck", "adapter.bottleneck.placement=parallel"])
    assert "houlsby" in info.value.message and "adapter.bottleneck.placement" in info.value.where
    with pytest.raises(UserError) as info:
        load_config(None, ["data.train=a.jsonl", "adapter.method=bottleneck", "adapter.r=8"])
    assert "does not apply to adapter method 'bottleneck'" in info.value.message
    with pytest.raises(UserError, match="adapter.method is 'lora'"):
        load_config(None, ["data.train=a.jsonl", "adapter.bottleneck.placement=pfeiffer"])
    c = load_config(None, ["data.train=a.jsonl", "adapter.method=bottleneck", "adapter.bottleneck.placement=pfeiffer",
                           "adapter.bottleneck.bottleneck_size=3", "adapter.dropout=0.1"])
    cfg = adapter_config(c.adapter, c.quantization)
    assert (cfg.placement, cfg.bottleneck_size, cfg.non_linearity, cfg.dropout, cfg.targets) == (
        "pfeiffer", 3, "relu", 0.1, ["down_proj"])


def test_training_lowers_eval_loss(tmp_path, monkeypatch):
    tokenizer = make_tiny_tokenizer()
    monkeypatch.setattr(loraforge.models, "load_model", lambda source, quantize=None, **kw: (base(), tokenizer))
    data = write_segment_data(tmp_path / "data.jsonl", n=20)
    cfg = load_config(None, [
        "model=tiny", f"data.train={data}", "data.format=segments", "quantization=null", "data.eval_fraction=0.25",
        "adapter.method=bottleneck", "adapter.bottleneck.reduction_factor=4", "train.steps=8", "train.batch_size=4",
        "train.lr=1e-2", "train.save_every=0", "train.eval_every=1", "train.gradient_checkpointing=false",
        f"output_dir={tmp_path / 'out'}",
    ])
    console = Console(file=io.StringIO(), width=240)
    result = train(cfg, console=console)
    assert "bottleneck  houlsby, reduction 4" in console.file.getvalue()
    evals = [r["eval_loss"] for r in log_rows(tmp_path / "out") if "eval_loss" in r]
    assert len(evals) == 8 and evals[-1] < evals[0]
    loaded = load_adapter(base(), tmp_path / "out")
    torch.testing.assert_close(logits(loaded), logits(result.model), rtol=1e-6, atol=1e-6)
