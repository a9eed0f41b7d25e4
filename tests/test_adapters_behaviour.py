"""Merging, disabling, training, several adapters, placement rules (against PEFT's choices),
inits, dropout, and errors for bad adapter folders."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from helpers_adapters import dense_copy, peft_key, quantize_nf4, randomize, tiny_model
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.adapters import AdapterLayer, LoraConfig, VeraConfig, attach, load_adapter
from loraforge.adapters.base import is_quantized_linear
from loraforge.adapters.io import adapter_tensors
from loraforge.errors import UserError
from loraforge.quant.linear import QuantLinear

TOL = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def ids(seed: int = 5):
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))


def config_of(kind: str, **extra):
    if kind == "vera":
        return VeraConfig(r=8, **extra)
    return LoraConfig(r=4, alpha=8, use_dora=kind == "dora", **extra)


@pytest.mark.parametrize("quant", [False, True], ids=["plain", "nf4"])
@pytest.mark.parametrize("kind", ["lora", "dora", "vera"])
def test_merge_unmerge_disable(kind, quant):
    model = tiny_model(0, attention_bias=True)
    if quant:
        quantize_nf4(model)
        assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    x = ids()
    with torch.no_grad():
        base_out = model(input_ids=x).logits
    am = attach(model, config_of(kind))
    randomize([p for _, p in am.trainable_parameters()], seed=1)
    q_proj = model.model.layers[0].self_attn.q_proj
    original_base = q_proj.base_layer
    original_weight = None if quant else original_base.weight.detach().clone()
    with torch.no_grad():
        out = am(input_ids=x).logits
        assert (out - base_out).abs().max() > 1e-2
        with am.disable_adapter():
            torch.testing.assert_close(am(input_ids=x).logits, base_out, **TOL)

        am.merge()
        assert am.merged_adapters() == ["default"]
        if quant:  # a dense float32 layer, never re-quantized
            assert type(q_proj.base_layer) is nn.Linear and q_proj.base_layer.weight.dtype == torch.float32
        torch.testing.assert_close(am(input_ids=x).logits, out, **TOL)
        with am.disable_adapter():  # unmerged for the block, merged again after it
            torch.testing.assert_close(am(input_ids=x).logits, base_out, **TOL)
        assert am.merged_adapters() == ["default"]

        am.unmerge()
        if quant:
            assert q_proj.base_layer is original_base
        else:
            torch.testing.assert_close(q_proj.base_layer.weight, original_weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(am(input_ids=x).logits, out, **TOL)

        plain = am.merge_and_unload()
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        if quant:
            assert not any(is_quantized_linear(m) for m in plain.model.layers.modules())
        torch.testing.assert_close(plain(input_ids=x).logits, out, **TOL)


@pytest.mark.parametrize("kind", ["lora", "dora", "vera"])
def test_training_changes_only_adapter_parameters(kind):
    model = quantize_nf4(tiny_model(0))
    am = attach(model, config_of(kind, modules_to_save=["lm_head"]))
    before = {k: v.clone() for k, v in am.state_dict().items()}
    params = [p for _, p in am.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        am(input_ids=ids(), labels=ids()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trainable = {n for n, _ in am.named_parameters() if _.requires_grad}
    changed = {k for k, v in am.state_dict().items() if not torch.equal(v, before[k])}
    adapter_markers = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude"),
                       "vera": ("vera_lambda_b", "vera_lambda_d")}[kind]
    assert changed and changed <= trainable
    assert all(any(m in k for m in adapter_markers + ("modules_to_save.default",)) for k in trainable)
    assert any("modules_to_save.default" in k for k in changed)


def test_several_named_adapters(tmp_path):
    x = ids()
    model = tiny_model(0)
    with torch.no_grad():
        base_out = model(input_ids=x).logits
    am = attach(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]), name="a")
    am.add_adapter("b", LoraConfig(r=2, alpha=4, targets=["v_proj", "down_proj"]))
    randomize([p for n, p in am.named_parameters() if ".a." in n or ".b." in n], seed=4)
    assert am.active_adapters == ["a"]
    # only the active adapter trains
    assert all(".a." in n for n, _ in am.trainable_parameters())
    with torch.no_grad():
        out_a = am(input_ids=x).logits
        am.set_adapter("b")
        out_b = am(input_ids=x).logits
        am.set_adapter([])
        torch.testing.assert_close(am(input_ids=x).logits, base_out, **TOL)
        am.set_adapter(["a", "b"])
        out_ab = am(input_ids=x).logits
    assert all(".b." in n or ".a." in n for n, _ in am.trainable_parameters())
    am.save_pretrained(tmp_path, adapter_names=["a", "b"])

    # each adapter alone, loaded on a fresh model, reproduces its output
    for name, expected in (("a", out_a), ("b", out_b)):
        fresh = load_adapter(tiny_model(0), tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=x).logits, expected, **TOL)
    # PEFT agrees on the combination of both
    pm = peft.PeftModel.from_pretrained(tiny_model(0), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x).logits, out_ab, **TOL)

    am.delete_adapter("a")
    assert list(am.configs) == ["b"] and am.active_adapters == ["b"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # only "a" was there: unwrapped
    assert isinstance(model.model.layers[0].self_attn.v_proj, AdapterLayer)
    with torch.no_grad():
        torch.testing.assert_close(am(input_ids=x).logits, out_b, **TOL)
    with pytest.raises(UserError, match="no adapter named 'a'"):
        am.set_adapter("a")


PLACEMENTS = [
    dict(ours=dict(targets=["q_proj", "mlp.up_proj"]), peft=dict(target_modules=["q_proj", "mlp.up_proj"])),
    dict(ours=dict(targets=r".*layers\.[12]\.self_attn\.(k|o)_proj"),
         peft=dict(target_modules=r".*layers\.[12]\.self_attn\.(k|o)_proj")),
    dict(ours=dict(targets="all-linear", exclude=["model.layers.0.mlp.up_proj", "o_proj"]),
         peft=dict(target_modules="all-linear", exclude_modules=["model.layers.0.mlp.up_proj", "o_proj"])),
    dict(ours=dict(targets="all-linear", exclude=r".*\.layers\.1\..*"),
         peft=dict(target_modules="all-linear", exclude_modules=r".*\.layers\.1\..*")),
    dict(ours=dict(targets=["q_proj", "down_proj"], layers_to_transform=[0, 2]),
         peft=dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2])),
    dict(ours=dict(targets=["gate_proj"], layers_to_transform=1, layers_pattern="layers"),
         peft=dict(target_modules=["gate_proj"], layers_to_transform=1, layers_pattern="layers")),
]
PATTERNS = dict(rank_pattern={"q_proj": 6, "model.layers.1.mlp.down_proj": 2, "^model.layers.2.self_attn.k_proj": 3},
                alpha_pattern={"layers.2.mlp.*": 32})


@pytest.mark.parametrize("case", range(len(PLACEMENTS)))
def test_placement_matches_peft(case, tmp_path):
    ours_kw, peft_kw = PLACEMENTS[case]["ours"], PLACEMENTS[case]["peft"]
    am = attach(tiny_model(0, num_hidden_layers=3), LoraConfig(r=4, alpha=8, **ours_kw, **PATTERNS))
    pm = peft.get_peft_model(tiny_model(0, num_hidden_layers=3), peft.LoraConfig(r=4, lora_alpha=8, **peft_kw,
                                                                                 **PATTERNS))
    peft_layers = {k.removeprefix("base_model.model."): m for k, m in pm.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert sorted(am.targets["default"]) == sorted(peft_layers)
    for key, layer in peft_layers.items():
        ours = am.model.get_submodule(key)
        assert (ours.r["default"], ours.scaling["default"]) == (layer.r["default"], layer.scaling["default"]), key
    # what we write selects the same modules in PEFT
    am.save_pretrained(tmp_path)
    pm2 = peft.PeftModel.from_pretrained(tiny_model(0, num_hidden_layers=3), tmp_path)
    assert sorted(k.removeprefix("base_model.model.") for k, m in pm2.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)) == sorted(peft_layers)


def test_all_linear_on_smollm_shape_writes_condensed_suffixes(tmp_path):
    am = attach(tiny_model(0, num_hidden_layers=3), LoraConfig(r=2))
    am.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM" and data["lora_alpha"] == 8
    assert "lm_head" not in str(am.targets["default"])


def test_no_match_is_a_user_error():
    with pytest.raises(UserError, match=r"qproj.*model\.layers\.0\.self_attn\.q_proj"):
        attach(tiny_model(0), LoraConfig(targets=["qproj"]))
    with pytest.raises(UserError, match="not a linear layer"):
        attach(tiny_model(0), LoraConfig(targets=["mlp"]))
    with pytest.raises(UserError, match="invalid regex"):
        LoraConfig(targets=r".*(q_proj")


def test_modules_to_save_and_trainable_count_match_peft(tmp_path, capsys):
    x = ids()
    am = attach(tiny_model(0), LoraConfig(r=4, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    pm = peft.get_peft_model(tiny_model(0), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            modules_to_save=["lm_head"]))
    trainable, _ = pm.get_nb_trainable_parameters()
    assert sum(p.numel() for _, p in am.trainable_parameters()) == trainable
    am.print_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out
    randomize([p for _, p in am.trainable_parameters()], seed=6)
    am.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(tiny_model(0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, am(input_ids=x).logits, **TOL)


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_in_training_matches_peft(use_dora, tmp_path):
    x = ids()
    model = tiny_model(0, mlp_bias=True)
    am = attach(model, LoraConfig(r=4, dropout=0.3, use_dora=use_dora, targets=["q_proj", "up_proj"]))
    randomize([p for _, p in am.trainable_parameters()], seed=7)
    am.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(tiny_model(0, mlp_bias=True), tmp_path, is_trainable=True)
    am.train()
    pm.train()
    torch.manual_seed(11)
    ours = am(input_ids=x, labels=x).loss
    torch.manual_seed(11)
    theirs = pm(input_ids=x, labels=x).loss
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.backward()
    theirs.backward()
    ours_params = adapter_tensors(am, "default")
    for name, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours_params[peft_key(name)].grad, p.grad, atol=1e-5, rtol=1e-4)


def test_dora_eval_cache_follows_parameter_updates():
    x = ids()
    am = attach(tiny_model(0), LoraConfig(r=4, use_dora=True, targets=["q_proj", "down_proj"]))
    assert not am.model.model.layers[0].self_attn.q_proj.training  # follows the eval-mode model
    randomize([p for _, p in am.trainable_parameters()], seed=9)
    with torch.no_grad():
        am(input_ids=x)  # fills the eval cache of the norms
        randomize([p for _, p in am.trainable_parameters()], seed=10)
        updated = am(input_ids=x).logits
        am.train()
        recomputed = am(input_ids=x).logits  # training mode never uses the cache
    torch.testing.assert_close(updated, recomputed, **TOL)


def test_inits():
    am = attach(tiny_model(0), LoraConfig(r=4, init="default", targets=["down_proj"]))
    layer = am.model.model.layers[0].mlp.down_proj
    bound = 1 / layer.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, in]
    a = layer.lora_A["default"].weight
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert not layer.lora_B["default"].weight.any()
    am.add_adapter("g", LoraConfig(r=8, init="gaussian", targets=["down_proj"]))
    g = layer.lora_A["g"].weight
    assert abs(g.std().item() - 1 / 8) < 0.02 and not layer.lora_B["g"].weight.any()


def test_pissa_matches_peft_and_quantizes_the_residual(tmp_path):
    x = ids()
    model = tiny_model(0)
    with torch.no_grad():
        base_out = model(input_ids=x).logits
    am = attach(model, LoraConfig(r=4, alpha=8, init="pissa", targets=["q_proj", "up_proj"]))
    pm = peft.get_peft_model(tiny_model(0), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                            target_modules=["q_proj", "up_proj"]))
    ours = adapter_tensors(am, "default")
    for name, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[peft_key(name)], p, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(am(input_ids=x).logits, base_out, **TOL)  # unchanged at init
    # saved and loaded by PEFT (which recomputes the residual from the original base)
    randomize([p for _, p in am.trainable_parameters()], seed=8)
    am.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model(0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, am(input_ids=x).logits, **TOL)

    # 4-bit base: the residual W - sBA is quantized again
    qmodel = quantize_nf4(tiny_model(0))
    dense = dense_copy(qmodel, 0).model.layers[0].self_attn.q_proj.weight
    qam = attach(qmodel, LoraConfig(r=4, alpha=8, init="pissa", targets=["q_proj"]))
    layer = qam.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, QuantLinear) and layer.base_layer.double_quant
    residual = dense - layer.delta_weight("default")
    error = (layer.base_layer.dequantize(torch.float32) - residual).abs().max()
    assert error < 0.25 * residual.abs().max()  # NF4 round-off of the residual, not of W
    assert (layer.base_layer.dequantize(torch.float32) - dense).abs().max() > 2 * error


def _saved(tmp_path, **config):
    am = attach(tiny_model(0), LoraConfig(r=4, targets=["q_proj"], **config))
    am.save_pretrained(tmp_path)
    return tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"


def test_bad_adapter_folders_name_the_key(tmp_path):
    weights, config = _saved(tmp_path)
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"

    save_file({k: v for k, v in tensors.items() if k != key}, str(weights))
    with pytest.raises(UserError, match=f"missing key '{key}'"):
        load_adapter(tiny_model(0), tmp_path)

    save_file({**tensors, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}, str(weights))
    with pytest.raises(UserError, match="unexpected key 'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight'"):
        load_adapter(tiny_model(0), tmp_path)

    save_file({**tensors, key: torch.zeros(64, 3)}, str(weights))
    with pytest.raises(UserError, match=key.replace(".", r"\.") + ".*shape"):
        load_adapter(tiny_model(0), tmp_path)

    save_file(tensors, str(weights))
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "lora_bias": True}))
    with pytest.raises(UserError, match="lora_bias"):
        load_adapter(tiny_model(0), tmp_path)
    config.write_text(json.dumps({**data, "peft_type": "IA3"}))
    with pytest.raises(UserError, match="peft_type"):
        load_adapter(tiny_model(0), tmp_path)
    config.write_text("{\n  \"r\": 4,\n")
    with pytest.raises(UserError, match=r"adapter_config\.json:3"):
        load_adapter(tiny_model(0), tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_adapter(tiny_model(0), tmp_path / "nope")


def test_peft_grad_names_cover_ours():
    # every PEFT parameter name maps onto one of our on-disk keys (guards peft_key above)
    pm = peft.get_peft_model(tiny_model(0), peft.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    am = attach(tiny_model(0), LoraConfig(r=2, use_dora=True, targets=["q_proj"]))
    assert {peft_key(n) for n, p in pm.named_parameters() if p.requires_grad} == set(adapter_tensors(am, "default"))


def test_merging_an_adapted_head_tied_to_the_embeddings_leaves_the_embeddings_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.adapters import LoraConfig, attach

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    am = attach(model, LoraConfig(r=4, alpha=4, targets=["q_proj", "lm_head"]))
    for name, p in am.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        unmerged = am(input_ids=ids).logits
        merged_model = am.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    assert torch.equal(merged_model.get_input_embeddings().weight, embeddings)
    assert merged_model.config.tie_word_embeddings is False
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
