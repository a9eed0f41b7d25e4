"""LLM.int8 checkpoints move both ways between loraforge and transformers + bitsandbytes (CPU):

- ``loraforge quantize --type llm_int8`` writes the files transformers + bitsandbytes write for
  the same model (config.json equal, every tensor equal: int8 ``weight``, ``SCB``,
  ``weight_format``), they load in transformers as ``Linear8bitLt`` layers and give loraforge's
  own logits bit for bit;
- a checkpoint saved by transformers + bitsandbytes (``load_in_8bit``) loads in loraforge
  (without bitsandbytes) to the same bytes and gives bitsandbytes' logits, with the threshold it
  records.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers_models import logits, sample_ids, save_folder, smollm2_first_layers, smollm2_loads, tiny_tokenizer
from safetensors.torch import load_file

from loraforge.cli import main
from loraforge.errors import UserError
from loraforge.models import describe_memory, load_model, save_quantized
from loraforge.quant.int8_rowwise import Int8Linear

pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def _quiet_bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16"


def load_with_bitsandbytes(folder, **kwargs):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kwargs).eval()
    finally:
        hf_logging.enable_progress_bar()


def int8_config(threshold: float = 6.0):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)


def tiny_qwen2():
    """A 2-layer Qwen2: its q/k/v projections carry biases, stored beside the int8 weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantize_command_writes_what_transformers_writes(tmp_path, tiny_llama, capsys, arch):
    folder = save_folder(tiny_llama() if arch == "llama" else tiny_qwen2(), tmp_path / "fp32")
    out = tmp_path / "ours"
    assert main(["quantize", str(folder), "--out", str(out), "--type", "llm_int8"]) == 0
    printed = capsys.readouterr().out
    assert "llm_int8 (row-wise absmax, outlier threshold 6)" in printed and "8-bit layers at 8." in printed

    reference = tmp_path / "reference"
    load_with_bitsandbytes(folder, quantization_config=int8_config()).save_pretrained(reference)
    assert json.loads((out / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    mine, ref = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert sorted(mine) == sorted(ref) and any(k.endswith(".SCB") for k in ref)
    assert (arch == "qwen2") == ("model.layers.0.self_attn.q_proj.bias" in ref)
    for key in ref:
        assert mine[key].dtype == ref[key].dtype and torch.equal(mine[key], ref[key]), key

    theirs = load_with_bitsandbytes(out)
    kinds = {type(m).__name__ for n, m in theirs.named_modules() if n.endswith(("_proj", "lm_head"))}
    assert kinds == {"Linear8bitLt", "Linear"}
    ours, tokenizer = load_model(out)
    assert tokenizer.chat_template is not None
    ids = sample_ids()
    quantized, _ = load_model(folder, quantize="llm_int8")
    assert torch.equal(logits(ours, ids), logits(theirs, ids))
    assert torch.equal(logits(quantized, ids), logits(ours, ids))


@pytest.mark.parametrize("threshold,tied", [(6.0, False), (0.5, True), (0.0, False)])
def test_transformers_checkpoint_loads_in_loraforge(tmp_path, tiny_llama, threshold, tied):
    folder = save_folder(tiny_llama(tie_word_embeddings=tied), tmp_path / "fp32")
    theirs = load_with_bitsandbytes(folder, quantization_config=int8_config(threshold))
    saved = tmp_path / "bnb8"
    theirs.save_pretrained(saved)
    tiny_tokenizer().save_pretrained(saved)

    ours, _ = load_model(saved)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, Int8Linear)}
    assert len(layers) == 14 and {m.threshold for m in layers.values()} == {threshold}
    assert isinstance(ours.lm_head, torch.nn.Linear)
    if tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    for name, layer in layers.items():  # the same bytes
        reference = theirs.get_submodule(name)
        assert torch.equal(layer.qweight, reference.weight.data) and torch.equal(layer.scb, reference.weight.SCB)
    ids = sample_ids()
    assert torch.equal(logits(ours, ids), logits(theirs, ids))
    if threshold == 0.5:  # a threshold this low sends columns through the decomposition
        assert not torch.equal(logits(ours, ids), logits(load_model(folder, quantize="llm_int8",
                                                                     llm_int8_threshold=0.0)[0], ids))
    # and written again by loraforge, transformers reads it back to the same logits
    again = save_quantized(ours, tiny_tokenizer(), tmp_path / "again")
    assert torch.equal(logits(load_with_bitsandbytes(again), ids), logits(theirs, ids))


def test_int8_model_memory_and_refusals(tmp_path, tiny_llama, capsys):
    folder = save_folder(tiny_llama(), tmp_path / "fp32")
    model, tokenizer = load_model(folder, quantize="llm_int8")
    assert "8-bit layers at 8.4" in describe_memory(model) and "llm_int8, threshold 6" in describe_memory(model)
    out = save_quantized(model, tokenizer, tmp_path / "int8")
    assert load_model(out, quantize="llm_int8")[0] is not None  # the stored type: nothing to do
    relaxed, _ = load_model(out, llm_int8_threshold=2.5)  # a matmul setting: it replaces the recorded one
    assert {m.threshold for m in relaxed.modules() if isinstance(m, Int8Linear)} == {2.5}
    nf4 = save_quantized(load_model(folder, quantize="nf4")[0], tokenizer, tmp_path / "nf4")
    with pytest.raises(UserError, match="holds no llm_int8 layers"):
        load_model(nf4, llm_int8_threshold=2.5)
    with pytest.raises(UserError, match="already quantized"):
        load_model(out, quantize="nf4")

    def refused(*argv: str) -> str:
        capsys.readouterr()
        assert main(["quantize", *argv, "--out", str(tmp_path / "x")]) == 2
        return capsys.readouterr().err

    assert "already an 8-bit checkpoint" in refused(str(out), "--type", "llm_int8")
    assert "--blocksize" in refused(str(folder), "--type", "llm_int8", "--blocksize", "64")
    assert "--no-double-quant" in refused(str(folder), "--type", "llm_int8", "--no-double-quant")
    assert "belongs to --type llm_int8" in refused(str(folder), "--llm-int8-threshold", "4")
    assert "finite number >= 0" in refused(str(folder), "--type", "llm_int8", "--llm-int8-threshold", "-1")


@pytest.mark.slow
def test_smollm2_layers_through_bitsandbytes_8bit(tmp_path, smollm2_gguf):
    """The real SmolLM2 weights (its first 2 of 30 layers) and a real prompt: activations with
    outlier features above 6.0, so the decomposition runs, and still bitsandbytes' logits exactly."""
    from loraforge.quant.int8_rowwise import quantize_rowwise
    from loraforge.quant.replace import quantize_model

    loads = smollm2_loads()
    model = smollm2_first_layers(2)
    ids = loads["tokenizer"]("The capital of France is Paris. Water boils at 100 degrees.", return_tensors="pt").input_ids
    full = logits(model, ids)
    quantize_model(model, quant_type="llm_int8")
    seen = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    ours = logits(model, ids)
    hook.remove()
    assert quantize_rowwise(seen[0].reshape(-1, seen[0].shape[-1]), 6.0)[2].numel() > 0  # outlier columns
    out = save_quantized(model, loads["tokenizer"], tmp_path / "smollm2-int8")
    assert torch.equal(logits(load_with_bitsandbytes(out), ids), ours)
    assert torch.equal(logits(load_model(out)[0], ids), ours)
    assert (ours - full).norm() < 0.1 * full.norm()  # 8-bit, yet the same model
