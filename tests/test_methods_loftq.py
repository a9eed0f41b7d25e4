"""LoftQ: matches a straightforward re-implementation of the algorithm (written here, with its
own NF-k / INT-k quantizer); error after T iterations <= after 1 < plain quantization, on random
and on real SmolLM2-135M weights; the LoRA scale s = alpha / r is folded in correctly for any
alpha; attaching quantizes the targets (mixed 4/2 bits), and save + reload gives the same logits
(4-bit base as a bitsandbytes folder, 2-bit base in loraforge's k-bit folder) while PEFT reads the
adapter as plain LoRA with the same logits on the same (dequantized) base."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from helpers_adapters import tiny_model
from helpers_methods import make_tiny_tokenizer
from torch import nn

from loraforge.adapters import LoraConfig, attach
from loraforge.adapters.loftq import LoftqConfig, load_loftq, loftq_attach, loftq_decompose, save_loftq
from loraforge.errors import UserError
from loraforge.quant.linear import QuantLinear


pytestmark = pytest.mark.usefixtures("quiet_single_thread")


# ----- an independent reference ------------------------------------------------------------------

def reference_codebook(name: str) -> torch.Tensor:
    """NF-k from the normal quantiles (QLoRA's recipe, offset 0.9677083), INT-k as linspace."""
    bits = int(name[-1])
    if name.startswith("int"):
        return torch.linspace(-1, 1, 2**bits)
    normal = torch.distributions.Normal(0.0, 1.0)
    half = 2 ** (bits - 1)
    pos = normal.icdf(torch.linspace(0.9677083, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(0.9677083, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (values / values.max()).float()


def reference_quantize(w: torch.Tensor, name: str, blocksize: int = 64) -> torch.Tensor:
    """dequant(quant(w)): nearest code of w / absmax per block of ``blocksize``."""
    code = reference_codebook(name)
    blocks = w.reshape(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True)
    idx = ((blocks / absmax).unsqueeze(-1) - code).abs().argmin(-1)
    return (code[idx] * absmax).reshape(w.shape)


def reference_loftq(w: torch.Tensor, r: int, s: float, iterations: int, name: str):
    """The paper's Algorithm 1 with the scale folded in: returns (Q, A, B)."""
    a = torch.zeros(r, w.shape[1])
    b = torch.zeros(w.shape[0], r)
    for _ in range(iterations):
        q = reference_quantize(w - s * b @ a, name)
        u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
        b = u[:, :r] @ torch.diag((sv[:r] / s).sqrt())
        a = torch.diag((sv[:r] / s).sqrt()) @ vh[:r]
    return q, a, b


def quantizer(name: str):
    def quantize(residual):
        layer = QuantLinear.from_linear(_linear(residual), quant_type=name, blocksize=64, double_quant=False)
        return layer, layer.dequantize(torch.float32)
    return quantize


def _linear(weight):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    return linear


def rel(x, w):
    return float(torch.linalg.matrix_norm(x) / torch.linalg.matrix_norm(w))


# ----- the algorithm -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["nf4", "nf2", "int2"])
def test_matches_reference_and_improves_on_random_weights(name):
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    r, s = 8, 2.0
    q_ref, a_ref, b_ref = reference_loftq(w, r, s, 3, name)
    result = loftq_decompose(w, r, s, 3, quantizer(name))
    torch.testing.assert_close(result.quantized.dequantize(torch.float32), q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(s * result.lora_b @ result.lora_a, s * b_ref @ a_ref, atol=1e-5, rtol=1e-4)
    assert result.loftq_error == pytest.approx(float(torch.linalg.matrix_norm(w - q_ref - s * b_ref @ a_ref)), rel=1e-4)
    once = loftq_decompose(w, r, s, 1, quantizer(name))
    assert result.loftq_error <= once.loftq_error < once.plain_error
    assert once.plain_error == pytest.approx(float(torch.linalg.matrix_norm(w - reference_quantize(w, name))), rel=1e-5)


def test_scale_is_folded_in_for_any_alpha():
    """s B A is the same best rank-r fit of W - Q whatever alpha is; A and B scale by 1/sqrt(s)."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    one = loftq_decompose(w, 4, 1.0, 2, quantizer("nf4"))
    eight = loftq_decompose(w, 4, 8.0, 2, quantizer("nf4"))
    torch.testing.assert_close(8.0 * eight.lora_b @ eight.lora_a, one.lora_b @ one.lora_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(eight.lora_a * 8**0.5, one.lora_a, atol=1e-5, rtol=1e-4)
    q = eight.quantized.dequantize(torch.float32)
    tail = torch.linalg.svdvals(w - q)[4:]
    assert eight.loftq_error == pytest.approx(float(tail.square().sum().sqrt()), rel=1e-4)


@pytest.fixture(scope="module")
def smollm_weights():
    from loraforge.models import load_model

    model, _ = load_model("smollm2-135m-instruct")
    layer = model.model.layers[3]
    weights = {"q_proj": layer.self_attn.q_proj.weight.detach().clone(),
               "down_proj": layer.mlp.down_proj.weight.detach().clone()}
    del model
    return weights


@pytest.mark.parametrize("name", ["nf4", "nf2"])
def test_improves_on_real_smollm2_layers(smollm_weights, name):
    for key, w in smollm_weights.items():
        one = loftq_decompose(w, 16, 1.0, 1, quantizer(name))
        three = loftq_decompose(w, 16, 1.0, 3, quantizer(name))
        assert three.loftq_error <= one.loftq_error < one.plain_error, key
        assert one.plain_error == pytest.approx(float(torch.linalg.matrix_norm(w - reference_quantize(w, name))), rel=1e-4)


# ----- attaching, saving, reloading ----------------------------------------------------------------

def test_attach_mixed_precision_save_reload_and_peft(tmp_path):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    full = tiny_model(0)
    reference = full(input_ids=ids).logits
    lines = []
    config = LoftqConfig(r=4, alpha=16, loftq_bits=2, loftq_iterations=2, loftq_mixed_4bit_layers=1, echo=lines.append)
    am = loftq_attach(tiny_model(0), config)
    kinds = {k: am.model.get_submodule(k).base_layer.quant_type for k in am.targets["default"]}
    assert {kinds[k] for k in kinds if ".0." in k} == {"nf4"} and {kinds[k] for k in kinds if ".1." in k} == {"nf2"}
    plain, loftq = config.report.totals()
    assert loftq < plain and len(lines) == len(kinds) + 1 and lines[-1].startswith("loftq total")
    ours = am(input_ids=ids).logits
    with am.disable_adapter():  # the adapter moves the quantized model towards the full one
        assert (ours - reference).abs().mean() < (am(input_ids=ids).logits - reference).abs().mean()

    save_loftq(am, make_tiny_tokenizer(), tmp_path)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True
    again, _ = load_loftq(tmp_path)
    torch.testing.assert_close(again(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)

    dense = tiny_model(0)  # PEFT on a plain model holding the dequantized Q
    with torch.no_grad():
        for key in am.targets["default"]:
            dense.get_submodule(key).weight.copy_(am.model.get_submodule(key).base_layer.dequantize(torch.float32))
    theirs = peft.PeftModel.from_pretrained(dense, tmp_path / "adapter")
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)


def test_4bit_base_saves_as_bitsandbytes_folder(tmp_path):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    am = loftq_attach(tiny_model(0), LoftqConfig(r=4, alpha=4, loftq_bits=4, echo=None))
    save_loftq(am, make_tiny_tokenizer(), tmp_path)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    again, _ = load_loftq(tmp_path)
    torch.testing.assert_close(again(input_ids=ids).logits, am(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_plain_lora_init_loftq_untargeted_layers_and_quantized_base_error():
    am = attach(tiny_model(0), LoraConfig(r=4, alpha=8, init="loftq", targets=["q_proj"]))
    layer = am.model.get_submodule(am.targets["default"][0])
    assert layer.base_layer.quant_type == "nf4" and layer.lora_B["default"].weight.abs().sum() > 0
    partial = loftq_attach(tiny_model(0), LoftqConfig(r=4, targets=["q_proj"], loftq_bits=2, loftq_mixed_4bit_layers=1,
                                                      echo=None))
    kinds = {k: m.quant_type for k, m in partial.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(kinds) == 14 and kinds["model.layers.0.mlp.up_proj"] == "nf4" and kinds["model.layers.1.mlp.up_proj"] == "nf2"
    assert isinstance(partial.model.lm_head, nn.Linear)
    model = tiny_model(0)
    attention = model.model.layers[0].self_attn
    attention.q_proj = QuantLinear.from_linear(attention.q_proj)
    with pytest.raises(UserError, match="full-precision"):
        attach(model, LoftqConfig(r=4, targets=["q_proj"], echo=None))
