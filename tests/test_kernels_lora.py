"""Fused LoRA blocks with hand-written backward, the model patch and the checkpointing.

- The fused SwiGLU MLP (LoRA on gate/up/down) and the fused Q/K/V (+ O) projections against
  autograd through loraforge's own LoraLayer modules (dense and NF4 double-quantized bases): the
  output, the input gradient and every LoRA A/B gradient. Relative error <= 1e-5 (float32);
  the MLP also with the Triton SwiGLU kernels (interpreted) and with bfloat16 inputs (<= 2e-2).
- DoRA adapters and frozen base biases fuse too: the same checks on DoRA layers (magnitude
  gradients included) with biased bases, for the MLP (GeGLU and Phi-3's fused gate_up too) and
  the projections.
- What does not qualify (dropout > 0, a trained bias, merged or disabled adapters) is reported
  with a reason and is not fused.
- apply_kernels on a tiny Llama with LoRA on all linear layers: the same loss and LoRA gradients
  as the unpatched model (reference path on CPU, <= 1e-5), with ignored labels; undo restores
  the class forwards; the per-layer checkpointing (offload flag on) gives the same gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_kernels import reference_kernels, rel_err, triton_interpret  # noqa: F401
from torch import nn

from loraforge.adapters import attach
from loraforge.adapters.lora import LoraConfig, LoraLayer
from loraforge.kernels.checkpoint import disable_checkpointing, enable_checkpointing
from loraforge.kernels.lora_attn import fused_projections
from loraforge.kernels.lora_linear import lora_spec
from loraforge.kernels.lora_mlp import fused_mlp
from loraforge.kernels.patch import apply_kernels
from loraforge.quant.linear import QuantLinear


def _lora(in_f, out_f, quantized=False, r=4, **config):
    base = nn.Linear(in_f, out_f, bias=config.pop("bias", False))
    base.requires_grad_(False)
    if quantized:
        base = QuantLinear.from_linear(base, quant_type="nf4", blocksize=64, double_quant=True)
    layer = LoraLayer(base)
    layer.add("default", LoraConfig(r=r, alpha=2 * r, init="none", **config), "proj")
    layer.active_adapters = ["default"]
    return layer


def _lora_params(*layers):
    """A, B (and DoRA's m) of each layer, in the order the fused Functions return their gradients."""
    params = []
    for layer in layers:
        params += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        if "default" in layer.lora_magnitude:
            params.append(layer.lora_magnitude["default"])
    return params


def _perturb_magnitudes(*layers):
    with torch.no_grad():
        for layer in layers:
            if "default" in layer.lora_magnitude:
                layer.lora_magnitude["default"].mul_(1 + 0.2 * torch.rand_like(layer.lora_magnitude["default"]))


def _check_mlp(quantized, dtype=torch.float32, tol=1e-5, act="silu", **config):
    torch.manual_seed(1)
    gate, up = _lora(64, 96, quantized, **config), _lora(64, 96, quantized, r=2, **config)
    down = _lora(96, 64, quantized, r=3, **config)
    _perturb_magnitudes(gate, up, down)
    x = torch.randn(2, 5, 64, requires_grad=True)
    dy = torch.randn(2, 5, 64)
    params = _lora_params(gate, up, down)
    specs = [lora_spec(m)[0] for m in (gate, up, down)]
    y = fused_mlp(x.to(dtype), specs, act=act)
    grads = torch.autograd.grad(y, [x, *params], dy.to(dtype))
    act_fn = F.silu if act == "silu" else lambda t: F.gelu(t, approximate="tanh")
    ref = down(act_fn(gate(x)) * up(x))
    ref_grads = torch.autograd.grad(ref, [x, *params], dy)
    assert rel_err(y, ref) < tol
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < tol
    # the checkpoint re-run skips the base down matmul: a placeholder output, the same gradients
    # (a DoRA down_proj needs its output, so it is not skipped)
    placeholder = fused_mlp(x.to(dtype), specs, skip_output=True, act=act)
    assert placeholder.shape == y.shape and (placeholder.any() == bool(config.get("use_dora")))
    for got, want in zip(torch.autograd.grad(placeholder, [x, *params], dy.to(dtype)), grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("quantized", [False, True])
def test_mlp_backward_matches_autograd(reference_kernels, quantized):
    _check_mlp(quantized)


def test_mlp_with_triton_swiglu(triton_interpret):
    _check_mlp(quantized=True)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_dora_mlp_with_bias_matches_autograd(reference_kernels, quantized, act):
    _check_mlp(quantized, act=act, use_dora=True, bias=True)


def test_dora_geglu_mlp_with_triton(triton_interpret):
    _check_mlp(quantized=True, act="gelu_tanh", use_dora=True)


@pytest.mark.parametrize("use_dora", [False, True])
def test_fused_gate_up_matches_autograd(reference_kernels, use_dora):
    """Phi-3's one gate_up_proj, split in halves [gate | up]."""
    torch.manual_seed(9)
    gate_up, down = _lora(32, 2 * 40, use_dora=use_dora), _lora(40, 32, r=2, use_dora=use_dora)
    _perturb_magnitudes(gate_up, down)
    x = torch.randn(7, 32, requires_grad=True)
    dy = torch.randn(7, 32)
    params = _lora_params(gate_up, down)
    y = fused_mlp(x, [lora_spec(gate_up)[0], lora_spec(down)[0]])
    grads = torch.autograd.grad(y, [x, *params], dy)
    g, u = gate_up(x).chunk(2, dim=-1)
    ref = down(u * F.silu(g))
    ref_grads = torch.autograd.grad(ref, [x, *params], dy)
    assert rel_err(y, ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads))


def test_mlp_bf16(reference_kernels):
    _check_mlp(quantized=False, dtype=torch.bfloat16, tol=2e-2)


def test_mlp_and_projections_under_autocast(reference_kernels):
    """bf16 autocast (the trainer's GPU mode): the fused blocks compute in bf16 and return float32
    input gradients, close to autograd of the modules under the same autocast (<= 2e-2)."""
    torch.manual_seed(3)
    gate, up, down, q = _lora(32, 48), _lora(32, 48), _lora(48, 32), _lora(32, 32)
    x = torch.randn(6, 32, requires_grad=True)
    params = _lora_params(gate, up, down, q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_mlp(x, [lora_spec(m)[0] for m in (gate, up, down)])
        (z,) = fused_projections(x, [lora_spec(q)[0]])
        out = (y.float() + z.float()).square().sum()
    grads = torch.autograd.grad(out, [x, *params])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = (down(F.silu(gate(x)) * up(x)).float() + q(x).float()).square().sum()
    ref_grads = torch.autograd.grad(ref, [x, *params])
    assert grads[0].dtype == torch.float32
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("variant", ["lora", "dora+bias"])
def test_qkv_and_o_match_autograd(reference_kernels, quantized, variant):
    torch.manual_seed(2)
    config = {"use_dora": True, "bias": True} if variant == "dora+bias" else {}
    q, k = _lora(64, 64, quantized, **config), _lora(64, 32, quantized, r=2, **config)
    o = _lora(64, 64, quantized, use_dora="use_dora" in config)
    _perturb_magnitudes(q, k, o)
    v = nn.Linear(64, 32, bias="bias" in config).requires_grad_(False)  # a projection without adapter
    x = torch.randn(3, 4, 64, requires_grad=True)
    specs = [lora_spec(m)[0] for m in (q, k, v)]
    outs = fused_projections(x, specs)
    (out_o,) = fused_projections(outs[0], [lora_spec(o)[0]])
    dys = [torch.randn_like(t) for t in (*outs[1:], out_o)]
    params = _lora_params(q, k, o)
    grads = torch.autograd.grad([*outs[1:], out_o], [x, *params], dys)
    ref_q = q(x)
    refs = [k(x), v(x), o(ref_q)]
    ref_grads = torch.autograd.grad(refs, [x, *params], dys)
    for got, want in zip([*outs[1:], out_o, *grads], [*refs, *ref_grads]):
        assert rel_err(got, want) < 1e-5


def test_unsupported_layers_are_not_fused():
    assert "dropout" in lora_spec(_lora(8, 8, dropout=0.1))[1]
    assert "dropout" in lora_spec(_lora(8, 8, dropout=0.1, use_dora=True))[1]
    trained_bias = _lora(8, 8, bias=True)
    trained_bias.base_layer.bias.requires_grad_(True)
    assert "bias" in lora_spec(trained_bias)[1]
    assert lora_spec(_lora(8, 8, use_dora=True))[0].magnitude is not None
    assert lora_spec(_lora(8, 8, bias=True))[0].bias is not None
    disabled = _lora(8, 8)
    disabled.disabled = True
    assert lora_spec(disabled)[0] is None
    assert lora_spec(_lora(8, 8))[0] is not None


def _llama_with_lora(tiny_llama, **config):
    model = tiny_llama(seed=4).train()
    model.requires_grad_(False)
    return attach(model, LoraConfig(r=4, alpha=8, init="none", **config))


def _loss_and_grads(model, ids, labels):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def test_apply_kernels_same_loss_and_grads(reference_kernels, tiny_llama):
    model = _llama_with_lora(tiny_llama)
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    loss0, grads0 = _loss_and_grads(model, ids, labels)

    patch = apply_kernels(model)
    assert (patch.count("rmsnorm"), patch.count("attention"), patch.count("mlp"), patch.count("loss")) == (5, 2, 2, 1)
    loss1, grads1 = _loss_and_grads(model, ids, labels)
    assert rel_err(loss1, loss0) < 1e-6
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads1, grads0))
    assert model(input_ids=ids).logits.shape == (2, 10, 128)  # no labels: transformers' forward

    assert enable_checkpointing(model, offload=True) == 1  # the last layer is not checkpointed
    disable_checkpointing(model)
    assert enable_checkpointing(model, offload=True, skip_last=False) == 2
    loss2, grads2 = _loss_and_grads(model, ids, labels)
    disable_checkpointing(model)
    assert rel_err(loss2, loss0) < 1e-6
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads2, grads0))

    patch.undo()
    assert "forward" not in model.model.model.layers[0].mlp.__dict__
    loss3, _ = _loss_and_grads(model, ids, labels)
    assert loss3 == loss0


def test_apply_kernels_names_model_type_module_and_reason(reference_kernels, tiny_llama, capsys, monkeypatch):
    from loraforge.kernels import dispatch

    monkeypatch.setattr(dispatch, "_SEEN", set())  # notices print once per process
    model = _llama_with_lora(tiny_llama, dropout=0.1)
    patch = apply_kernels(model)
    assert patch.count("mlp") == patch.count("attention") == 0 and patch.count("rmsnorm") == 5
    err = capsys.readouterr().err
    assert "llama: model.layers[0-1].self_attn keeps transformers' forward (q_proj: LoRA dropout > 0)" in err
    assert "llama: model.layers[0-1].mlp keeps transformers' forward (gate_proj: LoRA dropout > 0)" in err


def test_apply_kernels_on_mistral(reference_kernels):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(6)
    config = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, tie_word_embeddings=True)
    model = MistralForCausalLM(config).train().requires_grad_(False)
    model = attach(model, LoraConfig(r=2, alpha=4, init="none"))
    ids = torch.randint(0, 96, (2, 9))
    loss0, grads0 = _loss_and_grads(model, ids, ids)
    patch = apply_kernels(model)
    assert patch.count("attention") == patch.count("mlp") == patch.count("loss") == 1
    loss1, grads1 = _loss_and_grads(model, ids, ids)
    assert rel_err(loss1, loss0) < 1e-6
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads1, grads0))


def test_checkpoint_recomputes_under_the_forward_autocast(reference_kernels):
    """The re-run in backward uses the forward's autocast (else it would compute in float32)."""
    from loraforge.kernels.checkpoint import checkpoint

    torch.manual_seed(8)
    layer = nn.Linear(16, 16)
    x = torch.randn(4, 16)
    seen = []

    def run(h):
        out = layer(h)
        seen.append(out.dtype)
        return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = checkpoint(run, x)
    y.float().sum().backward()
    assert seen == [torch.bfloat16, torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.autograd.grad(layer(x).float().sum(), layer.weight)[0]
    assert rel_err(layer.weight.grad, expected) < 1e-6


def test_dora_norm_reuse_only_for_unchanged_adapters(reference_kernels):
    """Inside a checkpoint re-run the DoRA norm of the step's forward is reused; an adapter (or base
    weight) changed since then is recomputed, so the re-run never sees a stale norm."""
    from loraforge.kernels.checkpoint import _recomputing

    torch.manual_seed(10)
    layer = _lora(16, 12, use_dora=True)
    _perturb_magnitudes(layer)
    x = torch.randn(5, 16)
    for change in (lambda: layer.lora_A["default"].weight.mul_(1.5), lambda: layer.base_layer.weight.add_(0.1)):
        (first,) = fused_projections(x, [lora_spec(layer)[0]])
        with _recomputing():
            (same,) = fused_projections(x, [lora_spec(layer)[0]])
        assert torch.equal(same, first)
        with torch.no_grad():
            change()
        with _recomputing():
            (rerun,) = fused_projections(x, [lora_spec(layer)[0]])
        assert rel_err(rerun, layer(x)) < 1e-6 and rel_err(first, rerun) > 1e-3
