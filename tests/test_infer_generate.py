"""Generation: batched greedy decoding with left padding equals one prompt at a time and a plain
argmax loop without cache; stops; sampling seeds; the generate and chat commands."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_infer import bpe_tokenizer, make_adapter, save_base, tiny_model

from loraforge.cli import main
from loraforge.infer.generate import GenerationSettings, generate, generate_ids
from loraforge.infer.prompts import encode_text, pad_token_id, stop_token_ids

PROMPTS = ["hello", "the quick brown fox jumps over", "a",
           "one two three four five six seven eight nine ten, and a few more words"]


@torch.no_grad()
def _reference_greedy(model, ids: list[int], n: int, stops: list[int]) -> list[int]:
    """Argmax decoding with a full forward per step (no cache, no padding, no batching)."""
    out = []
    seq = list(ids)
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


@pytest.mark.parametrize("base", ["plain", "nf4+lora"])
def test_batched_greedy_equals_one_at_a_time(base):
    tok = bpe_tokenizer()
    model = tiny_model(tok)
    if base != "plain":
        from loraforge.quant.replace import quantize_model

        quantize_model(model, quant_type="nf4", compute_dtype=torch.float32)
        model = make_adapter(model, "lora")  # unmerged adapter on the 4-bit base
    prompts = [encode_text(p, tok, "tokenizer") for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    stops = stop_token_ids(tok, model)
    settings = GenerationSettings(max_new_tokens=8)
    batched = generate_ids(model, prompts, settings, stop_ids=stops, pad_id=pad_token_id(tok))
    single = [generate_ids(model, [p], settings, stop_ids=stops, pad_id=pad_token_id(tok))[0] for p in prompts]
    assert batched == single
    assert any(len(b) == 8 for b in batched)
    assert batched[1] == _reference_greedy(model, prompts[1], 8, stops)
    # batches of 2, sorted by length, come back in the input order
    assert generate(model, tok, prompts, settings, stop_ids=stops, pad_id=pad_token_id(tok), batch_size=2) == batched


def test_stops_at_stop_tokens_and_sampling_is_seeded():
    tok = bpe_tokenizer()
    model = tiny_model(tok)
    prompt = encode_text("hello", tok, None)
    greedy = generate_ids(model, [prompt], GenerationSettings(max_new_tokens=8), stop_ids=[], pad_id=0)[0]
    cut = generate_ids(model, [prompt], GenerationSettings(max_new_tokens=8), stop_ids=[greedy[3]], pad_id=0)[0]
    assert cut == greedy[:greedy.index(greedy[3])]
    sample = GenerationSettings(max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.95, seed=3)
    runs = [generate(model, tok, [prompt] * 3, sample, stop_ids=[], pad_id=0) for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) > 1  # rows drew different tokens


def test_no_stop_ids_means_no_stop_even_at_the_models_eos():
    """``stop_ids=[]`` runs exactly ``max_new_tokens`` steps: the model's own generation config
    (here: an EOS that greedy decoding emits at step 3) is not filled in."""
    tok = bpe_tokenizer()
    model = tiny_model(tok)
    prompt = encode_text("hello", tok, None)
    greedy = generate_ids(model, [prompt], GenerationSettings(max_new_tokens=8), stop_ids=[], pad_id=0)[0]
    model.generation_config.eos_token_id = greedy[3]
    again = generate_ids(model, [prompt], GenerationSettings(max_new_tokens=8), stop_ids=[], pad_id=0)[0]
    assert len(again) == 8 and again == greedy


def _folders(tmp_path, chat_template=True):
    tok = bpe_tokenizer(chat_template)
    model = tiny_model(tok)
    save_base(model, tok, tmp_path / "base")
    am = make_adapter(tiny_model(tok), "lora")
    am.save_pretrained(tmp_path / "adapter")
    return tok, am


def test_generate_command_file_and_prompt(tmp_path, capsys):
    tok, am = _folders(tmp_path)
    rows = [{"id": i, "prompt": p, "extra": [i]} for i, p in enumerate(PROMPTS[:3])]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--prompts",
                 str(tmp_path / "p.jsonl"), "--out", str(out), "--max-new-tokens", "5", "--batch-size", "2"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    stops = stop_token_ids(tok, am)
    for row, got in zip(rows, written):
        assert {k: got[k] for k in row} == row
        ids = encode_text(row["prompt"], tok, "tokenizer")
        assert got["output"] == tok.decode(_reference_greedy(am, ids, 5, stops), skip_special_tokens=True)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--prompt", PROMPTS[1],
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == written[1]["output"] + "\n"


def test_chat_loop_history_reset_exit():
    from loraforge.infer.chat import chat_loop
    from loraforge.infer.prompts import encode_messages

    tok = bpe_tokenizer()
    model = tiny_model(tok)
    stops = stop_token_ids(tok, model)
    pieces: list[str] = []
    settings = GenerationSettings(max_new_tokens=4)
    history = chat_loop(model, tok, "tokenizer", settings, ["hello\n", "one two\n", "/reset\n", "paris\n", "/exit\n",
                                                            "never read\n"], pieces.append)
    text = "".join(pieces)

    def reply(messages):
        return tok.decode(_reference_greedy(model, encode_messages(messages, tok, "tokenizer"), 4, stops),
                          skip_special_tokens=True)

    first = reply([{"role": "user", "content": "hello"}])
    second = reply([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "one two"}])
    third = reply([{"role": "user", "content": "paris"}])
    assert text == f"{first}\n{second}\n(conversation reset)\n{third}\n"
    assert history == [{"role": "user", "content": "paris"}, {"role": "assistant", "content": third}]


def test_missing_chat_template_is_a_user_error(tmp_path, capsys):
    _folders(tmp_path, chat_template=False)
    args = ["generate", str(tmp_path / "base"), "--prompt", "hello", "--max-new-tokens", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no chat template" in err and "--raw" in err and "--template" in err
    assert main(args + ["--raw"]) == 0
    assert main(args + ["--template", "chatml"]) == 0
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "base")]) == 2  # chat has no --raw: the message does not offer it
    err = capsys.readouterr().err
    assert "no chat template" in err and "--template" in err and "--raw" not in err


def test_bad_prompts_file_names_the_line(tmp_path, capsys):
    _folders(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n{"text": "no prompt"}\n')
    assert main(["generate", str(tmp_path / "base"), "--prompts", str(tmp_path / "p.jsonl")]) == 2
    assert "p.jsonl:2" in capsys.readouterr().err
