"""Formats -> conversations/segments, auto-detection, named templates, masking, truncation and the
dropped-row accounting, all on a tokenizer-free character tokenizer (one id per character), so
every expected id sequence below is written out by hand from the template's documented layout."""

from __future__ import annotations

import pytest
from helpers_data import CharTokenizer, labelled_spans

from loraforge.data import Message, build_dataset, detect_format, encode_prompt, render_prompt
from loraforge.data.formats import Segment, to_conversation, to_segments
from loraforge.errors import UserError

IM = "<|im_start|>{}\n{}<|im_end|>\n"


def chatml(*turns):
    return "".join(IM.format(r, c) for r, c in turns)


def decode_spans(tok, labels):
    return [tok.decode(s) for s in labelled_spans(labels)]


# ------------------------------------------------------------------ formats -> messages

def test_alpaca_with_input_system_and_history():
    row = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief.",
           "history": [["Hi", "Hello"], ["Who?", "A bot"]]}
    assert to_conversation(row, "alpaca", "f:1") == [
        Message("system", "Be brief."),
        Message("user", "Hi"), Message("assistant", "Hello"),
        Message("user", "Who?"), Message("assistant", "A bot"),
        Message("user", "Add\n2 and 3"), Message("assistant", "5"),
    ]
    assert to_conversation({"instruction": "Add", "input": "", "output": "5"}, "alpaca", "f")[0] == Message("user", "Add")


def test_input_output_both_spellings():
    want = [Message("user", "Q"), Message("assistant", "A")]
    assert to_conversation({"input": "Q", "output": "A"}, "input_output", "f") == want
    assert to_conversation({"prompt": "Q", "completion": "A"}, "input_output", "f") == want


def test_sharegpt_roles_and_system():
    row = {"system": "S", "conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}]}
    assert to_conversation(row, "sharegpt", "f") == [
        Message("system", "S"), Message("user", "q1"), Message("assistant", "a1"),
        Message("user", "q2"), Message("assistant", "a2")]
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    assert to_conversation(row, "sharegpt", "f")[0] == Message("system", "S")


def test_messages_with_content_parts():
    row = {"messages": [{"role": "system", "content": "S"},
                        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    assert to_conversation(row, "messages", "f") == [
        Message("system", "S"), Message("user", "ab"), Message("assistant", "c")]


def test_segments_and_text():
    row = {"segments": [{"text": "x", "label": False}, {"text": "y", "label": True}]}
    assert to_segments(row, "segments", "f") == [Segment("x", False), Segment("y", True)]
    assert to_segments({"text": "doc"}, "text", "f") == [Segment("doc", True)]


@pytest.mark.parametrize("row, fmt", [
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ({"input": "i", "output": "o"}, "input_output"),
    ({"prompt": "i", "completion": "o"}, "input_output"),
    ({"conversations": []}, "sharegpt"),
    ({"messages": []}, "messages"),
    ({"segments": []}, "segments"),
    ({"text": "t", "meta": 1}, "text"),
])
def test_detect_format(row, fmt):
    assert detect_format([row, row]) == fmt


def test_detect_format_errors():
    with pytest.raises(UserError, match="cannot tell the data format from the keys") as err:
        detect_format([{"question": "q", "answer": "a"}], source="d.jsonl")
    assert err.value.where == "d.jsonl[0]"
    with pytest.raises(UserError, match="looks like 'text' but earlier rows look like 'alpaca'"):
        detect_format([{"instruction": "i", "output": "o"}, {"text": "t"}])


def test_auto_format_is_reported():
    _, stats = build_dataset([{"prompt": "q", "completion": "a"}], CharTokenizer())
    assert (stats.format, stats.format_detected, stats.template) == ("input_output", True, "chatml")
    assert "format input_output (auto-detected), template chatml" in stats.summary()


# ------------------------------------------------------------------ named templates + masking

def test_chatml_multi_turn_masks_every_assistant_turn():
    tok = CharTokenizer()
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"},
                             {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
                             {"from": "gpt", "value": "a2"}]}
    (ex,), stats = build_dataset([row], tok, template="chatml")
    text = chatml(("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    assert tok.decode(ex["input_ids"]) == text
    assert decode_spans(tok, ex["labels"]) == ["a1<|im_end|>\n", "a2<|im_end|>\n"]
    assert all(y in (-100, x) for x, y in zip(ex["input_ids"], ex["labels"]))
    assert stats.trained_tokens == 2 * len("a1<|im_end|>\n") and stats.total_tokens == len(text)


def test_train_on_prompt_trains_everything_but_the_first_token():
    tok = CharTokenizer()
    (ex,), stats = build_dataset([{"input": "q", "output": "a"}], tok, template="chatml", train_on_prompt=True)
    assert ex["labels"] == [-100] + ex["input_ids"][1:]
    assert stats.trained_tokens == stats.total_tokens - 1


def test_alpaca_template_uses_bos_and_trained_eos():
    tok = CharTokenizer(add_bos=True)
    row = {"instruction": "q2", "output": "a2", "history": [["q1", "a1"]]}
    (ex,), _ = build_dataset([row], tok, template="alpaca")
    intro = ("Below is an instruction that describes a task. "
             "Write a response that appropriately completes the request.\n\n")
    want = (f"<s>{intro}### Instruction:\nq1\n\n### Response:\na1</s>\n\n"
            "### Instruction:\nq2\n\n### Response:\na2</s>")
    assert tok.decode(ex["input_ids"]) == want
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    assert decode_spans(tok, ex["labels"]) == ["a1</s>", "a2</s>"]


def test_llama3_template_has_its_own_begin_and_strips_content():
    tok = CharTokenizer(add_bos=True)
    (ex,), _ = build_dataset([{"messages": [{"role": "user", "content": " q "},
                                            {"role": "assistant", "content": "a\n"}]}], tok, template="llama3")
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert tok.decode(ex["input_ids"]) == (
        "<|begin_of_text|>" + h.format("user") + "q<|eot_id|>" + h.format("assistant") + "a<|eot_id|>")
    assert decode_spans(tok, ex["labels"]) == ["a<|eot_id|>"]


def test_plain_template_is_qlora_input_output():
    tok = CharTokenizer(add_bos=True)
    (ex,), _ = build_dataset([{"input": "2+2=", "output": "4"}], tok, template="plain")
    assert ex["input_ids"] == [tok.bos_token_id, *tok.encode("2+2=4", add_special_tokens=False), tok.eos_token_id]
    assert decode_spans(tok, ex["labels"]) == ["4</s>"]


def test_auto_template_without_tokenizer_template_is_chatml_and_unknown_is_an_error():
    tok = CharTokenizer()
    a, _ = build_dataset([{"input": "q", "output": "a"}], tok)
    b, _ = build_dataset([{"input": "q", "output": "a"}], tok, template="chatml")
    assert a == b
    with pytest.raises(UserError, match='unknown chat template \'chatm\' \\(did you mean "chatml"\\?\\)'):
        build_dataset([{"input": "q", "output": "a"}], tok, template="chatm")
    with pytest.raises(UserError, match="the tokenizer has no chat template"):
        build_dataset([{"input": "q", "output": "a"}], tok, template="tokenizer")


def test_render_and_encode_prompt_named_templates():
    tok = CharTokenizer()
    msgs = [{"role": "user", "content": "q"}]
    assert render_prompt(msgs, tok, "chatml") == chatml(("user", "q")) + "<|im_start|>assistant\n"
    tok_bos = CharTokenizer(add_bos=True)
    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert render_prompt(history, tok_bos, "plain") == "<s>q1a1</s>q2"
    assert encode_prompt(history, tok_bos, "plain") == [1, *tok.encode("q1a1"), 2, *tok.encode("q2")]


# ------------------------------------------------------------------ raw formats

def test_segments_labels_follow_the_flags():
    tok = CharTokenizer(add_bos=True)
    row = {"segments": [{"text": "ab", "label": False}, {"text": "cd", "label": True},
                        {"text": "e", "label": False}, {"text": "fg", "label": True}]}
    (ex,), stats = build_dataset([row], tok, train_on_prompt=True)  # segments keep their own labels
    assert stats.template == "none"
    assert ex["input_ids"] == [1, *tok.encode("abcdefg", add_special_tokens=False)]
    assert decode_spans(tok, ex["labels"]) == ["cd", "fg"]


def test_text_is_fully_trained_and_chunked():
    tok = CharTokenizer(add_bos=True)
    examples, stats = build_dataset([{"text": "abcdefghijklmnopqrstuvw"}, {"text": "xy"}], tok, max_length=10)
    first = [1, *tok.encode("abcdefghijklmnopqrstuvw", add_special_tokens=False), 2]  # 25 tokens -> 10 + 10 + 5
    assert [e["input_ids"] for e in examples] == [first[:10], first[10:20], first[20:], [1, *tok.encode("xy", add_special_tokens=False), 2]]
    for e in examples:
        assert e["labels"] == [-100] + e["input_ids"][1:]
    assert (stats.rows_read, stats.rows_kept, stats.examples, stats.truncated) == (2, 2, 4, 0)


# ------------------------------------------------------------------ truncation and dropped rows

def test_truncation_counts_all_masked_rows_and_empty_rows():
    tok = CharTokenizer()
    short = {"input": "q", "output": "a"}
    long_prompt = {"input": "x" * 100, "output": "a"}
    empty = {"input": " ", "output": ""}
    examples, stats = build_dataset([short, short, long_prompt, empty], tok, template="chatml", max_length=80)
    assert len(examples) == 2 and stats.rows_kept == 2
    assert (stats.dropped_all_masked, stats.dropped_empty, stats.rows_dropped, stats.truncated) == (1, 1, 2, 1)
    assert all(len(e["input_ids"]) <= 80 for e in examples)
    assert "no trained token left: 1, empty: 1" in stats.summary()


def test_truncated_response_keeps_its_prefix():
    tok = CharTokenizer()
    (ex,), stats = build_dataset([{"input": "q", "output": "abcdefghij"}], tok, template="plain", max_length=5)
    assert ex["input_ids"] == tok.encode("qabcd") and decode_spans(tok, ex["labels"]) == ["abcd"]
    assert stats.truncated == 1


def test_most_rows_all_masked_is_an_error():
    tok = CharTokenizer()
    rows = [{"input": "x" * 100, "output": "a"}] * 2 + [{"input": "q", "output": "a"}]
    with pytest.raises(UserError, match="2 of 3 rows have no trained token left.*raise data.max_length") as err:
        build_dataset(rows, tok, template="chatml", max_length=80, source="d.jsonl")
    assert err.value.where == "d.jsonl"
    # exactly half is still accepted (the rule is "most rows")
    _, stats = build_dataset(rows[1:], tok, template="chatml", max_length=80)
    assert stats.dropped_all_masked == 1


# ------------------------------------------------------------------ tokenizer (Jinja) templates, generic

class TemplatedCharTokenizer(CharTokenizer):
    """A character tokenizer with a chat template written in Python (stands in for Jinja)."""

    chat_template = "python"

    def __init__(self, hide_old_replies=False):
        super().__init__()
        self.hide_old_replies = hide_old_replies

    def apply_chat_template(self, chat, tokenize=False, add_generation_prompt=False):
        if chat and chat[0]["role"] == "assistant":
            raise ValueError("Conversation roles must alternate user/assistant")
        last = max((i for i, m in enumerate(chat) if m["role"] == "assistant"), default=-1)
        text = "".join(
            f"[{m['role']}]{'...' if self.hide_old_replies and i < last and m['role'] == 'assistant' else m['content']}|"
            for i, m in enumerate(chat))
        return text + ("[assistant]" if add_generation_prompt else "")


def test_tokenizer_template_pieces_come_from_prefix_diffs():
    tok = TemplatedCharTokenizer()
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    (ex,), stats = build_dataset([{"messages": msgs}], tok)
    assert stats.template == "tokenizer"
    assert tok.decode(ex["input_ids"]) == "[user]q1|[assistant]a1|[user]q2|[assistant]a2|"
    assert decode_spans(tok, ex["labels"]) == ["a1|", "a2|"]
    assert render_prompt(msgs[:1], tok) == "[user]q1|[assistant]"


def test_tokenizer_template_that_rewrites_earlier_turns_is_an_error():
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    with pytest.raises(UserError, match="renders earlier turns differently.*choose a named template") as err:
        build_dataset([{"messages": msgs}], TemplatedCharTokenizer(hide_old_replies=True), source="d")
    assert err.value.where == "d[0]"
    # a named template still works for such a tokenizer
    build_dataset([{"messages": msgs}], TemplatedCharTokenizer(hide_old_replies=True), template="chatml")


def test_tokenizer_template_rejection_names_the_row():
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "assistant", "content": "a"}]}]
    with pytest.raises(UserError, match="chat template rejected this conversation: Conversation roles") as err:
        build_dataset(rows, TemplatedCharTokenizer(), source="d")
    assert err.value.where == "d[1]"
