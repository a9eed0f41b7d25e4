"""Evaluation (perplexity, accuracy, --compare) against straightforward re-computations, and the
bad-input errors of the inference commands (exit status 2, one clear message)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_infer import bpe_tokenizer, make_adapter, save_base, tiny_model

from loraforge.cli import main
from loraforge.infer.evaluate import perplexity_responses, perplexity_text, windows

TEXT = "the quick brown fox jumps over the lazy dog. paris is the capital of france. one two three four five."


@torch.no_grad()
def _token_nll(model, ids, begin, t):
    """-log p(ids[t] | ids[begin:t]) from one forward over the context alone."""
    logits = model(input_ids=torch.tensor([ids[begin:t]])).logits[0, -1].float()
    return -F.log_softmax(logits, -1)[ids[t]].item()


@pytest.mark.parametrize("window,stride", [(10, 4), (8, 8)])
def test_strided_perplexity_equals_per_token_reference(window, stride):
    tok = bpe_tokenizer()
    model = tiny_model(tok)
    ids = tok.encode(TEXT)[:24]
    n = len(ids)
    got = perplexity_text(model, ids, window, stride)
    # reference: token t is scored by the first window [kS, kS + W) that ends after it, with the
    # context from that window's start; with S == W a window's first token has no context: skipped
    nll, count = 0.0, 0
    for t in range(1, n):
        k = max(0, (t - window) // stride + 1)
        begin = k * stride
        if begin == t:
            continue
        nll += _token_nll(model, ids, begin, t)
        count += 1
    assert got.tokens == count
    assert got.value == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_full_window_perplexity_is_one_forward():
    tok = bpe_tokenizer()
    model = tiny_model(tok)
    ids = tok.encode(TEXT)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    want = math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert perplexity_text(model, ids, len(ids) + 5, 4).value == pytest.approx(want, rel=1e-5)
    assert [w[:2] for w in windows(10, 4, 3)] == [(0, 4), (3, 7), (6, 10)]


def test_response_perplexity_equals_per_example_reference():
    tok = bpe_tokenizer()
    model = tiny_model(tok)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 14, 7):
        ids = torch.randint(0, len(tok), (n,), generator=gen).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]
        examples.append({"input_ids": ids, "labels": labels})
    got = perplexity_responses(model, examples, pad_id=0, batch_size=3)  # padded batches
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            labels = torch.tensor(ex["labels"][1:])
            nll += F.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    assert got.tokens == count
    assert got.value == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "granite", "gemma2", "phi", "gpt2"])
def test_perplexity_without_logits_equals_the_logits(model_type):
    """Known architectures score through the chunked loss (Granite's logit divisor and Gemma 2's
    soft cap applied), the others through their logits; both equal F.cross_entropy of
    ``model(...).logits``. A hook on the head sends a known architecture through its logits."""
    from helpers_gguf import arch_model

    from loraforge.infer import evaluate

    tok = bpe_tokenizer()
    model = arch_model(model_type, tok)
    ids = tok.encode(TEXT)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    want = math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    chunked = evaluate._chunked_head(model) is not None
    assert chunked == (model_type not in ("phi", "gpt2"))
    assert perplexity_text(model, ids, len(ids), len(ids)).value == pytest.approx(want, rel=1e-5)
    if chunked:
        handle = model.lm_head.register_forward_hook(lambda module, args, out: out)
        assert evaluate._chunked_head(model) is None
        assert perplexity_text(model, ids, len(ids), len(ids)).value == pytest.approx(want, rel=1e-5)
        handle.remove()


def _folders(tmp_path):
    tok = bpe_tokenizer()
    save_base(tiny_model(tok), tok, tmp_path / "base")
    make_adapter(tiny_model(tok), "lora").save_pretrained(tmp_path / "adapter")
    return tok


def _table_values(out: str) -> list[str]:
    row = next(line for line in out.splitlines() if line.startswith("│"))
    return [cell.strip() for cell in row.strip("│").split("│")][1:]


def test_eval_text_compare_matches_separate_runs(tmp_path, capsys):
    tok = _folders(tmp_path)
    (tmp_path / "t.txt").write_text(TEXT)
    base = ["eval", str(tmp_path / "base"), "--data", str(tmp_path / "t.txt"), "--window", "16"]
    assert main(base) == 0
    alone = _table_values(capsys.readouterr().out)
    assert main(base + ["--adapter", str(tmp_path / "adapter"), "--compare"]) == 0
    both = _table_values(capsys.readouterr().out)
    assert len(both) == 2 and both[0] == alone[0] and both[1] != both[0]
    model = tiny_model(tok)
    ids = tok.encode(TEXT)  # this tokenizer adds no BOS
    assert float(alone[0]) == pytest.approx(perplexity_text(model, ids, 16, 8).value, rel=1e-4)


def test_eval_in_bf16_loads_the_base_in_bf16_and_agrees_to_its_precision(tmp_path, capsys, monkeypatch):
    import loraforge.infer.session as session

    _folders(tmp_path)
    (tmp_path / "t.txt").write_text(TEXT)
    loaded = []
    real = session.load_for_inference
    monkeypatch.setattr(session, "load_for_inference",
                        lambda *a, **kw: loaded.append(real(*a, **kw)) or loaded[-1])
    base = ["eval", str(tmp_path / "base"), "--data", str(tmp_path / "t.txt"), "--window", "16",
            "--adapter", str(tmp_path / "adapter"), "--quantize", "nf4"]
    assert main(base) == 0
    fp32 = float(_table_values(capsys.readouterr().out)[0])
    assert main(base + ["--dtype", "bf16"]) == 0
    bf16 = float(_table_values(capsys.readouterr().out)[0])
    assert loaded[0].model.get_input_embeddings().weight.dtype == torch.float32
    assert loaded[1].model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32


def test_eval_accuracy_counts_exact_and_contained(tmp_path, capsys):
    _folders(tmp_path)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello", "paris", "a"]))
    assert main(["generate", str(tmp_path / "base"), "--prompts", str(tmp_path / "p.jsonl"), "--out",
                 str(tmp_path / "o.jsonl"), "--max-new-tokens", "6", "--no-progress"]) == 0
    outs = [json.loads(line)["output"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert all(len(o) > 3 for o in outs)
    rows = [{"prompt": "hello", "answer": f"  {outs[0]} "},  # exact (after stripping)
            {"prompt": "paris", "answer": outs[1][1:-1]},  # contained only
            {"prompt": "a", "answer": "surely not this"}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = ["eval", str(tmp_path / "base"), "--data", str(tmp_path / "qa.jsonl"), "--metric", "accuracy",
           "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main(cmd) == 0
    assert _table_values(capsys.readouterr().out) == ["33.33% (1/3)"]
    assert main(cmd + ["--match", "contains"]) == 0
    assert _table_values(capsys.readouterr().out) == ["66.67% (2/3)"]


def test_adapter_for_another_base_names_module_and_shapes(tmp_path, capsys):
    tok = _folders(tmp_path)
    make_adapter(tiny_model(tok, hidden_size=32, intermediate_size=48), "lora").save_pretrained(tmp_path / "other")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "other"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj" in err and "(4, 32)" in err and "(4, 64)" in err
    assert "does not fit" in err and err.count("\n") == 1, err


def test_merge_refuses_existing_output_and_compare_needs_adapter(tmp_path, capsys):
    _folders(tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["merge", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(args + ["--overwrite", "--dtype", "fp32"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert main(["eval", str(tmp_path / "base"), "--data", str(tmp_path / "x.txt"), "--compare"]) == 2
    assert "--adapter" in capsys.readouterr().err
