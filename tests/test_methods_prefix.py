"""Prefix tuning against PEFT's PREFIX_TUNING on a tiny grouped-query Llama (4 heads, 2 key/value
heads): logits and one step's gradients equal PEFT's, our folder loads in ``peft.PeftModel`` and
PEFT's in ours, the projection is folded away on saving as PEFT folds it, generation with the KV
cache equals generation without it and PEFT's greedy tokens, packed documents each see the
prefix, gradient checkpointing keeps it, a 4-bit base works, merging is refused, config mistakes
are named, and ``loraforge train`` on alpaca data lowers the eval loss."""

from __future__ import annotations

import copy
import io
import json
import re
from collections import Counter

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import loraforge.models
from loraforge.adapters import PrefixConfig, attach, load_adapter
from loraforge.data import collate, pack
from loraforge.errors import UserError
from loraforge.train.build import adapter_config
from loraforge.train.config import load_config
from loraforge.train.loop import train

from helpers_data import SHARED_DATA
from helpers_train import log_rows, tiny_model

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

IDS = torch.tensor([[5, 9, 3, 7, 8, 11], [1, 1, 4, 6, 40, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # the second row left-padded
LABELS = torch.where(MASK.bool(), IDS, -100)


@pytest.fixture
def base(tiny_llama):
    return tiny_llama()  # 2 layers, 4 heads, 2 key/value heads, hidden 64: d_kv = 32


def peft_pair(base, projection: bool, tokens: int = 3):
    """(PEFT model, our adapter model) on copies of ``base`` with the same prefix weights."""
    from peft import PrefixTuningConfig, get_peft_model

    hidden = 24 if projection else None
    peft_model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=tokens, prefix_projection=projection, encoder_hidden_size=hidden))
    ours = attach(copy.deepcopy(base), PrefixConfig(num_virtual_tokens=tokens, projection=projection,
                                                    projection_hidden=hidden))
    theirs = peft_model.prompt_encoder["default"].state_dict()
    ours.shared["default"].load_state_dict(theirs)
    return peft_model, ours


def test_shape_follows_grouped_query_attention(base):
    am = attach(base, PrefixConfig(num_virtual_tokens=5))
    config, encoder = am.configs["default"], am.shared["default"]
    assert (config.num_layers, config.token_dim, config.num_attention_heads) == (2, 32, 2)
    assert encoder.embedding.weight.shape == (5, 2 * 2 * 32) and encoder.transform is None
    keys, values = encoder.key_values(batch=3)[1]
    assert keys.shape == values.shape == (3, 2, 5, 16)
    flat = encoder.embedding.weight.view(5, 4, 2, 16)  # row i: per layer l, key 2l then value 2l + 1
    torch.testing.assert_close(keys[0], flat[:, 2].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(values[2], flat[:, 3].transpose(0, 1), rtol=0, atol=0)
    assert [n for n, p in am.named_parameters() if p.requires_grad] == ["shared.default.embedding.weight"]


@pytest.mark.parametrize("projection", [False, True])
def test_logits_and_gradients_equal_peft(base, projection):
    peft_model, ours = peft_pair(base, projection)
    positions = (MASK.cumsum(-1) - 1).clamp(min=0)
    for extra in ({}, {"position_ids": positions}):  # PEFT shifts given positions by P too
        theirs = peft_model(input_ids=IDS, attention_mask=MASK, **extra).logits
        got = ours(input_ids=IDS, attention_mask=MASK, **extra).logits
        torch.testing.assert_close(got, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(got, base(input_ids=IDS, attention_mask=MASK).logits, atol=1e-2)

    peft_model.train(), ours.train()
    peft_model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss.backward()
    ours(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss.backward()
    theirs = dict(peft_model.prompt_encoder["default"].named_parameters())
    mine = dict(ours.shared["default"].named_parameters())
    assert mine.keys() == theirs.keys() and len(mine) == (5 if projection else 1)
    for name, param in mine.items():
        assert param.grad.abs().sum() > 0
        torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("projection", [False, True])
def test_peft_format_both_ways(base, projection, tmp_path):
    from peft import PeftModel

    peft_model, ours = peft_pair(base, projection)
    expected = ours(input_ids=IDS, attention_mask=MASK).logits

    ours.save_pretrained(tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft")
    mine, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
                "encoder_hidden_size", "prefix_projection", "num_transformer_submodules", "inference_mode"):
        assert mine[key] == theirs[key], key
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert a.keys() == b.keys() == {"prompt_embeddings"} and a["prompt_embeddings"].shape == (3, 128)
    torch.testing.assert_close(a["prompt_embeddings"], b["prompt_embeddings"], rtol=0, atol=1e-6)  # folded alike

    in_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(in_peft(input_ids=IDS, attention_mask=MASK).logits, expected, rtol=0, atol=1e-5)
    in_ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert in_ours.shared["default"].transform is None and in_ours.configs["default"].folded
    torch.testing.assert_close(in_ours(input_ids=IDS, attention_mask=MASK).logits, expected, rtol=0, atol=1e-5)

    assert not in_ours.mergeable()
    with pytest.raises(UserError, match="prefix tuning cannot be merged"):
        in_ours.merge_and_unload()


def test_generation_with_cache_equals_without_and_peft_greedy(base):
    from loraforge.infer.generate import GenerationSettings, generate_ids

    peft_model, ours = peft_pair(base, projection=True)
    prompts = [[5, 9, 3, 7, 8, 11], [4, 6, 40, 2]]  # left-padded together
    settings = GenerationSettings(max_new_tokens=8)
    cached = generate_ids(ours, prompts, settings, stop_ids=[], pad_id=0)
    without = ours.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=8, do_sample=False, use_cache=False)
    assert without[:, 6:].tolist() == cached
    for prompt, tokens in zip(prompts, cached):  # PEFT's forward, one full sequence per token
        ids = list(prompt)
        for _ in range(8):
            ids.append(int(peft_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert ids[len(prompt):] == tokens
    with ours.disable_adapter():
        plain = generate_ids(ours, prompts, settings, stop_ids=[], pad_id=0)
    assert plain == generate_ids(base, prompts, settings, stop_ids=[], pad_id=0) and plain != cached


def test_every_packed_document_sees_the_prefix(base):
    am = attach(base, PrefixConfig(num_virtual_tokens=4))
    docs = [{"input_ids": [5, 9, 3, 7, 8], "labels": [5, 9, 3, 7, 8]}, {"input_ids": [12, 4, 6], "labels": [12, 4, 6]}]
    (packed,) = pack(docs, max_length=8)
    batch = collate([packed], pad_id=0)
    assert batch["attention_mask"].ndim == 4
    logits = am(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"]).logits[0]
    start = 0
    for doc in docs:
        alone = am(input_ids=torch.tensor([doc["input_ids"]])).logits[0]
        n = len(doc["input_ids"])
        torch.testing.assert_close(logits[start:start + n], alone, rtol=1e-5, atol=1e-5)
        start += n


def test_gradient_checkpointing_keeps_the_prefix(base):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(3)  # the same prefix weights both times
        am = attach(copy.deepcopy(base), PrefixConfig(num_virtual_tokens=3, projection=True))
        if checkpointing:
            am.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            am.model.config.use_cache = False
        am.train()
        am(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss.backward()
        grads.append([p.grad for p in am.shared["default"].parameters()])
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_on_a_4bit_base(base, tmp_path):
    from loraforge.quant.replace import quantize_model

    quantized = quantize_model(copy.deepcopy(base), "nf4")
    am = attach(quantized, PrefixConfig(num_virtual_tokens=2))
    got = am(input_ids=IDS, attention_mask=MASK).logits
    with am.disable_adapter():
        assert not torch.allclose(got, am(input_ids=IDS, attention_mask=MASK).logits, atol=1e-2)
    am.save_pretrained(tmp_path)
    loaded = load_adapter(quantize_model(copy.deepcopy(base), "nf4"), tmp_path)
    torch.testing.assert_close(loaded(input_ids=IDS, attention_mask=MASK).logits, got, rtol=0, atol=1e-6)


def test_config_mistakes_are_named(base):
    def where_of(*overrides):
        with pytest.raises(UserError) as info:
            load_config(None, ["data.train=a.jsonl", "adapter.method=prefix", *overrides])
        return info.value

    err = where_of("adapter.prefix.num_virtual_token=4")
    assert "did you mean" in err.message and "num_virtual_tokens" in err.message
    assert "adapter.prefix.num_virtual_tokens" in where_of("adapter.prefix.num_virtual_tokens=0").where
    assert "projection: true" in where_of("adapter.prefix.projection_hidden=8").message
    for key, value in (("r", 8), ("dropout", 0.1), ("targets", "[q_proj]")):
        err = where_of(f"adapter.{key}={value}")
        assert "does not apply to adapter method 'prefix'" in err.message and f"adapter.{key}" in err.where
    with pytest.raises(UserError, match="adapter.method is 'lora'"):
        load_config(None, ["data.train=a.jsonl", "adapter.prefix.num_virtual_tokens=4"])
    with pytest.raises(UserError, match="fsdp"):
        load_config(None, ["data.train=a.jsonl", "adapter.method=prefix", "train.distributed=fsdp"])
    c = load_config(None, ["data.train=a.jsonl", "adapter.method=prefix", "adapter.prefix.num_virtual_tokens=7",
                           "adapter.prefix.projection=true", "adapter.prefix.projection_hidden=16"])
    cfg = adapter_config(c.adapter, c.quantization)
    assert (type(cfg), cfg.num_virtual_tokens, cfg.projection, cfg.projection_hidden) == (PrefixConfig, 7, True, 16)

    am = attach(base, PrefixConfig(num_virtual_tokens=2))
    am.add_adapter("other", PrefixConfig(num_virtual_tokens=3))
    with pytest.raises(UserError, match="one at a time"):
        am.set_adapter(["default", "other"])
    from loraforge.adapters import LoraConfig

    with pytest.raises(UserError, match="cannot join"):
        am.add_adapter("lora", LoraConfig(r=2))


def alpaca_tokenizer(rows: list[dict]):
    """A word-level tokenizer of the rows' 400 most frequent words (no download, loads at once)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = " ".join(str(v) for row in rows for v in row.values())
    counts = Counter(re.findall(r"\w+|[^\w\s]+", text))
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", *[w for w, _ in counts.most_common(400)]])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def test_training_on_alpaca_lowers_eval_loss(tmp_path, monkeypatch):
    rows = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:16]
    tokenizer = alpaca_tokenizer(rows)
    monkeypatch.setattr(loraforge.models, "load_model", lambda source, quantize=None, **kw: (tiny_model(tokenizer),
                                                                                              tokenizer))
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    cfg = load_config(None, [
        "model=tiny", f"data.train={data}", "data.template=alpaca", "quantization=null", "data.eval_fraction=0.25",
        "data.max_length=128", "data.packing=true", "adapter.method=prefix", "adapter.prefix.num_virtual_tokens=8",
        "adapter.prefix.projection=true", "train.steps=8", "train.batch_size=4", "train.lr=3e-2", "train.save_every=4",
        "train.eval_every=1", f"output_dir={tmp_path / 'out'}",
    ])
    console = Console(file=io.StringIO(), width=240)
    result = train(cfg, console=console)
    assert "prefix  8 virtual tokens per layer, projection (hidden d_kv), init random" in console.file.getvalue()
    evals = [r["eval_loss"] for r in log_rows(tmp_path / "out") if "eval_loss" in r]
    assert len(evals) == 8 and all(b < a for a, b in zip(evals, evals[1:])) and evals[-1] < evals[0] - 0.05
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert saved.keys() == {"prompt_embeddings"}  # the projection folded away
    card = (tmp_path / "out" / "README.md").read_text()
    assert "in every attention layer" in card and "PeftModel.from_pretrained" in card and "cannot be merged" in card
    ids = torch.tensor([tokenizer.encode("Describe a process of making crepes.")])
    loaded = load_adapter(tiny_model(tokenizer), tmp_path / "out")
    torch.testing.assert_close(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-000008" / "trainer_state.pt", weights_only=True)
    assert any(".transform." in k for k in state["trainable"])  # the checkpoint keeps the MLP to resume


def test_peft_folder_in_generate_eval_and_merge_commands(tmp_path, capsys):
    from peft import PrefixTuningConfig, get_peft_model

    from helpers_infer import bpe_tokenizer, save_base
    from helpers_infer import tiny_model as infer_model
    from loraforge.cli import main
    from loraforge.infer.prompts import encode_text

    tok = bpe_tokenizer()
    save_base(infer_model(tok), tok, tmp_path / "base")
    peft_model = get_peft_model(infer_model(tok), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    peft_model.save_pretrained(tmp_path / "adapter")
    prompt = "the quick brown fox"
    assert main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--prompt", prompt,
                 "--max-new-tokens", "5"]) == 0
    ids = encode_text(prompt, tok, "tokenizer")
    with torch.no_grad():  # PEFT's own forward, one full sequence per token
        for _ in range(5):
            ids.append(int(peft_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert capsys.readouterr().out == tok.decode(ids[-5:], skip_special_tokens=True) + "\n"

    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. paris is the capital of france.")
    assert main(["eval", str(tmp_path / "base"), "--data", str(tmp_path / "t.txt"), "--window", "16",
                 "--adapter", str(tmp_path / "adapter"), "--compare"]) == 0
    assert capsys.readouterr().out
    assert main(["merge", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 2
    assert "prefix tuning cannot be merged" in capsys.readouterr().err


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    from helpers_methods import make_tiny_tokenizer
    from helpers_train import interrupt_after, write_segment_data

    tokenizer = make_tiny_tokenizer()
    monkeypatch.setattr(loraforge.models, "load_model", lambda source, quantize=None, **kw: (tiny_model(tokenizer),
                                                                                              tokenizer))
    data = write_segment_data(tmp_path / "data.jsonl", n=12)

    def run(name: str, *extra: str):
        cfg = load_config(None, ["model=tiny", f"data.train={data}", "data.format=segments", "quantization=null",
                                 "adapter.method=prefix", "adapter.prefix.num_virtual_tokens=3",
                                 "adapter.prefix.projection=true", "train.steps=4", "train.batch_size=2",
                                 "train.lr=1e-2", "train.save_every=2", f"output_dir={tmp_path / name}", *extra])
        return train(cfg, console=Console(file=io.StringIO()))

    run("whole")
    with monkeypatch.context() as m:
        interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run("split")
    assert len(run("split", "resume=true").losses) == 3
    losses = [[r["loss"] for r in log_rows(tmp_path / d) if "loss" in r] for d in ("whole", "split")]
    assert losses[0] == losses[1]
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors")["prompt_embeddings"] for d in ("whole", "split"))
    assert torch.equal(a, b)


def test_words_init_starts_as_the_model_prompted_with_those_tokens(base):
    am = attach(copy.deepcopy(base), PrefixConfig(num_virtual_tokens=4, prefix_init="words"))
    words = am.shared["default"].init_ids
    assert len(words) == 4
    prompted = base(input_ids=torch.cat([torch.tensor([words]), IDS[:1]], dim=1)).logits[:, 4:]
    torch.testing.assert_close(am(input_ids=IDS[:1]).logits, prompted, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="projection: false"):
        PrefixConfig(prefix_init="words", projection=True)
    c = load_config(None, ["data.train=a.jsonl", "adapter.method=prefix", "adapter.prefix.init=words"])
    assert adapter_config(c.adapter, c.quantization).prefix_init == "words"
    with pytest.raises(UserError, match="did you mean"):
        load_config(None, ["data.train=a.jsonl", "adapter.method=prefix", "adapter.prefix.init=word"])
    with pytest.raises(UserError) as info:
        load_config(None, ["data.train=a.jsonl", "adapter.method=prefix", "adapter.prefix.init=words",
                           "adapter.prefix.projection=true"])
    assert "projection: false" in info.value.message and "adapter.prefix.init" in info.value.where


def test_multi_query_falcon_takes_its_one_key_value_head_and_loads_in_peft(tmp_path):
    """PEFT reads Falcon's config as 4 key/value heads (its prefix then fails to run); the cache
    holds 1 (multi-query), which is what our prefix takes, and PEFT runs our folder."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "falcon", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)).eval()
    am = attach(copy.deepcopy(model), PrefixConfig(num_virtual_tokens=3))
    assert (am.configs["default"].num_attention_heads, am.configs["default"].token_dim) == (1, 16)
    expected = am(input_ids=IDS, attention_mask=MASK).logits
    am.save_pretrained(tmp_path)
    in_peft = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    torch.testing.assert_close(in_peft(input_ids=IDS, attention_mask=MASK).logits, expected, rtol=0, atol=1e-5)
