"""GPT-NeoX (Pythia), GPT-2 (Conv1D projections), Falcon, Phi (Phi-2) and StableLM: loaded models
compute what transformers computes, adapters interchange with PEFT both ways (PEFT on the
unmodified transformers model, GPT-2's Conv1D with ``fan_in_fan_out`` as PEFT sets it), one
training step gives PEFT's loss and adapter gradients, and ``loraforge merge`` writes a folder
plain transformers loads into the adapted model's logits."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from helpers_adapters import peft_key, randomize
from helpers_models import sample_ids, save_folder

from loraforge.adapters import LoraConfig, attach, load_adapter
from loraforge.adapters.io import adapter_tensors
from loraforge.cli import main
from loraforge.models import load_model

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

CONFIGS = {
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128, tie_word_embeddings=False),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "phi": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128),
    "stablelm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128),
}
TOL = dict(atol=1e-5, rtol=1e-5)


def hf_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=128, bos_token_id=1, eos_token_id=2, **CONFIGS[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


# DoRA on GPT-2: its weight norm is the architecture-specific part (Conv1D's transposed layout)
@pytest.mark.parametrize(("model_type", "method"), [(t, "lora") for t in CONFIGS] + [("gpt2", "dora")])
def test_architecture_interchanges_with_peft_and_merges(tmp_path, model_type, method):
    from transformers import AutoModelForCausalLM

    ids = sample_ids()
    folder = save_folder(hf_model(model_type), tmp_path / "base")
    fresh = lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # noqa: E731

    ours, _ = load_model(folder, compute_dtype=torch.float32)
    with torch.no_grad():
        base_logits = ours(input_ids=ids).logits
    torch.testing.assert_close(base_logits, fresh()(input_ids=ids).logits, rtol=0, atol=0)
    dora = method == "dora"

    # ours -> PEFT
    am = attach(ours, LoraConfig(r=4, alpha=8, use_dora=dora))
    randomize([p for _, p in am.trainable_parameters()], seed=1)
    with torch.no_grad():
        ours_logits = am(input_ids=ids).logits
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapter matters
    am.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is (model_type == "gpt2")
    theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path / "ours")
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours_logits, **TOL)

    # PEFT -> ours, and one training step
    pm = peft.get_peft_model(fresh(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=dora, target_modules="all-linear"))
    randomize([p for _, p in pm.named_parameters() if p.requires_grad], seed=2)
    pm.save_pretrained(tmp_path / "peft")
    am2 = load_adapter(load_model(folder, compute_dtype=torch.float32)[0], tmp_path / "peft", is_trainable=True)
    torch.testing.assert_close(am2(input_ids=ids).logits, pm(input_ids=ids).logits, **TOL)
    pm.train()
    am2.train()
    peft_loss = pm(input_ids=ids, labels=ids).loss
    peft_loss.backward()
    ours_loss = am2(input_ids=ids, labels=ids).loss
    ours_loss.backward()
    torch.testing.assert_close(ours_loss, peft_loss, **TOL)
    ours_params = adapter_tensors(am2, "default")
    peft_grads = {peft_key(n): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert set(peft_grads) == {k for k, p in ours_params.items() if p.requires_grad}
    for key, grad in peft_grads.items():
        torch.testing.assert_close(ours_params[key].grad, grad, atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")

    # merge: a plain folder with the adapted model's logits
    assert main(["merge", str(folder), "--adapter", str(tmp_path / "ours"), "--out", str(tmp_path / "merged"),
                 "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(merged(input_ids=ids).logits, ours_logits, **TOL)


def test_conv1d_linear_keeps_the_conv1d_state_dict():
    from transformers.pytorch_utils import Conv1D

    from loraforge.models.conv1d import Conv1DLinear

    torch.manual_seed(0)
    conv = Conv1D(8, 8)  # square: the layout cannot be told from the shape
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    layer = Conv1DLinear.from_conv1d(conv)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-6)
    assert torch.equal(layer.state_dict()["weight"], conv.weight)
    other = Conv1DLinear(8, 8)
    other.load_state_dict(conv.state_dict())
    assert torch.equal(other.weight, conv.weight.t())


@pytest.mark.parametrize("model_type", ["gpt2", "falcon"])
def test_dense_only_architectures_refuse_4bit(tmp_path, model_type):
    from loraforge.errors import UserError

    folder = save_folder(hf_model(model_type), tmp_path / "base")
    with pytest.raises(UserError, match="4-bit quantization of"):
        load_model(folder, quantize="nf4")
    assert main(["quantize", str(folder), "--out", str(tmp_path / "nf4")]) == 2
