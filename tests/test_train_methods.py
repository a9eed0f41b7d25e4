"""``loraforge train`` with AdaLoRA, SoRA and LoftQ init, each one line of config, end to end on a
tiny Llama (vocabulary of the tiny word-level tokenizer, ``segments`` data): the loop drives the
methods' step hooks, logs their numbers, checkpoints their state and writes adapters that PEFT
(or loraforge, for LoftQ's quantized base) loads with the trained model's logits."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

import loraforge.models
import loraforge.train.checkpoint as checkpoint
import loraforge.train.loop as loop
from loraforge.errors import UserError
from loraforge.train.batches import epoch_order
from loraforge.train.build import adapter_config
from loraforge.train.config import load_config
from loraforge.train.loop import param_groups, train

from conftest import tiny_llama_config
from helpers_methods import make_tiny_tokenizer
from helpers_train import interrupt_after, log_rows

N_LAYERS = 14  # all-linear on the 2-layer tiny Llama: q, k, v, o, gate, up, down per layer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def tiny_base(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).eval()


@pytest.fixture
def loads(monkeypatch, tokenizer) -> list:
    """``loraforge.models.load_model`` returns the tiny Llama (same weights every call); records
    the quantization asked for."""
    calls = []

    def load_model(source, quantize=None, **kwargs):
        calls.append(quantize)
        return tiny_base(tokenizer), tokenizer

    monkeypatch.setattr(loraforge.models, "load_model", load_model)
    return calls


def write_segments(path, n: int = 24):
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = " ".join(f"t{rng.randrange(3, 128)}" for _ in range(rng.randrange(2, 6)))
            answer = " ".join(f"t{rng.randrange(3, 40)}" for _ in range(rng.randrange(3, 9)))
            f.write(json.dumps({"segments": [{"text": prompt, "label": False},
                                             {"text": " " + answer, "label": True}]}) + "\n")
    return path


def config(tmp_path, out: str, *extra: str):
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_segments(data)
    return load_config(None, [
        "model=tiny", f"data.train={data}", "data.format=segments", "quantization=null",
        "train.steps=8", "train.batch_size=4", "train.lr=1e-2", "train.save_every=0", "train.eval_every=0",
        "train.gradient_checkpointing=false", f"output_dir={tmp_path / out}", *extra,
    ])


def run(cfg, **kw):
    console = Console(file=io.StringIO(), width=240)
    result = train(cfg, console=console, **kw)
    return result, console.file.getvalue()


def logits(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("t5 t9 t3 t7 t8 t7 t11 t12")])
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_logits(tokenizer, folder):
    peft = pytest.importorskip("peft")
    return logits(peft.PeftModel.from_pretrained(tiny_base(tokenizer), str(folder)).eval(), tokenizer)


def cubic_budget(step: int, total: int, tinit: int, tfinal: int, b_init: int, b_target: int) -> int:
    """AdaLoRA's budget schedule (paper eq. 10, PEFT's RankAllocator.budget_schedule)."""
    if step <= tinit:
        return b_init
    if step > total - tfinal:
        return b_target
    mul = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((b_init - b_target) * mul**3 + b_target)


# --------------------------------------------------------------------------- AdaLoRA
def test_adalora_run_logs_budget_and_saves_a_trimmed_peft_adapter(tmp_path, tokenizer, loads):
    result, console = run(config(tmp_path, "ada", "adapter.method=adalora", "adapter.adalora.init_r=6",
                                 "adapter.adalora.target_r=2", "adapter.adalora.tinit=1", "adapter.adalora.tfinal=2"))
    assert loads == [None]
    rows = [r for r in log_rows(tmp_path / "ada") if "loss" in r]
    expected = [cubic_budget(t, 8, 1, 2, 6 * N_LAYERS, 2 * N_LAYERS) for t in range(1, 9)]
    assert [r["budget"] for r in rows] == expected and expected[-1] == 2 * N_LAYERS
    assert rows[0]["rank"] == 6 * N_LAYERS and rows[-1]["rank"] == 2 * N_LAYERS
    assert all(r["reg_loss"] > 0 for r in rows)
    assert f"AdaLoRA ranks kept: {2 * N_LAYERS} of {6 * N_LAYERS}" in console

    out = tmp_path / "ada"
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["lora_alpha"] == 8 and saved["total_step"] == 8
    pattern = saved["rank_pattern"]
    assert len(pattern) == N_LAYERS and sum(sum(mask) for mask in pattern.values()) == 2 * N_LAYERS
    tensors = load_file(out / "adapter_model.safetensors")
    for key, mask in pattern.items():
        module = key.removesuffix(".lora_E")
        a = next(v for k, v in tensors.items() if k.endswith(f"{module}.lora_A"))
        assert a.shape[0] == sum(mask)  # trimmed to the kept triplets
    torch.testing.assert_close(peft_logits(tokenizer, out), logits(result.model, tokenizer), rtol=1e-5, atol=1e-5)


def test_adalora_step_gradient_is_token_mean_loss_plus_weighted_regulariser_once(tmp_path, tokenizer, loads,
                                                                                 monkeypatch):
    """Step 1's gradient (2 micro-batches) equals an independent computation: the mean token loss
    over the whole step, every example run alone, plus orth_reg_weight * R added once."""
    captured, reference = [], {}
    real_clip = loop.clip_gradients

    def clip(params, max_norm):
        if not captured:
            captured.append([p.grad.clone() for p in params])
        return real_clip(params, max_norm)

    monkeypatch.setattr(loop, "clip_gradients", clip)
    cfg = config(tmp_path, "grad", "adapter.method=adalora", "adapter.adalora.init_r=4", "adapter.adalora.target_r=2",
                 "train.steps=3", "train.batch_size=2", "train.grad_accum=2", "train.max_grad_norm=0",
                 "train.dtype=fp32")
    from loraforge.data import build_dataset, load_records

    examples, _ = build_dataset(load_records(cfg.data.train), tokenizer, format="segments", max_length=512)
    first_step = [examples[i] for i in epoch_order(len(examples), cfg.train.seed, 0)[:4]]

    def on_start(adapter_model, tok):
        params = [p for p in adapter_model.parameters() if p.requires_grad]
        total, count = 0.0, 0
        for ex in first_step:
            out = adapter_model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            total = total + F.cross_entropy(out, labels, ignore_index=-100, reduction="sum")
            count += int((labels != -100).sum())
        reg = 0.0
        layers = [adapter_model.model.get_submodule(k) for k in adapter_model.targets["default"]]
        for layer in layers:
            a, b = layer.lora_A["default"], layer.lora_B["default"]
            reg = reg + torch.linalg.norm(a @ a.T - torch.eye(a.shape[0])) + torch.linalg.norm(b.T @ b - torch.eye(b.shape[1]))
        reg = 0.5 * reg / (2 * len(layers))
        (total / count + reg).backward()
        reference["grads"] = [p.grad.clone() for p in params]
        reference["reg"] = reg.item()
        for p in params:
            p.grad = None

    run(cfg, on_start=on_start)
    rows = [r for r in log_rows(tmp_path / "grad") if "loss" in r]
    assert rows[0]["reg_loss"] == pytest.approx(reference["reg"], rel=1e-5)
    assert len(captured[0]) == len(reference["grads"])
    for got, want in zip(captured[0], reference["grads"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_adalora_resume_continues_bit_for_bit(tmp_path, tokenizer, loads, monkeypatch):
    extra = ("adapter.method=adalora", "adapter.adalora.init_r=4", "adapter.adalora.target_r=2",
             "adapter.adalora.tinit=1", "adapter.adalora.tfinal=1", "train.steps=6", "train.save_every=2")
    run(config(tmp_path, "full", *extra))
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            run(config(tmp_path, "split", *extra))
    state = torch.load(checkpoint.latest_checkpoint(tmp_path / "split") / "trainer_state.pt", weights_only=True)
    assert len(state["hooks"]["sensitivity"]) == 3 * N_LAYERS and len(state["hooks"]["rank_pattern"]) == N_LAYERS
    resumed, _ = run(config(tmp_path, "split", *extra, "resume=true"))
    assert len(resumed.losses) == 3

    keys = ("loss", "budget", "rank", "reg_loss", "grad_norm")
    full = [[r[k] for k in keys] for r in log_rows(tmp_path / "full") if "loss" in r]
    split = [[r[k] for k in keys] for r in log_rows(tmp_path / "split") if "loss" in r]
    assert split == full
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config_a, config_b = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("full", "split"))
    assert config_a["rank_pattern"] == config_b["rank_pattern"]


# --------------------------------------------------------------------------- SoRA
def test_sora_run_prunes_gates_and_saves_plain_lora(tmp_path, tokenizer, loads):
    result, console = run(config(tmp_path, "sora", "adapter.method=sora", "adapter.r=4", "adapter.sora.lambda=10",
                                 "train.weight_decay=0.1"))
    rows = [r for r in log_rows(tmp_path / "sora") if "loss" in r]
    model = result.model
    layers = [model.model.get_submodule(k) for k in model.targets["default"]]
    gates = torch.cat([layer.lora_gate["default"].detach() for layer in layers])
    assert all(r["lambda"] == 10 for r in rows)
    zero = [r["gates_zero"] for r in rows]
    assert zero == sorted(zero) and 0 < zero[-1] < 1
    assert zero[-1] == pytest.approx(float((gates == 0).float().mean()))
    assert rows[-1]["l1"] == pytest.approx(10 * float(gates.abs().sum()), rel=1e-6)
    kept = sum(int((layer.lora_gate["default"] != 0).sum()) for layer in layers)
    assert f"SoRA ranks kept: {kept} of {4 * N_LAYERS}" in console

    # gates decay only through the proximal step: no weight decay on them
    groups = param_groups(model, 0.1)
    gate_ids = {id(layer.lora_gate["default"]) for layer in layers}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {id(p) for p in groups[1]["params"]} == gate_ids and not gate_ids & {id(p) for p in groups[0]["params"]}

    out = tmp_path / "sora"
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["rank_pattern"]
    ranks = {k: int((layer.lora_gate["default"] != 0).sum()) for k, layer in zip(model.targets["default"], layers)}
    tensors = load_file(out / "adapter_model.safetensors")
    for key, r in ranks.items():
        found = [v for k, v in tensors.items() if k.endswith(f"{key}.lora_A.weight")]
        assert (found[0].shape[0] if found else 0) == r
    torch.testing.assert_close(peft_logits(tokenizer, out), logits(model, tokenizer), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- LoftQ
@pytest.mark.parametrize("qtype", ["nf4", "nf2"])
def test_loftq_init_quantizes_reports_errors_and_reloads(tmp_path, tokenizer, loads, qtype):
    from loraforge.adapters import load_adapter
    from loraforge.models.load import load_model
    from loraforge.quant.linear import QuantLinear

    result, console = run(config(tmp_path, qtype, f"quantization.type={qtype}", "adapter.init=loftq", "adapter.r=4",
                                 "adapter.loftq.iterations=2", "train.steps=2"))
    assert loads == [None]  # loaded in full precision: LoftQ quantizes it
    assert "loftq model.layers.0.self_attn.q_proj" in console and f"loftq total over {N_LAYERS} layers" in console
    errors = log_rows(tmp_path / qtype)[0]
    assert errors["step"] == 0 and errors["loftq_layers"] == N_LAYERS
    assert 0 < errors["loftq_error"] < errors["quantization_error"]
    model = result.model.model
    quantized = {k: m for k, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == N_LAYERS and {m.quant_type for m in quantized.values()} == {qtype}
    assert type(model.lm_head) is torch.nn.Linear

    out = tmp_path / qtype
    base, _ = load_model(str(out / "base"))  # bitsandbytes folder (nf4) or k-bit folder (nf2)
    reloaded = load_adapter(base, out)
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(result.model, tokenizer), rtol=1e-5, atol=1e-5)
    assert "loftq" in (out / "README.md").read_text()


# --------------------------------------------------------------------------- config
def error(*overrides: str) -> UserError:
    with pytest.raises(UserError) as info:
        load_config(None, ["data.train=a.jsonl", *overrides])
    return info.value


def test_method_config_is_one_line_and_mistakes_are_named():
    ada = adapter_config(load_config(None, ["data.train=a.jsonl", "adapter.method=adalora"]).adapter)
    assert (ada.init_r, ada.target_r, ada.alpha) == (12, 8, 8.0)  # PEFT's defaults
    sora = load_config(None, ["data.train=a.jsonl", "adapter.method=sora", "adapter.sora.lambda=0.5",
                              "adapter.sora.lambda_schedule=linear"])
    assert adapter_config(sora.adapter).lambda_ == 0.5
    assert load_config(None, ["data.train=a.jsonl", "data.format=segments"]).data.format == "segments"

    c = load_config(None, ["data.train=a.jsonl", "quantization.type=nf2", "quantization.blocksize=128",
                           "adapter.init=loftq", "adapter.loftq.iterations=3"])
    loftq = adapter_config(c.adapter, c.quantization)
    assert (loftq.loftq_quantizer, loftq.loftq_bits, loftq.loftq_iterations, loftq.blocksize) == ("nf", 2, 3, 128)
    c = load_config(None, ["data.train=a.jsonl", "quantization.type=int4", "adapter.init=loftq"])
    assert adapter_config(c.adapter, c.quantization).loftq_quantizer == "uniform"

    assert "use adapter.init: loftq" in str(error("adapter.method=loftq"))
    assert "init_r" in str(error("adapter.method=adalora", "adapter.r=8"))
    assert "allocates" in str(error("adapter.method=adalora", "adapter.rank_pattern={q_proj: 4}"))
    assert "quantized base" in str(error("quantization=null", "adapter.init=loftq"))
    err = error("adapter.init=loftq", "adapter.loftq.bits=2")  # quantization.type nf4
    assert err.where == "quantization.type" and "nf2" in err.message
    assert "code book" in str(error("quantization.type=fp4", "adapter.init=loftq"))
    assert "does not apply to adapter method 'sora'" in str(error("adapter.method=sora", "adapter.init=loftq"))
    assert "target_r" in str(error("adapter.method=adalora", "adapter.adalora.target_r=20"))
    err = error("adapter.method=adalora", "adapter.adalora.tinit=5", "adapter.adalora.tfinal=5", "train.steps=10")
    assert err.where == "command-line override adapter.adalora.tinit" and "budget" in err.message
