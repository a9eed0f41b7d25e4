"""Checkpoints move both ways between loraforge and transformers + bitsandbytes (CPU, fp32 compute):

- ``loraforge quantize`` writes the files transformers + bitsandbytes write for the same model and
  settings (config.json equal, every tensor equal), they load in transformers + bitsandbytes and
  give loraforge's own 4-bit logits (tolerance 1e-4);
- a checkpoint saved by transformers + bitsandbytes loads in loraforge (without bitsandbytes)
  and gives bitsandbytes' logits;
for NF4 and FP4, with and without double quantization, and for every supported architecture.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers_models import logits, sample_ids, save_folder, smollm2_first_layers, smollm2_loads, tiny_tokenizer
from safetensors.torch import load_file

from loraforge.cli import main
from loraforge.models import SUPPORTED_ARCHITECTURES, load_model, memory_stats, save_quantized
from loraforge.models.validate import DENSE_ONLY_ARCHITECTURES

pytest.importorskip("bitsandbytes")
# bitsandbytes 0.50.2's native CPU 4-bit dequantization assumes blocks never cross a weight row
# (it is wrong when in_features % blocksize != 0, where loraforge and bitsandbytes' CUDA/default
# paths flatten row-major): every in_features here is a multiple of the block size.
WIDE = dict(intermediate_size=128)
COMBOS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def bnb_config(quant_type: str, double_quant: bool, storage=torch.uint8):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=storage,
    )


def load_with_bitsandbytes(folder, **kwargs):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kwargs).eval()
    finally:
        logging.enable_progress_bar()
    # On AVX512-BF16 CPUs bitsandbytes' eval-mode fast path repacks the weights and computes in
    # bfloat16 whatever the compute dtype (and fails when in_features % blocksize != 0): turn it
    # off so that the reference computes in fp32 as configured.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def linear_kinds(model) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(("_proj", "lm_head"))}


@pytest.mark.parametrize("quant_type,double_quant", COMBOS)
def test_quantize_command_output_loads_in_bitsandbytes(tmp_path, tiny_llama, capsys, quant_type, double_quant):
    folder = save_folder(tiny_llama(**WIDE), tmp_path / "fp32")
    out = tmp_path / "ours"
    argv = ["quantize", str(folder), "--out", str(out), "--type", quant_type]
    assert main(argv + ([] if double_quant else ["--no-double-quant"])) == 0
    printed = capsys.readouterr().out
    assert "before:" in printed and "after:" in printed and "bits/param" in printed

    ours, _ = load_model(folder, quantize=quant_type, double_quant=double_quant)
    theirs = load_with_bitsandbytes(out)
    assert set(linear_kinds(theirs).values()) == {"Linear4bit", "Linear"}
    ids = sample_ids()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=1e-4, rtol=0)

    # The very files transformers + bitsandbytes write for this model and these settings.
    reference = tmp_path / "reference"
    load_with_bitsandbytes(folder, quantization_config=bnb_config(quant_type, double_quant)).save_pretrained(reference)
    assert json.loads((out / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    mine, ref = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert sorted(mine) == sorted(ref)
    for key in ref:
        if ".quant_state." in key:
            assert json.loads(bytes(mine[key].tolist())) == json.loads(bytes(ref[key].tolist())), key
        else:
            assert mine[key].dtype == ref[key].dtype and torch.equal(mine[key], ref[key]), key

    # loraforge reads its own checkpoint back to the same model.
    again, tokenizer = load_model(out)
    assert torch.equal(logits(again, ids), logits(ours, ids))
    assert tokenizer.chat_template is not None


@pytest.mark.parametrize(
    "quant_type,double_quant,storage",
    [(*c, torch.uint8) for c in COMBOS] + [("nf4", True, torch.bfloat16)],
    ids=lambda v: str(v).removeprefix("torch."),
)
def test_bitsandbytes_checkpoint_loads_in_loraforge(tmp_path, tiny_llama, quant_type, double_quant, storage):
    from loraforge.quant.linear import QuantLinear

    folder = save_folder(tiny_llama(tie_word_embeddings=quant_type == "fp4", **WIDE), tmp_path / "fp32")
    config = bnb_config(quant_type, double_quant, storage)
    theirs = load_with_bitsandbytes(folder, quantization_config=config)
    saved = tmp_path / "bnb"
    theirs.save_pretrained(saved)
    tiny_tokenizer().save_pretrained(saved)

    ours, _ = load_model(saved)
    layers = [m for n, m in ours.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and {m.quant_type for m in layers} == {quant_type}
    assert isinstance(ours.lm_head, torch.nn.Linear)
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = sample_ids()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-4, rtol=0)


def test_bnb_folder_compute_dtype_and_requantize_refusal(tmp_path, tiny_llama):
    from loraforge.errors import UserError
    from loraforge.quant.linear import QuantLinear

    folder = save_folder(tiny_llama(**WIDE), tmp_path / "fp32")
    model, tokenizer = load_model(folder, quantize="nf4")
    out = save_quantized(model, tokenizer, tmp_path / "nf4")
    half, _ = load_model(out, compute_dtype="bf16")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {m.compute_dtype for m in half.modules() if isinstance(m, QuantLinear)} == {torch.bfloat16}
    ids = sample_ids()
    full = logits(model, ids)
    assert (logits(half, ids) - full).norm() < 0.05 * full.norm()
    assert load_model(out, quantize="nf4")[0] is not None  # the stored type: nothing to do
    with pytest.raises(UserError, match="already quantized"):
        load_model(out, quantize="fp4")


def tiny_config(model_type: str):
    from transformers import AutoConfig

    shape = dict(head_dim=16) if model_type != "falcon" else {}  # falcon derives it (read-only)
    return AutoConfig.for_model(
        model_type, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape,
    )


@pytest.mark.parametrize("model_type", [t for t in SUPPORTED_ARCHITECTURES if t not in DENSE_ONLY_ARCHITECTURES])
def test_supported_architectures(tmp_path, model_type, capsys):
    """Each supported type quantizes, loads in bitsandbytes, and loads back in loraforge (meta
    skeleton + its non-persistent buffers: rotary frequencies, Gemma's embedding scale) alike."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    folder = save_folder(model, tmp_path / "fp32")
    assert main(["quantize", str(folder), "--out", str(tmp_path / "nf4")]) == 0
    ours, _ = load_model(tmp_path / "nf4")
    theirs = load_with_bitsandbytes(tmp_path / "nf4")
    ids = sample_ids()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-4, rtol=0)
    full = logits(model, ids)
    assert (logits(ours, ids) - full).norm() < 0.2 * full.norm()  # 4-bit, yet the same model


@pytest.mark.slow
def test_smollm2_layers_round_trip_through_bitsandbytes(tmp_path, smollm2_gguf):
    """The real SmolLM2 weights and tokenizer (its first 2 of 30 layers, to keep the test cheap:
    quantizing and running all 30 on 2 shared CPU cores takes minutes)."""
    from loraforge.quant.replace import quantize_model

    loads = smollm2_loads()
    model = smollm2_first_layers(2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize_model(model, quant_type="nf4")
    out = save_quantized(model, loads["tokenizer"], tmp_path / "smollm2-nf4")
    theirs = load_with_bitsandbytes(out)
    ours, tokenizer = load_model(out)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-4, rtol=0)
    assert torch.equal(logits(ours, ids), logits(model, ids))
    on_disk = (out / "model.safetensors").stat().st_size
    assert abs(on_disk - memory_stats(ours).bytes) < 0.01 * on_disk  # describe_memory's accounting
