"""``adapter.method: full`` end to end on a tiny Llama: every weight trains through the same loop
(loss goes down, the fused kernels give the same losses as transformers' forward), the output is
a transformers folder with the trained logits, a quantized base is refused, and an interrupted
run resumes bit for bit from the loop's checkpoints."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import loraforge.models
import loraforge.train.checkpoint as checkpoint
from loraforge.errors import UserError
from loraforge.train.config import load_config
from loraforge.train.full import FullModel
from loraforge.train.loop import train

from helpers_methods import make_tiny_tokenizer
from helpers_train import interrupt_after, log_rows, tiny_model, write_segment_data

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def loads(monkeypatch, tokenizer) -> list:
    calls = []

    def load_model(source, quantize=None, **kwargs):
        calls.append(quantize)
        return tiny_model(tokenizer), tokenizer

    monkeypatch.setattr(loraforge.models, "load_model", load_model)
    return calls


def config(tmp_path, out: str, *extra: str):
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_segment_data(data)
    return load_config(None, [
        "model=tiny", f"data.train={data}", "data.format=segments", "quantization=null", "adapter.method=full",
        "train.steps=6", "train.batch_size=4", "train.lr=3e-3", "train.save_every=0", "train.eval_every=0",
        "train.gradient_checkpointing=false", f"output_dir={tmp_path / out}", *extra,
    ])


def run(cfg):
    console = Console(file=io.StringIO(), width=240)
    return train(cfg, console=console), console.file.getvalue()


def ids(tokenizer):
    return torch.tensor([tokenizer.encode("t5 t9 t3 t7 t8 t7 t11 t12")])


def test_full_run_trains_every_weight_and_writes_a_transformers_model(tmp_path, tokenizer, loads):
    from transformers import AutoModelForCausalLM

    base = tiny_model(tokenizer)
    result, console = run(config(tmp_path, "full", "data.eval_fraction=0.25", "train.eval_every=1",
                                 "train.gradient_checkpointing=true"))
    assert loads == [None]
    n_params = sum(p.numel() for p in base.parameters())
    assert "full  (every weight trained" in console and "100.000%" in console
    model = result.model
    assert isinstance(model, FullModel) and all(p.requires_grad for p in model.parameters())
    changed = [n for n, p in model.model.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) == len(list(base.parameters()))  # norms and embeddings too, not only linears
    evals = [r["eval_loss"] for r in log_rows(tmp_path / "full") if "eval_loss" in r]
    assert len(evals) == 6 and evals[-1] < evals[0]

    out = tmp_path / "full"
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and "fully fine-tuned" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["use_cache"] is True  # not the training value
    saved = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert sum(p.numel() for p in saved.parameters()) == n_params
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids(tokenizer)).logits, model(input_ids=ids(tokenizer)).logits,
                                   rtol=0, atol=0)


def test_full_losses_equal_without_the_fused_kernels(tmp_path, tokenizer, loads):
    """The patched norms and chunked loss give every weight its gradient (the fused projections,
    which would not, stand aside for trained weights): the curve equals transformers' forward."""
    with_kernels, _ = run(config(tmp_path, "k", "train.dtype=fp32"))  # equal at float32's precision
    patch = with_kernels.model._loraforge_kernel_patch
    assert patch.count("rmsnorm") == 5 and patch.count("loss") == 1
    assert patch.count("attention") == patch.count("mlp") == 0
    plain, _ = run(config(tmp_path, "plain", "train.kernels=false", "train.dtype=fp32"))
    assert with_kernels.losses == pytest.approx(plain.losses, rel=1e-4)
    assert plain.losses[-1] < plain.losses[0]


def test_full_refuses_a_quantized_base_and_adapter_keys(tmp_path, tokenizer):
    from loraforge.quant.replace import quantize_model

    with pytest.raises(UserError) as info:
        load_config(None, ["data.train=a.jsonl", "adapter.method=full"])  # quantization defaults to nf4
    assert "quantization: null" in info.value.message and "nf4" in info.value.message
    with pytest.raises(UserError) as info:
        load_config(None, ["data.train=a.jsonl", "adapter.method=full", "quantization=null", "adapter.r=8"])
    assert "does not apply to adapter method 'full'" in info.value.message and "adapter.r" in info.value.where
    from loraforge.train.demo import DEMO_CONFIG

    demo = load_config(DEMO_CONFIG, ["adapter.method=full"], user_file=False)  # `loraforge train adapter.method=full`
    assert demo.quantization is None and demo.adapter.r is None
    with pytest.raises(UserError, match="quantized layers.*16/32-bit base"):
        FullModel(quantize_model(tiny_model(tokenizer), "nf4"))


def test_full_resume_continues_bit_for_bit(tmp_path, tokenizer, loads, monkeypatch):
    extra = ("train.save_every=2",)
    full, _ = run(config(tmp_path, "whole", *extra))
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            run(config(tmp_path, "split", *extra))
    last = checkpoint.latest_checkpoint(tmp_path / "split")
    assert last.name == "step-000003" and (last / "model" / "model.safetensors").is_file()
    resumed, _ = run(config(tmp_path, "split", *extra, "resume=true"))
    assert resumed.losses == full.losses[3:]
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
