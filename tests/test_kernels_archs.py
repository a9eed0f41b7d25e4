"""apply_kernels on every architecture the fused kernels cover, as tiny random transformers models
(2 layers, hidden 32, vocab 64, float32), LoRA and DoRA on all linear layers:

- every attention, MLP, RMSNorm and the loss are patched (no notice);
- kernels on vs off: the same loss and the same gradients of every adapter tensor (A, B, and
  DoRA's magnitude, perturbed from its init so that the scale is not 1), relative error <= 1e-5,
  on the reference path (LoRA and DoRA) and with the Triton kernels under ``TRITON_INTERPRET=1``
  (DoRA only, to keep the interpreter's time down: the Triton kernels -- norms, RoPE, gated
  activations, loss rows -- are the same for both methods, and DoRA runs the LoRA products too);
- the same greedy tokens from ``generate`` (KV cache, the no-labels path through the fused
  attention and MLP), and the same gradients again with every layer checkpointed (the re-run
  path: the skipped base down_proj where the architecture allows it, DoRA's reused norm);
- the per-architecture features are exercised: Qwen2's q/k/v biases, Qwen3 / Gemma 3 per-head
  and OLMo 2 whole-projection q/k norms, Gemma's (1 + w) norm, GeGLU, attention and final-logit
  soft-capping and sliding windows shorter than the sequence, Phi-3's fused qkv / gate_up and
  partial rotary, Granite's four multipliers, Mistral's sliding window.
"""

from __future__ import annotations

import pytest
import torch
from helpers_kernels import reference_kernels, rel_err, triton_interpret  # noqa: F401

from loraforge.adapters import attach
from loraforge.adapters.lora import LoraConfig
from loraforge.kernels.checkpoint import disable_checkpointing, enable_checkpointing
from loraforge.kernels.patch import apply_kernels

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
SEQ = 10

# model type -> (config class, model class, config overrides, RMSNorm modules per model)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, 5),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}, 5),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 4,
                                                  "max_window_layers": 1}, 5),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, 9),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 6,
                                                     "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}, 9),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 6, "final_logit_softcapping": 3.0,
                     "layer_types": ["sliding_attention", "full_attention"]}, 13),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5, "pad_token_id": 0}, 5),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, 9),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0, "residual_multiplier": 0.5,
                                                        "attention_multiplier": 0.3, "embedding_multiplier": 2.0}, 5),
}


def _model(model_type: str, use_dora: bool):
    import transformers

    config_name, model_name, overrides, _ = ARCHS[model_type]
    config = getattr(transformers, config_name)(**{**COMMON, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).train()
    with torch.no_grad():  # Gemma's norm weights start at 0 (scale 1 + w): make every norm non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model = attach(model, LoraConfig(r=4, alpha=8, init="none", use_dora=use_dora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    return model


def _loss_and_grads(model, ids, labels):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def _check(model_type: str, use_dora: bool, capsys, generate: bool):
    model = _model(model_type, use_dora)
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (2, SEQ))
    labels = ids.clone()
    labels[0, :3] = -100
    loss0, grads0 = _loss_and_grads(model, ids, labels)
    if generate:
        lm = model.model.eval()
        tokens0 = lm.generate(ids[:, :4], max_new_tokens=6, do_sample=False)
        lm.train()
    capsys.readouterr()

    patch = apply_kernels(model)
    assert capsys.readouterr().err == ""  # nothing declined
    layers = COMMON["num_hidden_layers"]
    counts = tuple(patch.count(kind) for kind in ("rmsnorm", "attention", "mlp", "loss"))
    assert counts == (ARCHS[model_type][3], layers, layers, 1)
    loss1, grads1 = _loss_and_grads(model, ids, labels)
    assert rel_err(loss1, loss0) < 1e-5
    assert len(grads1) == len(grads0) > 0
    for a, b in zip(grads1, grads0):
        assert rel_err(a, b) < 1e-5
    if generate:
        lm.eval()
        assert torch.equal(lm.generate(ids[:, :4], max_new_tokens=6, do_sample=False), tokens0)
        lm.train()
        assert enable_checkpointing(model, skip_last=False) == layers
        loss2, grads2 = _loss_and_grads(model, ids, labels)
        disable_checkpointing(model)
        assert rel_err(loss2, loss0) < 1e-5
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads2, grads0))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("model_type", list(ARCHS))
def test_kernels_on_and_off_agree(reference_kernels, capsys, model_type, use_dora):
    _check(model_type, use_dora, capsys, generate=True)


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_kernels_on_and_off_agree_in_triton(triton_interpret, capsys, model_type):
    _check(model_type, True, capsys, generate=False)


def test_unsupported_model_type_is_named(capsys, monkeypatch):
    from loraforge.kernels import dispatch

    monkeypatch.setattr(dispatch, "_SEEN", set())  # notices print once per process
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4)
    model = attach(GPTNeoXForCausalLM(config), LoraConfig(r=2, targets=["query_key_value"]))
    patch = apply_kernels(model)
    assert patch.patched == []
    err = capsys.readouterr().err
    assert "'gpt_neox'" in err and "AdapterModel" not in err
