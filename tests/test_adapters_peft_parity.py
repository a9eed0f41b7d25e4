"""LoRA, rsLoRA, DoRA and VeRA against PEFT, on a plain and on a 4-bit (NF4) base.

For each case: our saved folder loaded by ``peft.PeftModel`` gives our logits; a PEFT-saved
folder loaded by us gives PEFT's logits; one training step gives PEFT's loss and adapter
gradients. For the 4-bit base PEFT runs on a plain model holding our dequantized weights. The
tiny Llama has biases in every projection so that DoRA's bias handling is exercised.
"""

from __future__ import annotations


import peft
import pytest
import torch
from helpers_adapters import dense_copy, peft_key, quantize_nf4, randomize, tiny_model

from loraforge.adapters import LoraConfig, VeraConfig, attach, load_adapter
from loraforge.adapters.io import adapter_tensors

MODEL = dict(attention_bias=True, mlp_bias=True)
TOL = dict(atol=1e-5, rtol=1e-5)


def configs(kind: str):
    if kind == "vera":
        return VeraConfig(r=8), peft.VeraConfig(r=8, target_modules="all-linear")
    ours = dict(r=4, alpha=8, rslora=kind == "rslora", use_dora=kind == "dora",
                rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4})
    theirs = dict(r=4, lora_alpha=8, use_rslora=kind == "rslora", use_dora=kind == "dora", target_modules="all-linear",
                  rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4})
    return LoraConfig(**ours), peft.LoraConfig(**theirs)


def base_model(quant: bool):
    model = tiny_model(0, **MODEL)
    return quantize_nf4(model) if quant else model


def batch():
    gen = torch.Generator().manual_seed(5)
    return torch.randint(0, 128, (2, 12), generator=gen)


pytestmark = pytest.mark.usefixtures("quiet_single_thread")


@pytest.mark.parametrize("quant", [False, True], ids=["plain", "nf4"])
@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "vera"])
def test_interchange_with_peft(kind, quant, tmp_path):
    ids = batch()
    ours_cfg, peft_cfg = configs(kind)

    # ours -> PEFT
    ours = base_model(quant)
    reference = dense_copy(ours, 0, **MODEL)
    with torch.no_grad():
        base_logits = ours(input_ids=ids).logits
    am = attach(ours, ours_cfg)
    randomize([p for _, p in am.trainable_parameters()], seed=1)
    ours_logits = am(input_ids=ids).logits
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapter matters
    am.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(reference, tmp_path / "ours")
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours_logits, **TOL)

    # PEFT -> ours
    ours2 = base_model(quant)
    reference2 = dense_copy(ours2, 0, **MODEL)
    with torch.no_grad():
        base_logits = reference2(input_ids=ids).logits
    pm = peft.get_peft_model(reference2, peft_cfg)
    randomize([p for _, p in pm.named_parameters() if p.requires_grad], seed=2)
    pm.save_pretrained(tmp_path / "peft")
    peft_logits = pm(input_ids=ids).logits
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter matters
    am2 = load_adapter(ours2, tmp_path / "peft", is_trainable=True)
    torch.testing.assert_close(am2(input_ids=ids).logits, peft_logits, **TOL)

    # one training step: same loss, same adapter gradients
    pm.train()
    am2.train()
    peft_loss = pm(input_ids=ids, labels=ids).loss
    peft_loss.backward()
    ours_loss = am2(input_ids=ids, labels=ids).loss
    ours_loss.backward()
    torch.testing.assert_close(ours_loss, peft_loss, **TOL)
    ours_params = adapter_tensors(am2, "default")
    peft_grads = {peft_key(n): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert set(peft_grads) == set(k for k, p in ours_params.items() if p.requires_grad)
    for key, grad in peft_grads.items():
        assert grad is not None and grad.abs().max() > 0, key
        torch.testing.assert_close(ours_params[key].grad, grad, atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_projections_bit_identical(save_projection, tmp_path):
    ours = tiny_model(0)
    reference = dense_copy(ours, 0)
    am = attach(ours, VeraConfig(r=16, projection_prng_key=123, save_projection=save_projection))
    pm = peft.get_peft_model(reference, peft.VeraConfig(r=16, projection_prng_key=123, target_modules="all-linear",
                                                        save_projection=save_projection))
    assert torch.equal(am.shared["default"].vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(am.shared["default"].vera_B, pm.base_model.vera_B["default"])
    randomize([p for _, p in am.trainable_parameters()], seed=3)
    am.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert ("base_model.vera_A" in load_file(str(tmp_path / "adapter_model.safetensors"))) == save_projection
    theirs = peft.PeftModel.from_pretrained(dense_copy(tiny_model(0), 0), tmp_path)
    ids = batch()
    torch.testing.assert_close(theirs(input_ids=ids).logits, am(input_ids=ids).logits, **TOL)
