"""load_model on Hugging Face folders and on the embedded GGUF alias (with its weight cache)."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from helpers_models import logits, sample_ids, save_folder, smollm2_loads

from loraforge.models import load_model


def test_hf_folder_round_trip(tmp_path, tiny_llama):
    model = tiny_llama()
    folder = save_folder(model, tmp_path / "model")
    loaded, tokenizer = load_model(folder)
    ids = sample_ids()
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert not loaded.training
    assert tokenizer("hello world").input_ids == [6, 7]
    assert "assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )


def test_hf_folder_dtype_and_tied_embeddings(tmp_path, tiny_llama):
    model = tiny_llama(tie_word_embeddings=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())  # the reference: fp32 holding the bf16 values
    folder = save_folder(copy.deepcopy(model).to(torch.bfloat16), tmp_path / "model")
    as_saved, _ = load_model(folder)
    assert as_saved.dtype == torch.bfloat16
    assert as_saved.lm_head.weight is as_saved.model.embed_tokens.weight
    as_fp32, _ = load_model(folder, compute_dtype="fp32")
    assert as_fp32.dtype == torch.float32
    ids = sample_ids()
    assert torch.equal(logits(as_fp32, ids), logits(model, ids))


def test_sharded_folder(tmp_path, tiny_llama):
    model = tiny_llama()
    folder = tmp_path / "model"
    save_folder(model, folder)
    model.save_pretrained(folder, max_shard_size="100KB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    assert len(list(folder.glob("*.safetensors"))) > 1
    loaded, _ = load_model(folder)
    ids = sample_ids()
    assert torch.equal(logits(loaded, ids), logits(model, ids))


# ---------------------------------------------------------------- the embedded GGUF alias
@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return smollm2_loads()


@pytest.mark.slow
def test_alias_cache_entry(smollm2, smollm2_gguf):
    with open(smollm2_gguf, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert smollm2["entries"] == [digest]
    entry = smollm2["cache"] / "gguf" / digest
    names = {p.name for p in entry.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "source.json"} <= names
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    config = json.loads((entry / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config


@pytest.mark.slow
def test_alias_warm_load_matches_cold(smollm2):
    cold, warm = smollm2["cold"], smollm2["warm"]
    print(f"\nsmollm2 alias: cold load {smollm2['cold_s']:.1f} s, warm load {smollm2['warm_s']:.1f} s")
    assert cold.config.num_hidden_layers == 30 and cold.config.hidden_size == 576
    for model in (cold, warm):
        assert model.dtype == torch.float32
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied after the cache load
    for (name, a), (_, b) in zip(cold.state_dict().items(), warm.state_dict().items()):
        assert torch.equal(a, b), name
    text = "The capital of France is"
    assert smollm2["tokenizer"](text).input_ids == smollm2["warm_tokenizer"](text).input_ids


@pytest.mark.slow
def test_alias_knows_paris(smollm2):
    """End to end: the converted weights (q/k permutation, tied head, tokenizer) still know facts."""
    model, tokenizer = smollm2["warm"], smollm2["warm_tokenizer"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt + "The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"
