"""Merging adapters and writing safetensors / NF4 folders: a merged model loaded by plain
transformers must compute what the unmerged loraforge model computes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_infer import bpe_tokenizer, logits, make_adapter, save_base, tiny_model, train_two_steps

from loraforge.cli import main

CASES = [(m, q) for m in ("lora", "dora", "vera") for q in (False, True)] + [("adalora", False), ("sora", False)]


def _ids(tok):
    return torch.tensor([tok.encode("hello world, the quick brown fox jumps over the lazy dog")])


def _base_folder(tmp_path, tok, quantized: bool, **overrides):
    from loraforge.models import save_quantized
    from loraforge.quant.replace import quantize_model

    model = tiny_model(tok, **overrides)
    folder = tmp_path / ("base-nf4" if quantized else "base")
    if quantized:
        quantize_model(model, quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=torch.float32)
        save_quantized(model, tok, folder)
    else:
        save_base(model, tok, folder)
    return folder


def _unmerged(folder, method, adapter_dir, **adapter_kwargs):
    """The base loaded by loraforge (fp32 compute) with a non-zero adapter, saved to adapter_dir."""
    from loraforge.models import load_model

    model, _ = load_model(folder, compute_dtype=torch.float32)
    am = make_adapter(model, method, **adapter_kwargs)
    am.save_pretrained(adapter_dir)
    return am


@pytest.mark.parametrize("method,quantized", CASES, ids=[f"{m}-{'nf4' if q else 'plain'}" for m, q in CASES])
def test_merged_safetensors_match_unmerged(tmp_path, method, quantized):
    from transformers import AutoModelForCausalLM

    tok = bpe_tokenizer()
    base = _base_folder(tmp_path, tok, quantized)
    am = _unmerged(base, method, tmp_path / "adapter")
    ids = _ids(tok)
    want = logits(am, ids)
    with am.disable_adapter():
        assert (logits(am, ids) - want).abs().max() > 1e-3  # the adapter matters
    out = tmp_path / "merged"
    assert main(["merge", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(logits(merged, ids), want, rtol=0, atol=1e-5)
    # the folder is self-contained: tokenizer and chat template travel with it
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template


def test_sharded_bf16_and_tied_embeddings(tmp_path):
    """A tied model stays tied (stored once) and a small shard size gives an index of shards."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tok = bpe_tokenizer()
    base = _base_folder(tmp_path, tok, False, tie_word_embeddings=True)
    am = _unmerged(base, "lora", tmp_path / "adapter")
    want = logits(am, _ids(tok))
    out = tmp_path / "merged"
    assert main(["merge", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--max-shard-size", "60KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and "lm_head.weight" not in index["weight_map"]
    with safe_open(str(out / shards[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(merged, _ids(tok)), want, rtol=0.05, atol=0.05)  # bf16 storage


def test_adapted_tied_head_is_untied(tmp_path):
    """LoRA on a head tied to the embeddings: the merge must not change the embeddings."""
    from transformers import AutoModelForCausalLM

    from loraforge.adapters import LoraConfig, attach
    from loraforge.models import load_model

    tok = bpe_tokenizer()
    base = _base_folder(tmp_path, tok, False, tie_word_embeddings=True)
    model, _ = load_model(base, compute_dtype=torch.float32)
    embed_before = model.model.embed_tokens.weight.detach().clone()
    am = attach(model, LoraConfig(r=4, alpha=8, init="none", targets=["q_proj", "lm_head"]))
    am.save_pretrained(tmp_path / "adapter")
    want = logits(am, _ids(tok))
    out = tmp_path / "merged"
    assert main(["merge", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert merged.config.tie_word_embeddings is False
    torch.testing.assert_close(merged.model.embed_tokens.weight, embed_before, rtol=0, atol=0)
    torch.testing.assert_close(logits(merged, _ids(tok)), want, rtol=0, atol=1e-5)


def test_nf4_output_reports_drift_and_keeps_untouched_codes(tmp_path, capsys):
    from safetensors.torch import load_file

    from loraforge.adapters import LoraConfig, attach
    from loraforge.infer.merge import PROBE_TEXT, logit_drift
    from loraforge.models import load_model

    tok = bpe_tokenizer()
    base = _base_folder(tmp_path, tok, True)
    model, _ = load_model(base, compute_dtype=torch.float32)
    am = attach(model, LoraConfig(r=4, alpha=8, init="none", targets=["q_proj"]))
    am.save_pretrained(tmp_path / "adapter")
    probe = torch.tensor([tok.encode(PROBE_TEXT)])
    merged_fp32 = logits(am, probe)[0]
    out = tmp_path / "nf4"
    assert main(["merge", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--format", "nf4", "--dtype", "fp32"]) == 0
    report = capsys.readouterr().err
    requantized, _ = load_model(out)
    drift = logit_drift(merged_fp32, logits(requantized, probe)[0])
    assert f"max |d| {drift.max_abs:.4g}" in report and f"{drift.argmax_agree}/{drift.tokens}" in report
    assert drift.max_abs > 0
    old, new = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    key = "model.layers.0.self_attn.v_proj.weight"  # not adapted: its 4-bit codes are kept as they were
    assert torch.equal(old[key], new[key]) and torch.equal(old[key + ".absmax"], new[key + ".absmax"])
    assert not torch.equal(old["model.layers.0.self_attn.q_proj.weight"], new["model.layers.0.self_attn.q_proj.weight"])


def _qlora_run(tmp_path, tok):
    """(full-precision base folder, run folder): two real ``loraforge train`` steps of LoRA on
    the base quantized to NF4, as a QLoRA run trains."""
    base = _base_folder(tmp_path, tok, False)
    return base, train_two_steps(tmp_path, base, "{type: nf4, blocksize: 64, double_quant: true}", "{r: 4, alpha: 8}")


def test_qlora_run_merges_into_the_trained_4bit_model_by_default(tmp_path, capsys):
    """Default: the merged model computes what the trained (NF4 base + adapter) model computed;
    ``--into original`` gives the full-precision base + adapter instead, and the two differ."""
    from transformers import AutoModelForCausalLM

    from loraforge.adapters import load_adapter
    from loraforge.models import load_model

    tok = bpe_tokenizer()
    base, run = _qlora_run(tmp_path, tok)
    ids = _ids(tok)
    quantized, _ = load_model(base, quantize="nf4", blocksize=64, double_quant=True, compute_dtype=torch.float32)
    trained = load_adapter(quantized, run)
    want_trained = logits(trained, ids)
    with trained.disable_adapter():
        assert (logits(trained, ids) - want_trained).abs().max() > 1e-3  # the adapter learned something
    want_original = logits(load_adapter(load_model(base, compute_dtype=torch.float32)[0], run), ids)
    assert (want_trained - want_original).abs().max() > 1e-2  # the choice of base matters
    capsys.readouterr()

    assert main(["merge", str(base), "--adapter", str(run), "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    assert "quantized to nf4 (block 64, double quant) and dequantized, as in training" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    torch.testing.assert_close(logits(merged, ids), want_trained, rtol=0, atol=1e-5)

    assert main(["merge", str(base), "--adapter", str(run), "--out", str(tmp_path / "o"), "--dtype", "fp32",
                 "--into", "original"]) == 0
    assert "into the full-precision weights of" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32)
    torch.testing.assert_close(logits(merged, ids), want_original, rtol=0, atol=1e-5)


def test_into_original_needs_full_precision_weights_and_a_known_target(tmp_path, capsys):
    tok = bpe_tokenizer()
    base = _base_folder(tmp_path, tok, True)
    _unmerged(base, "lora", tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--into", "original"]) == 2
    assert "is a 4-bit checkpoint" in capsys.readouterr().err and not out.exists()
    assert main(["merge", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--into", "orignal"]) == 2
    assert 'did you mean "original"?' in capsys.readouterr().err and not out.exists()
