"""AdaLoRA against PEFT: budget schedule, importance EMAs, global masking and the final mask
(our RankAllocator vs PEFT's on the same parameters and gradients), the orthogonal regulariser
(PEFT's loss on the same adapter), and the trimmed save (PEFT loads it with our logits)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers_adapters import tiny_model
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator

from loraforge.adapters import attach, load_adapter
from loraforge.adapters.adalora import AdaloraConfig, RankAllocator
from loraforge.adapters.method_hooks import training_hooks
from loraforge.errors import UserError

TOL = {"atol": 1e-5, "rtol": 1e-5}


pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def peft_config(c: AdaloraConfig) -> peft.AdaLoraConfig:
    return peft.AdaLoraConfig(init_r=c.init_r, target_r=c.target_r, tinit=c.tinit, tfinal=c.tfinal, deltaT=c.delta_t,
                              beta1=c.beta1, beta2=c.beta2, total_step=c.total_step, lora_alpha=c.alpha,
                              target_modules="all-linear")


def adalora_model(**kw):
    config = AdaloraConfig(**{"init_r": 6, "target_r": 2, "alpha": 8, **kw})
    return attach(tiny_model(0), config), config


def batch(seed=5):
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tinit,tfinal,delta_t,total", [(0, 0, 1, 20), (3, 4, 2, 20), (5, 0, 3, 17)])
def test_budget_schedule_matches_peft(tinit, tfinal, delta_t, total):
    am, config = adalora_model(tinit=tinit, tfinal=tfinal, delta_t=delta_t, total_step=total)
    ours = RankAllocator({k: am.model.get_submodule(k) for k in am.targets["default"]}, "default", config)
    theirs = PeftRankAllocator(am.model, peft_config(config), "default")
    assert (ours.init_budget, ours.target_budget) == (theirs.init_bgt, theirs.target_bgt) == (14 * 6, 14 * 2)
    for step in range(total + 3):
        assert ours.budget(step) == theirs.budget_schedule(step), step


def _drive_peft(allocator: PeftRankAllocator, model, config, step, state):
    """PEFT's AdaLoraModel.update_and_allocate, step for step."""
    end = config.total_step - config.tfinal
    if step < end:
        _, pattern = allocator.update_and_allocate(model, step)
        if pattern:
            state["pattern"] = pattern
    elif step == end:
        _, state["pattern"] = allocator.update_and_allocate(model, step, force_mask=True)
        allocator.reset_ipt()
    else:
        allocator.mask_using_rank_pattern(model, state["pattern"])


@pytest.mark.parametrize("tinit,tfinal,delta_t", [(0, 0, 1), (2, 3, 2)])
def test_masking_matches_peft_allocator(tinit, tfinal, delta_t):
    total = 12
    ours_am, config = adalora_model(tinit=tinit, tfinal=tfinal, delta_t=delta_t)
    hooks = training_hooks(ours_am, "default", total)
    theirs_model = copy.deepcopy(ours_am.model)
    theirs = PeftRankAllocator(theirs_model, peft_config(config), "default")
    state: dict = {}
    ours_params = dict(ours_am.model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    for step in range(1, total + 1):
        with torch.no_grad():  # a stand-in optimizer step and fresh gradients, the same on both
            for name, p in theirs_model.named_parameters():
                if "lora_" not in name:
                    continue
                delta, grad = torch.randn(p.shape, generator=gen) * 0.05, torch.randn(p.shape, generator=gen)
                for q in (p, ours_params[name]):
                    q.add_(delta)
                    q.grad = grad.clone()
        hooks.after_optimizer_step(step, lr=1e-3)
        _drive_peft(theirs, theirs_model, config, step, state)
        for name, p in theirs_model.named_parameters():
            if "lora_E" in name:
                torch.testing.assert_close(ours_params[name], p, atol=0, rtol=0, msg=f"step {step}: {name}")
        if "pattern" in state:
            expected = {k.removesuffix(".lora_E.default"): v for k, v in state["pattern"].items()}
            assert config.rank_pattern == expected, step
    ranks = hooks.allocator.ranks()
    assert sum(ranks.values()) <= config.target_r * len(ranks)
    assert min(ranks.values()) < max(ranks.values())  # the budget moved between modules


def test_orthogonal_regulariser_matches_peft_loss(tmp_path):
    am, _ = adalora_model(total_step=10)
    with torch.no_grad():
        for p in am.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    am.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model(0), tmp_path, is_trainable=True)
    ids = batch()
    ours_loss = am(input_ids=ids, labels=ids).loss + training_hooks(am, "default", 10).extra_loss()
    torch.testing.assert_close(ours_loss, theirs(input_ids=ids, labels=ids).loss, **TOL)


def _train(am, steps, lr=5e-3):
    hooks = training_hooks(am, "default", steps)
    params = [p for p in am.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(1, steps + 1):
        ids = batch(step)
        loss = am(input_ids=ids, labels=ids).loss
        loss = loss + hooks.extra_loss()
        loss.backward()
        opt.step()
        logs = hooks.after_optimizer_step(step, lr)
        opt.zero_grad()
    return hooks, logs


def test_trained_adapter_is_trimmed_and_peft_gives_same_logits(tmp_path):
    am, _ = adalora_model(tinit=1, tfinal=2)
    hooks, logs = _train(am, 8)
    ranks = hooks.allocator.ranks()
    assert logs == {"budget": 28, "rank": 28} and sum(ranks.values()) == 28
    am.save_pretrained(tmp_path)
    ids = batch(99)
    ours = am(input_ids=ids).logits

    theirs = peft.PeftModel.from_pretrained(tiny_model(0), tmp_path)
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours, **TOL)
    for key, r in ranks.items():  # PEFT rebuilt the trimmed shapes from rank_pattern
        assert theirs.base_model.model.get_submodule(key).lora_E["default"].shape == (r, 1)

    am.merge()  # the SVD-form update folds into the base weight
    torch.testing.assert_close(am(input_ids=ids).logits, ours, **TOL)
    am.unmerge()

    again = load_adapter(tiny_model(0), tmp_path)
    torch.testing.assert_close(again(input_ids=ids).logits, ours, **TOL)
    assert again.model.get_submodule(next(iter(ranks))).lora_A["default"].shape[0] == ranks[next(iter(ranks))]
    with pytest.raises(UserError, match="rank pruning"):
        training_hooks(load_adapter(tiny_model(0), tmp_path, is_trainable=True), "default", 8)


def test_peft_saved_adalora_loads_with_its_logits(tmp_path):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_model(0), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=5, lora_alpha=16,
                                                                    target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    ids = batch()
    ours = load_adapter(tiny_model(0), tmp_path)
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, **TOL)


def test_schedule_errors_name_the_key():
    with pytest.raises(UserError, match="target_r"):
        AdaloraConfig(init_r=4, target_r=8)
    am, _ = adalora_model(tinit=5, tfinal=5)
    with pytest.raises(UserError, match="tinit"):
        training_hooks(am, "default", 10)
