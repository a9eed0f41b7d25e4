"""Shared pieces of the infer tests: a tiny byte-level BPE tokenizer with a ChatML template (so
GGUF export has real tokens and merges), tiny Llama models over its vocabulary, model folders,
non-zero adapters of each method, and a 4-bit base."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_llama_config

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a model that is small can still learn to answer questions",
    "hello world, this is a tiny tokenizer for tests of generation and merging",
    "paris is the capital of france and berlin is the capital of germany",
    "one two three four five six seven eight nine ten",
] * 4


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def bpe_tokenizer(chat_template: bool = True):
    """A fresh byte-level BPE tokenizer (~320 tokens); EOS = <|im_end|>, pad = <|endoftext|>."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                   bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHATML if chat_template else None
    return fast


def tiny_model(tokenizer, seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    cfg.update(overrides)
    model = LlamaForCausalLM(tiny_llama_config(**cfg)).eval()
    with torch.no_grad():  # larger weights than the default init, so that logits differ visibly
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def save_base(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def adapter_config(method: str):
    from loraforge.adapters import LoraConfig, VeraConfig

    if method == "lora":
        return LoraConfig(r=4, alpha=8, init="none")
    if method == "dora":
        return LoraConfig(r=4, alpha=8, init="none", use_dora=True)
    if method == "vera":
        return VeraConfig(r=16, d_initial=0.5)
    if method == "adalora":
        from loraforge.adapters.adalora import AdaloraConfig

        return AdaloraConfig(init_r=4, target_r=2, alpha=8, total_step=10)
    if method == "sora":
        from loraforge.adapters.sora import SoraConfig

        return SoraConfig(r=4, alpha=8)
    raise ValueError(method)


def make_adapter(model, method: str, seed: int = 1):
    """Attach a ``method`` adapter to ``model`` with every adapter tensor perturbed (non-zero)."""
    from loraforge.adapters import attach

    am = attach(model, adapter_config(method))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in am.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return am


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def train_two_steps(tmp_path: Path, base: Path, quantization: str, adapter: str, name: str = "run") -> Path:
    """The run folder of two real ``loraforge train`` steps on ``base`` with the YAML flow
    mappings ``quantization`` and ``adapter``, on four tiny "say w" / "w w" chats."""
    import json

    from loraforge.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                      {"role": "assistant", "content": f"{w} {w}"}]}) + "\n"
                            for w in ("hello", "world", "paris", "france")))
    run = tmp_path / name
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"model: {base}\nquantization: {quantization}\nadapter: {adapter}\n"
                   f"data: {{train: {data}, format: messages}}\n"
                   "train: {steps: 2, batch_size: 2, lr: 0.05, eval_every: 0, gradient_checkpointing: false}\n"
                   f"output_dir: {run}\n")
    assert main(["train", str(cfg)]) == 0
    return run
