"""train.gradient_checkpointing: auto turns recomputation on only when the estimated activations
would not fit the free memory; the estimate is checked against what autograd really saves on a
tiny Llama, and the decision appears in the run's banner."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from loraforge.train.checkpointing import activation_bytes, decide_checkpointing, free_memory_bytes
from loraforge.train.config import load_config
from loraforge.train.loop import train

from conftest import tiny_llama_config
from helpers_train import smollm2_tokenizer, use_tiny_model, write_chat_data


def saved_activation_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the non-parameter tensors autograd keeps for backward (each storage once),
    measured while the forward and the loss run."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    return sum(storages.values())


@pytest.mark.parametrize("tokens", [2 * 64, 4 * 128])
def test_estimate_is_a_cautious_figure_for_what_autograd_saves(tiny_llama, tokens):
    model = tiny_llama(vocab_size=512, hidden_size=128, intermediate_size=352).train()
    for p in model.parameters():  # a frozen base with its input needing grad, as under LoRA
        p.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)
    ids = torch.randint(0, 512, (tokens // 64, 64))
    measured = saved_activation_bytes(model, ids)
    estimate = activation_bytes(model.config, tokens, dtype_bytes=4)
    assert measured <= estimate <= 2 * measured, (estimate, measured)  # 1.5x on these shapes


def test_explicit_settings_are_kept_and_auto_follows_free_memory():
    cfg = tiny_llama_config()
    cpu = torch.device("cpu")
    assert decide_checkpointing(True, cfg, cpu, 4096, 4, free=1 << 40).on
    assert not decide_checkpointing(False, cfg, cpu, 4096, 4, free=1).on
    need = activation_bytes(cfg, 4096, 4)
    roomy = decide_checkpointing("auto", cfg, cpu, 4096, 4, free=4 * need)
    tight = decide_checkpointing("auto", cfg, cpu, 4096, 4, free=need)
    assert not roomy.on and "fit in" in roomy.reason
    assert tight.on and "would not fit" in tight.reason
    assert decide_checkpointing("auto", object(), cpu, 4096, 4, free=1 << 40).on  # unknown shape: on
    assert activation_bytes(cfg, 2048, 4) == 2 * activation_bytes(cfg, 1024, 4)  # linear in tokens
    assert free_memory_bytes(cpu) > 0


def test_default_is_auto_and_the_banner_prints_the_decision(tmp_path, smollm2_gguf, monkeypatch):
    tokenizer = smollm2_tokenizer(smollm2_gguf)
    use_tiny_model(monkeypatch, tokenizer)
    data = write_chat_data(tmp_path / "chat.jsonl")
    config = load_config(None, [f"data.train={data}", "quantization=null", "adapter.r=4", "train.steps=1",
                                "train.eval_every=0", f"output_dir={tmp_path / 'out'}"])
    assert config.train.gradient_checkpointing == "auto"
    out = io.StringIO()
    result = train(config, console=Console(file=out, width=200))
    banner = out.getvalue()
    assert "checkpointing" in banner and "auto:" in banner and "fit in" in banner
    assert not any(getattr(m, "gradient_checkpointing", False) for m in result.model.modules())  # tiny: fits
