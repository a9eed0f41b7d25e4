"""Helpers for the models tests: tiny model folders with a tokenizer, and the real SmolLM2 GGUF
loaded at most once per test session (cold, into a private cache, then warm from that cache)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def tiny_tokenizer(vocab_size: int = 128):
    """A word-level fast tokenizer over ``vocab_size`` tokens, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "system", "user", "assistant", "hello", "world"]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_folder(model, folder: Path) -> Path:
    """``model`` (a transformers model) saved with a tiny tokenizer as a Hugging Face folder."""
    from loraforge.models.quiet import quiet_transformers

    with quiet_transformers():
        model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def sample_ids(vocab_size: int = 128, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@functools.cache
def smollm2_loads() -> dict:
    """The alias loaded twice into a private cache: cold (GGUF conversion) and warm (cached).

    Runs once per session (about 25 s cold + a few s warm); returns the cache folder, both
    models, the tokenizer, and the seconds each load took (reported, never asserted).
    """
    from loraforge.models import load_model

    cache = Path(tempfile.mkdtemp(prefix="loraforge-test-cache-"))
    atexit.register(shutil.rmtree, cache, True)  # 540 MB of float32 weights: gone with the session
    old = os.environ.get("LORAFORGE_CACHE")
    os.environ["LORAFORGE_CACHE"] = str(cache)
    try:
        t0 = time.perf_counter()
        cold, tokenizer = load_model("smollm2-135m-instruct")
        t1 = time.perf_counter()
        entries_after_cold = sorted(p.name for p in (cache / "gguf").iterdir())
        from loraforge.models import gguf

        convert = gguf.convert_gguf
        gguf.convert_gguf = _must_not_convert  # the warm load must come from the cache
        try:
            warm, warm_tokenizer = load_model("smollm2-135m-instruct")
        finally:
            gguf.convert_gguf = convert
        t2 = time.perf_counter()
    finally:
        if old is None:
            os.environ.pop("LORAFORGE_CACHE", None)
        else:
            os.environ["LORAFORGE_CACHE"] = old
    return dict(
        cache=cache, entries=entries_after_cold, cold=cold, warm=warm, tokenizer=tokenizer,
        warm_tokenizer=warm_tokenizer, cold_s=t1 - t0, warm_s=t2 - t1,
    )


def _must_not_convert(*args, **kwargs):
    raise AssertionError("the warm load converted the GGUF file again instead of using the cache")


def smollm2_first_layers(layers: int = 2):
    """The real SmolLM2 (weights of the warm load of :func:`smollm2_loads`) cut to its first
    ``layers`` decoder layers, tied head kept, in eval mode: the real model's numbers at a cost
    a test can pay (quantizing and running all 30 layers on 2 shared cores takes minutes)."""
    import copy

    from transformers import AutoModelForCausalLM

    warm = smollm2_loads()["warm"]
    config = copy.deepcopy(warm.config)
    config.num_hidden_layers = layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(warm.state_dict(), strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb = warm.model.rotary_emb
    return model.eval()

