"""Masking with a real tokenizer's Jinja chat template (SmolLM2-135M-Instruct, ChatML-style, with a
default system prompt): labels sit exactly on each assistant reply plus its ``<|im_end|>\\n``, the
piecewise encoding equals encoding the whole rendered conversation, and the real alpaca demo file
loads with sane stats."""

from __future__ import annotations

import json

import pytest
from helpers_data import SHARED_DATA, labelled_spans, smol_tok  # noqa: F401  (fixture)

from loraforge.data import build_dataset, encode_prompt, pack, render_prompt

END = "<|im_end|>\n"


def whole_ids(tok, messages):
    return tok.encode(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)


def check_row(tok, example, messages):
    """Reference: the template's own full rendering, and each assistant reply + end of turn."""
    assert example["input_ids"] == whole_ids(tok, messages)
    assert all(y in (-100, x) for x, y in zip(example["input_ids"], example["labels"]))
    replies = [m["content"] + END for m in messages if m["role"] == "assistant"]
    assert [tok.decode(s) for s in labelled_spans(example["labels"])] == replies


def test_sharegpt_multi_turn_with_system(smol_tok):
    conv = [("system", "You are terse."), ("human", "Hi!"), ("gpt", "Hello."),
            ("human", "2+2?"), ("gpt", "4, of course.")]
    row = {"conversations": [{"from": f, "value": v} for f, v in conv]}
    (ex,), stats = build_dataset([row], smol_tok)
    assert stats.template == "tokenizer" and stats.format == "sharegpt"
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    check_row(smol_tok, ex, [{"role": roles[f], "content": v} for f, v in conv])


def test_messages_without_system_gets_the_templates_default_untrained(smol_tok):
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green"}]
    (ex,), _ = build_dataset([{"messages": msgs}], smol_tok)
    check_row(smol_tok, ex, msgs)
    assert smol_tok.decode(ex["input_ids"]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_alpaca_history(smol_tok):
    row = {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Math tutor.",
           "history": [["What is 1+1?", "2"]]}
    (ex,), _ = build_dataset([row], smol_tok)
    check_row(smol_tok, ex, [
        {"role": "system", "content": "Math tutor."}, {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"}])


def test_train_on_prompt_with_tokenizer_template(smol_tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]
    (ex,), _ = build_dataset([{"messages": msgs}], smol_tok, train_on_prompt=True)
    assert ex["input_ids"] == whole_ids(smol_tok, msgs)
    assert ex["labels"] == [-100] + ex["input_ids"][1:]


def test_labels_exact_even_where_whole_string_tokenizes_differently(smol_tok):
    """A reply starting with a newline: BPE would merge it with the header's newline if the whole
    string were encoded; the pieces keep the reply's own tokens (what the model sees when it
    generates after the prompt), so the labelled text is exactly the reply."""
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\n\nA list:"}]
    (ex,), _ = build_dataset([{"messages": msgs}], smol_tok)
    assert [smol_tok.decode(s) for s in labelled_spans(ex["labels"])] == ["\n\nA list:" + END]
    assert ex["input_ids"][: len(encode_prompt(msgs[:1], smol_tok))] == encode_prompt(msgs[:1], smol_tok)


def test_render_prompt_matches_generation_prompt_and_training_prefix(smol_tok):
    msgs = [{"role": "user", "content": "Who are you?"}]
    assert render_prompt(msgs, smol_tok) == smol_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    prompt = encode_prompt(msgs, smol_tok)
    (ex,), _ = build_dataset([{"messages": msgs + [{"role": "assistant", "content": "A model."}]}], smol_tok)
    assert ex["input_ids"][: len(prompt)] == prompt and set(ex["labels"][: len(prompt)]) == {-100}
    assert render_prompt(msgs, smol_tok, "chatml") == "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"


def test_named_chatml_agrees_with_the_tokenizer_template_given_a_system_prompt(smol_tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    a, _ = build_dataset([{"messages": msgs}], smol_tok, template="auto")
    b, _ = build_dataset([{"messages": msgs}], smol_tok, template="chatml")
    assert a == b


def test_alpaca_demo_file(smol_tok):
    path = SHARED_DATA / "alpaca_en_demo.json"
    rows = json.loads(path.read_text())
    examples, stats = build_dataset(path, smol_tok, max_length=4096)
    assert (stats.rows_read, stats.rows_kept, stats.examples, stats.rows_dropped) == (999, 999, 999, 0)
    assert (stats.format, stats.format_detected, stats.template, stats.truncated) == ("alpaca", True, "tokenizer", 0)
    assert stats.total_tokens == sum(len(e["input_ids"]) for e in examples)
    assert 0.5 < stats.trained_tokens / stats.total_tokens < 0.95
    mismatched = 0
    for row, ex in zip(rows, examples):
        query = f"{row['instruction']}\n{row['input']}" if row["input"] else row["instruction"]
        msgs = [{"role": "user", "content": query}, {"role": "assistant", "content": row["output"]}]
        assert [smol_tok.decode(s) for s in labelled_spans(ex["labels"])] == [row["output"] + END]
        mismatched += ex["input_ids"] != whole_ids(smol_tok, msgs)
    assert mismatched == 0

    short, stats = build_dataset(path, smol_tok, max_length=256)
    assert stats.truncated > 0 and all(len(e["input_ids"]) <= 256 for e in short)
    assert stats.rows_kept + stats.rows_dropped == 999 and stats.dropped_all_masked == stats.rows_dropped
    packed = pack(short, 256)
    assert len(packed) < len(short)
    assert sum(len(p["input_ids"]) for p in packed) == sum(len(e["input_ids"]) for e in short)


@pytest.mark.parametrize("template", ["alpaca", "plain", "llama3"])
def test_named_templates_with_real_tokenizer_label_the_reply(smol_tok, template):
    msgs = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes"}]
    (ex,), stats = build_dataset([{"messages": msgs}], smol_tok, template=template)
    end = {"alpaca": "<|im_end|>", "plain": "<|im_end|>", "llama3": "<|eot_id|>"}[template]  # SmolLM2's EOS is <|im_end|>
    assert stats.template == template
    assert [smol_tok.decode(s) for s in labelled_spans(ex["labels"])] == ["Yes" + end]


def test_wiki_text_for_continued_pretraining(smol_tok):
    path = SHARED_DATA / "wiki_demo.txt"
    docs = [line for line in path.read_text().splitlines() if line.strip()]
    examples, stats = build_dataset(path, smol_tok, max_length=1024)
    assert (stats.format, stats.template, stats.rows_read, stats.rows_kept) == ("text", "none", len(docs), len(docs))
    assert all(len(e["input_ids"]) <= 1024 for e in examples)
    flat = [t for e in examples for t in e["input_ids"]]
    eos = smol_tok.eos_token_id
    assert flat.count(eos) == len(docs) and flat[-1] == eos
    first_doc = flat[: flat.index(eos)]
    assert first_doc == smol_tok.encode(docs[0], add_special_tokens=False)
    assert stats.trained_tokens == stats.total_tokens - stats.examples
