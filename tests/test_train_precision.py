"""train.dtype: auto picks bf16 autocast exactly where the device multiplies bfloat16 natively;
under bf16 the frozen base is held in bfloat16 while everything trained stays float32, and a
run computes what the float32 run computes to bfloat16's precision (fused kernels included)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import loraforge.models
import loraforge.train.precision as precision
from loraforge.errors import UserError
from loraforge.kernels.cross_entropy import linear_cross_entropy
from loraforge.quant.linear import QuantLinear
from loraforge.quant.replace import cast_unquantized, quantize_model
from loraforge.train.config import load_config
from loraforge.train.loop import train
from loraforge.train.precision import decide_precision

from helpers_train import smollm2_tokenizer, tiny_model, write_chat_data

CPU = torch.device("cpu")


@pytest.fixture
def tokenizer(smollm2_gguf):
    return smollm2_tokenizer(smollm2_gguf)


def fake_cpu(monkeypatch, **flags):
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: dict(flags))


def test_config_default_is_auto_and_a_bad_value_says_what_was_meant():
    assert load_config(None, ["data.train=t.jsonl"]).train.dtype == "auto"
    with pytest.raises(UserError) as info:
        load_config(None, ["data.train=t.jsonl", "train.dtype=bf61"])
    assert "train.dtype" in str(info.value) and 'did you mean "bf16"' in str(info.value)


def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    for flags in ({"avx512_bf16": True}, {"amx_bf16": True, "avx512_bf16": True}):
        fake_cpu(monkeypatch, **flags)
        chosen = decide_precision("auto", CPU)
        assert chosen.bf16 and "auto: this CPU has" in chosen.reason and "BF16" in chosen.reason
    fake_cpu(monkeypatch, avx2=True, avx512_bf16=False)
    assert not decide_precision("auto", CPU).bf16
    forced = decide_precision("bf16", CPU)
    assert forced.bf16 and "emulated" in forced.reason
    fake_cpu(monkeypatch, avx512_bf16=True)
    assert not decide_precision("fp32", CPU).bf16
    assert "emulated" not in decide_precision("bf16", CPU).reason


def test_what_each_precision_implies():
    bf16, fp32 = decide_precision("bf16", CPU), decide_precision("fp32", CPU)
    assert bf16.base_dtype(trains_base=False) == torch.bfloat16
    assert bf16.base_dtype(trains_base=True) is None  # adapter.method: full keeps fp32 master weights
    assert fp32.base_dtype(trains_base=False) is None
    assert (bf16.activation_bytes, fp32.activation_bytes) == (2, 4)
    assert (bf16.mask_dtype, fp32.mask_dtype) == (torch.bfloat16, torch.float32)
    with bf16.autocast(CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with fp32.autocast(CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_quantized_codes_do_not_depend_on_the_compute_dtype(tokenizer):
    plain = quantize_model(tiny_model(tokenizer), "nf4")
    bf16 = cast_unquantized(quantize_model(tiny_model(tokenizer), "nf4", compute_dtype=torch.bfloat16), torch.bfloat16)
    for (name, a), (_, b) in zip(plain.named_modules(), bf16.named_modules()):
        if isinstance(a, QuantLinear):
            assert b.compute_dtype == torch.bfloat16
            assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers())), name
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.model.norm.weight.dtype == torch.bfloat16
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32


def test_linear_cross_entropy_under_autocast_matches_the_lm_head_loss():
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    labels = torch.randint(0, 300, (40,))
    labels[::5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, labels)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), labels)
    (g_ours_h, g_ours_w) = torch.autograd.grad(ours, (hidden, weight))
    (g_ref_h, g_ref_w) = torch.autograd.grad(ref, (hidden, weight))
    assert ours.dtype == torch.float32 and g_ours_h.dtype == hidden.dtype and g_ours_w.dtype == weight.dtype
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g_ours_h, g_ref_h, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(g_ours_w, g_ref_w, rtol=2e-2, atol=2e-3)


def run(tmp_path, tokenizer, monkeypatch, name: str, *extra: str):
    """A short LoRA run on the tiny Llama, loaded in the dtype the loop asks for."""
    seen = {}

    def load_model(source, quantize=None, compute_dtype=None, **kwargs):
        seen["compute_dtype"] = compute_dtype
        model = tiny_model(tokenizer)
        if quantize is not None:
            quantize_model(model, quantize, compute_dtype=compute_dtype)
            if compute_dtype is not None:
                cast_unquantized(model, compute_dtype)
        elif compute_dtype is not None:
            model.to(compute_dtype)
        return model, tokenizer

    monkeypatch.setattr(loraforge.models, "load_model", load_model, raising=False)
    data = write_chat_data(tmp_path / "chat.jsonl")
    config = load_config(None, [f"data.train={data}", "quantization=null", "adapter.r=8", "train.steps=6",
                                "train.batch_size=4", "train.lr=1e-2", "train.eval_every=0",
                                "train.gradient_checkpointing=false", f"output_dir={tmp_path / name}", *extra])
    out = io.StringIO()
    result = train(config, console=Console(file=out, width=200))
    return result, seen["compute_dtype"], out.getvalue()


@pytest.mark.parametrize("quantization", ["quantization=null", "quantization.type=nf4"])
def test_a_bf16_run_trains_fp32_adapters_on_a_bf16_base_and_tracks_the_fp32_run(tmp_path, tokenizer, monkeypatch,
                                                                                quantization):
    fp32, fp32_dtype, _ = run(tmp_path, tokenizer, monkeypatch, "fp32", "train.dtype=fp32", quantization)
    bf16, bf16_dtype, banner = run(tmp_path, tokenizer, monkeypatch, "bf16", "train.dtype=bf16", quantization)
    assert (fp32_dtype, bf16_dtype) == (None, torch.bfloat16)
    assert "dtype: bf16 autocast" in banner
    trained = [p for p in bf16.model.parameters() if p.requires_grad]
    frozen = [p for p in bf16.model.parameters() if not p.requires_grad and p.is_floating_point()]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(torch.isfinite(torch.tensor(bf16.losses)))
    assert bf16.losses[-1] < bf16.losses[0] - 0.1  # it learns
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-3)  # the same computation to bf16's precision


def test_fused_kernels_under_bf16_compute_what_transformers_forward_computes(tmp_path, tokenizer, monkeypatch):
    fused, _, _ = run(tmp_path, tokenizer, monkeypatch, "fused", "train.dtype=bf16", "train.kernels=true")
    plain, _, _ = run(tmp_path, tokenizer, monkeypatch, "plain", "train.dtype=bf16", "train.kernels=false")
    patch = fused.model._loraforge_kernel_patch
    assert patch.count("attention") == patch.count("mlp") == 2 and patch.count("loss") == 1
    assert fused.losses == pytest.approx(plain.losses, rel=2e-3)


def test_on_a_cpu_the_fused_attention_runs_bf16_scores_in_float32(monkeypatch):
    """CPU flash attention is twice as slow in bf16 as in fp32 (forward + backward): the fused
    block hands it float32 and returns bf16; the loss and gradients stay those of the bf16 model."""
    from transformers import LlamaForCausalLM

    from loraforge.adapters import attach
    from loraforge.adapters.lora import LoraConfig
    from loraforge.kernels.patch import apply_kernels

    from conftest import tiny_llama_config

    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: seen.append(q.dtype) or real(q, k, v, *a, **kw))

    def loss_and_grads(kernels: bool):
        torch.manual_seed(0)
        model = attach(LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).train(),
                       LoraConfig(r=4, alpha=8, init="gaussian"))
        if kernels:
            apply_kernels(model)
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), [p.grad for p in model.parameters() if p.requires_grad]

    plain, plain_grads = loss_and_grads(kernels=False)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    fused, fused_grads = loss_and_grads(kernels=True)
    assert seen and set(seen) == {torch.float32}
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=0)
    for a, b in zip(fused_grads, plain_grads):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 0.05 * b.norm()
