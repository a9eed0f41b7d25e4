"""An 8-bit (LLM.int8) base under the LoRA family: the same logits as PEFT's LoRA on
transformers + bitsandbytes' 8-bit model, a real training run on ``quantization.type: llm_int8``,
the merge of its adapter into the base re-quantized row-wise as in training, and the schema."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers_infer import bpe_tokenizer, save_base, tiny_model, train_two_steps
from helpers_train import log_rows
from safetensors.torch import load_file

from loraforge.adapters import LoraConfig, attach, load_adapter
from loraforge.cli import main
from loraforge.errors import UserError
from loraforge.models import load_model
from loraforge.quant.int8_rowwise import Int8Linear
from loraforge.train.build import load_base
from loraforge.train.config import load_config
from loraforge.train.precision import decide_precision


@pytest.fixture(autouse=True)
def _quiet_bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16"


def _ids(tok):
    return torch.tensor([tok.encode("hello world, the quick brown fox jumps over the lazy dog")])


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits.float()


def test_lora_on_int8_base_matches_peft_on_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tok = bpe_tokenizer()
    base = save_base(tiny_model(tok), tok, tmp_path / "base")
    theirs = AutoModelForCausalLM.from_pretrained(base, device_map="cpu",
                                                  quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    ids = _ids(tok)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(3)
    for name, param in theirs.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()

    ours, _ = load_model(base, quantize="llm_int8")
    assert isinstance(ours.model.layers[0].self_attn.q_proj, Int8Linear)
    ours = load_adapter(ours, tmp_path / "adapter")
    want = _logits(theirs, ids)
    with theirs.disable_adapter():
        assert (want - _logits(theirs, ids)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(_logits(ours, ids), want, rtol=0, atol=1e-5)


def test_kernels_leave_an_int8_base_to_its_own_product(capsys):
    from loraforge.kernels.patch import apply_kernels

    tok = bpe_tokenizer()
    model = tiny_model(tok)
    from loraforge.quant.replace import quantize_model

    quantize_model(model, quant_type="llm_int8")
    am = attach(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
    ids = _ids(tok)
    before = _logits(am, ids)
    patch = apply_kernels(am)
    assert patch.count("attention") == 0 and patch.count("mlp") == 0 and patch.count("rmsnorm") > 0
    assert "Int8Linear computes its own product" in capsys.readouterr().err
    torch.testing.assert_close(_logits(am, ids), before, rtol=0, atol=1e-6)
    patch.undo()


def test_pissa_on_int8_base_requantizes_the_residual():
    tok = bpe_tokenizer()
    model = tiny_model(tok)
    from loraforge.quant.replace import quantize_model

    quantize_model(model, quant_type="llm_int8", threshold=4.0)
    before = model.model.layers[0].self_attn.q_proj.dequantize(torch.float32)
    am = attach(model, LoraConfig(r=4, alpha=8, init="pissa", targets=["q_proj"]))
    layer = am.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Int8Linear) and layer.base_layer.threshold == 4.0
    rebuilt = layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")
    assert (rebuilt - before).abs().max() < 0.05 * before.abs().max()


def _int8_run(tmp_path, tok, *, method="lora"):
    base = save_base(tiny_model(tok), tok, tmp_path / "base")
    run = train_two_steps(tmp_path, base, "{type: llm_int8, llm_int8_threshold: 3.0}",
                          f"{{method: {method}, r: 4, alpha: 8, targets: [q_proj, v_proj, up_proj]}}")
    return base, run


def test_training_on_int8_base_and_merging_into_it(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    tok = bpe_tokenizer()
    base, run = _int8_run(tmp_path, tok)
    assert "quantization: llm_int8 (row-wise int8, outlier threshold 3)" in capsys.readouterr().out
    losses = [r["loss"] for r in log_rows(run) if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == "LORA"

    quantized, _ = load_model(base, quantize="llm_int8", llm_int8_threshold=3.0)
    trained = load_adapter(quantized, run)
    ids = _ids(tok)
    want = _logits(trained, ids)
    with trained.disable_adapter():
        assert (_logits(trained, ids) - want).abs().max() > 1e-3  # the adapter learned something
    capsys.readouterr()

    out = tmp_path / "merged"
    assert main(["merge", str(base), "--adapter", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    assert "quantized to llm_int8 (row-wise int8) and dequantized, as in training" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # The merged weights are the trained base's int8 rows, dequantized, plus s B A: exactly.
    weights = load_file(out / "model.safetensors")
    q_proj = trained.model.model.layers[0].self_attn.q_proj
    expected = q_proj.base_layer.dequantize(torch.float32) + q_proj.delta_weight("default")
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], expected)
    k_proj = trained.model.model.layers[0].self_attn.k_proj  # not adapted
    assert torch.equal(weights["model.layers.0.self_attn.k_proj.weight"], k_proj.dequantize(torch.float32))
    # It computes in full precision what training computed with int8 activations: close, not equal.
    assert (_logits(merged, ids) - want).abs().max() < 0.05 * want.abs().max()

    # An 8-bit folder of the same base (loraforge quantize) is merged into as stored: the same weights.
    folder = tmp_path / "base-int8"
    assert main(["quantize", str(base), "--out", str(folder), "--type", "llm_int8", "--llm-int8-threshold", "3"]) == 0
    capsys.readouterr()
    assert main(["merge", str(folder), "--adapter", str(run), "--out", str(tmp_path / "m8"), "--dtype", "fp32"]) == 0
    assert f"the 8-bit weights of {folder} (dequantized)" in capsys.readouterr().err.replace("\n", "")
    again = load_file(tmp_path / "m8" / "model.safetensors")
    assert sorted(again) == sorted(weights) and all(torch.equal(again[k], weights[k]) for k in weights)

    # --format nf4 would quantize the untouched int8 layers a second time
    assert main(["merge", str(base), "--adapter", str(run), "--out", str(tmp_path / "nf4"), "--format", "nf4"]) == 2
    assert "--format safetensors" in capsys.readouterr().err


def test_full_fine_tuning_refuses_an_int8_base(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\nquantization: {type: llm_int8}\nadapter: {method: full}\ndata: {train: d.jsonl}\n")
    with pytest.raises(UserError, match="llm_int8 base holds as quantized codes"):
        load_config(cfg)


@pytest.mark.parametrize("text,key,message", [
    ("{type: llm_int8, blocksize: 128}", "quantization.blocksize", "does not apply to llm_int8"),
    ("{type: llm_int8, double_quant: false}", "quantization.double_quant", "does not apply to llm_int8"),
    ("{type: nf4, llm_int8_threshold: 4}", "quantization.llm_int8_threshold", "applies to type llm_int8, not nf4"),
    ("{type: llm_int8, llm_int8_threshold: -1}", "quantization.llm_int8_threshold", "finite number >= 0"),
    ("{type: llm_int8, threshold: 4}", "quantization.threshold", 'did you mean "llm_int8_threshold"'),
    ("{type: llm_int8}\ntrain: {distributed: fsdp}", "train.distributed", "an llm_int8 base trains with"),
])
def test_schema_refuses_what_llm_int8_does_not_take(tmp_path, text, key, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: m\nquantization: {text}\ndata: {{train: d.jsonl}}\n")
    with pytest.raises(UserError, match=message) as err:
        load_config(cfg)
    assert f"c.yaml:{2 if key.startswith('quant') else 3} ({key})" in str(err.value)


def test_schema_accepts_llm_int8_dumped_configs_and_the_demo_override(tmp_path):
    from loraforge.train.config import dump_yaml
    from loraforge.train.demo import demo_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\nquantization: {type: llm_int8, llm_int8_threshold: 0}\ndata: {train: d.jsonl}\n")
    config = load_config(cfg)
    assert config.quantization.llm_int8_threshold == 0.0
    cfg.write_text(dump_yaml(config))  # a run's config.yaml holds every key (blocksize 64, ...): it loads again
    assert load_config(cfg).quantization == config.quantization
    q = demo_config(["quantization.type=llm_int8"]).quantization  # the demo's blocksize 64 is the default
    assert q.type == "llm_int8" and q.llm_int8_threshold is None
    with pytest.raises(UserError, match="does not apply to llm_int8"):
        demo_config(["quantization.type=llm_int8", "quantization.blocksize=128"])


@pytest.mark.parametrize("quantization", ["{type: llm_int8}", "{type: nf4, blocksize: 32}", "null"])
def test_dry_run_estimates_the_base_weights_as_loading_would_hold_them(tmp_path, capsys, quantization):
    """The dry run reads no weights, yet its figure is the one describe_memory gives for the loaded
    (and quantized) base: 8-bit rows cost 8 + 32 / in_features bits."""
    from loraforge.models import describe_memory

    tok = bpe_tokenizer()
    base = save_base(tiny_model(tok), tok, tmp_path / "base")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {base}\nquantization: {quantization}\ndata: {{train: {data}, format: messages}}\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(cfg), "--dry-run"]) == 0
    printed = capsys.readouterr().out.replace("\n", " ")
    config = load_config(cfg)
    q = config.quantization
    precision = decide_precision(config.train.dtype, torch.device("cpu"))  # as the run would load it
    loaded, _ = load_base(config, device=None, dtype=precision.base_dtype(trains_base=False))
    assert f"base weights (estimated from the model config, none loaded): {describe_memory(loaded)}" in printed
    if q is not None and q.type == "llm_int8":
        assert "in 8-bit layers at 8." in printed
