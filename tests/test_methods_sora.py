"""SoRA: the proximal gate step is the exact soft threshold by lr * lambda; gates become sparse
under a positive lambda in a short training run (and stay dense at lambda 0); the saved adapter
(pruned, gate folded into B) is plain LoRA that loraforge and PEFT load with the gated logits."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from helpers_adapters import tiny_model

from loraforge.adapters import attach, load_adapter
from loraforge.adapters.method_hooks import training_hooks
from loraforge.adapters.sora import SoraConfig, soft_threshold

TOL = {"atol": 1e-5, "rtol": 1e-5}


pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def batch(seed=5):
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_soft_threshold_is_exact():
    g = torch.tensor([0.5, -0.5, 0.25, -0.25, 0.1, -0.1, 0.0, 0.375, 3.0])
    soft_threshold(g, 0.25)
    expected = torch.tensor([0.25, -0.25, 0.0, -0.0, 0.0, 0.0, 0.0, 0.125, 2.75])
    torch.testing.assert_close(g, expected, atol=0, rtol=0)


def test_hook_shrinks_every_gate_by_lr_times_lambda():
    am = attach(tiny_model(0), SoraConfig(r=4, alpha=8, lambda_=0.5))
    gates = {k: am.model.get_submodule(k).lora_gate["default"].detach().clone() for k in am.targets["default"]}
    logs = training_hooks(am, "default", 10).after_optimizer_step(1, lr=0.2)
    for key, before in gates.items():
        after = am.model.get_submodule(key).lora_gate["default"]
        expected = torch.sign(before) * torch.clamp(before.abs() - 0.1, min=0)
        torch.testing.assert_close(after.detach(), expected, atol=0, rtol=0)
    assert 0 < logs["gates_zero"] < 1 and logs["lambda"] == 0.5


def test_linear_lambda_schedule():
    config = SoraConfig(lambda_=0.4, lambda_schedule="linear")
    assert [config.lambda_at(t, 4) for t in (1, 2, 4, 6)] == [0.1, 0.2, 0.4, 0.4]
    assert SoraConfig(lambda_=0.4).lambda_at(1, 4) == 0.4


def _train(lam: float, steps: int = 12, lr: float = 0.05):
    torch.manual_seed(0)
    am = attach(tiny_model(0), SoraConfig(r=4, alpha=8, lambda_=lam, targets=["q_proj", "v_proj", "down_proj"]))
    hooks = training_hooks(am, "default", steps)
    opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for step in range(1, steps + 1):
        ids = batch(step)
        am(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        logs = hooks.after_optimizer_step(step, lr)
        opt.zero_grad()
    return am, hooks, logs


def test_gates_become_sparse_only_under_positive_lambda():
    _, _, dense = _train(0.0)
    _, hooks, sparse = _train(1.0)
    assert dense["gates_zero"] == 0.0
    assert sparse["gates_zero"] >= 0.25
    assert hooks.finish()[0].startswith("SoRA ranks kept:")


def test_pruned_adapter_gives_gated_logits_in_loraforge_and_peft(tmp_path):
    am, _, _ = _train(1.0)
    dropped = am.targets["default"][0]  # one module loses every gate: excluded on save
    with torch.no_grad():
        am.model.get_submodule(dropped).lora_gate["default"].zero_()
    ranks = {k: am.model.get_submodule(k).kept_rank("default") for k in am.targets["default"]}
    assert ranks[dropped] == 0 and any(0 < r < 4 for r in ranks.values())
    ids = batch(99)
    gated = am(input_ids=ids).logits
    am.merge()  # the gated update folds into the base weight
    torch.testing.assert_close(am(input_ids=ids).logits, gated, **TOL)
    am.unmerge()
    am.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and dropped in config["exclude_modules"]
    theirs = peft.PeftModel.from_pretrained(tiny_model(0), tmp_path)
    torch.testing.assert_close(theirs(input_ids=ids).logits, gated, **TOL)
    ours = load_adapter(tiny_model(0), tmp_path)
    torch.testing.assert_close(ours(input_ids=ids).logits, gated, **TOL)
    for key, r in ranks.items():
        if r:
            assert ours.model.get_submodule(key).r["default"] == r
            assert theirs.base_model.model.get_submodule(key).r["default"] == r


def test_plain_methods_have_no_hooks():
    from loraforge.adapters import LoraConfig

    hooks = training_hooks(attach(tiny_model(0), LoraConfig(r=2)), "default", 5)
    assert hooks.extra_loss() is None and hooks.after_optimizer_step(1, 1e-3) == {} and hooks.finish() == []
