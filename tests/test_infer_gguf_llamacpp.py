"""GGUF files from ``loraforge merge --format gguf`` run in llama.cpp itself (llama-cpp-python in
a venv of its own, see helpers_gguf.py) and compute what transformers computes on the merged
safetensors: per architecture the logits at every prompt position and the greedy continuation;
per storage type the same within the rounding llama.cpp adds (it rounds activations to the
weights' dot-product type: f16, bf16, or Q8_0 blocks for q8_0/q4_0 weights); and our Q8_0/Q4_0
files are byte for byte what llama.cpp's own quantizer makes from our F32 file.

Opt-in: ``make test-llamacpp`` (or ``pytest -m llamacpp``); skipped with the reason when
llama-cpp-python is not installed. The main suite runs them too when it is (about a minute).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers_gguf import arch_model, llamacpp, llamacpp_python
from helpers_infer import bpe_tokenizer, make_adapter, save_base

from loraforge.cli import main

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(llamacpp_python() is None,
                       reason="llama-cpp-python not found: `make .venv-llamacpp` (installs the wheel from "
                              "../shared/tools) or set LORAFORGE_LLAMACPP_PYTHON"),
    pytest.mark.usefixtures("quiet_single_thread"),
]

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "phi3", "gemma", "gemma2", "gemma3_text",
         "stablelm", "phi", "gpt_neox", "gpt2"]
GELU_TABLE = ("gemma", "gemma2", "gemma3_text", "phi", "gpt_neox")  # llama.cpp's GELU: an f16 lookup table
TEXT = "hello world, the quick brown fox jumps over the lazy dog"
NEW = 6


@torch.no_grad()
def _reference(model, prompt: list[int], new: int = NEW):
    """transformers: logits at every position of prompt + greedy continuation, and the tokens."""
    ids = list(prompt)
    for _ in range(new):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return model(input_ids=torch.tensor([ids[:-1]])).logits[0].numpy(), ids[len(prompt):]


def _skip_unless_it_runs(storage: str, tmp, what: str) -> None:
    """Skip (saying why) where this llama.cpp build dies with an illegal instruction on a tiny
    ``storage`` file: a wheel built on another CPU (e.g. with AVX-512 or AMX) cannot run here."""
    from loraforge.infer.export_gguf import write_gguf

    tok = bpe_tokenizer()
    path = write_gguf(arch_model("llama", tok), tok, tmp / f"probe-{storage}.gguf", storage)
    try:
        llamacpp({"op": "run", "gguf": str(path), "prompts": [[1, 2, 3]], "new_tokens": 1}, tmp)
    except AssertionError as err:
        if "(illegal instruction)" in str(err):
            pytest.skip(f"this llama.cpp build uses CPU instructions this machine lacks {what}; rebuild it here: "
                        "CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python==0.3.36 (LLAMACPP_WHEEL=...)")
        raise


@pytest.fixture(scope="module", autouse=True)
def llamacpp_runs(tmp_path_factory):
    _skip_unless_it_runs("f32", tmp_path_factory.mktemp("probe"), "(even on float32 weights)")


@pytest.fixture(scope="module")
def quantized_dot_ok(tmp_path_factory):
    """llama.cpp builds made on another CPU can die on Q8_0 dot products only."""
    _skip_unless_it_runs("q8_0", tmp_path_factory.mktemp("probe-q"), "on quantized weights")


@pytest.mark.parametrize("model_type", ARCHS)
def test_merged_architecture_runs_in_llama_cpp(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    from loraforge.models import load_model

    tok = bpe_tokenizer()
    base = save_base(arch_model(model_type, tok), tok, tmp_path / "base")
    model, _ = load_model(base, compute_dtype=torch.float32)
    make_adapter(model, "lora").save_pretrained(tmp_path / "adapter")
    common = [str(base), "--adapter", str(tmp_path / "adapter")]
    assert main(["merge", *common, "--out", str(tmp_path / "st"), "--dtype", "fp32"]) == 0
    assert main(["merge", *common, "--out", str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf-type", "f32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "st", dtype=torch.float32).eval()
    prompt = tok.encode(TEXT)
    want, want_tokens = _reference(merged, prompt)
    reply = llamacpp({"op": "run", "gguf": str(tmp_path / "m.gguf"), "prompts": [prompt], "new_tokens": NEW,
                      "text": TEXT}, tmp_path)
    got = reply["arrays"]["logits_0"]
    # float32 throughout; GELU goes through llama.cpp's f16 lookup table (~1e-3)
    atol = 3e-3 if model_type in GELU_TABLE else 1e-4
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    assert reply["arrays"]["tokens_0"].tolist() == want_tokens
    assert reply["text_ids"] == prompt  # llama.cpp's tokenizer (gpt-2 pre-tokenizer) splits alike
    assert reply["chat_template"] == tok.chat_template


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2", "phi3"])
def test_storage_types_run_in_llama_cpp(tmp_path, request, model_type, gguf_type):
    from test_infer_gguf import _stored_like

    from loraforge.infer.export_gguf import write_gguf

    if gguf_type in ("q8_0", "q4_0"):
        request.getfixturevalue("quantized_dot_ok")
    tok = bpe_tokenizer()
    model = arch_model(model_type, tok)
    path = write_gguf(copy.deepcopy(model), tok, tmp_path / "m.gguf", gguf_type)
    prompt = tok.encode(TEXT)
    want, _ = _reference(_stored_like(model, gguf_type), prompt, new=1)
    got = llamacpp({"op": "run", "gguf": str(path), "prompts": [prompt], "new_tokens": 1}, tmp_path)["arrays"]["logits_0"]
    # what is left is llama.cpp rounding the activations to the weights' dot-product type (measured
    # here: f16 ~5e-4, bf16 ~4e-3, Q8_0 blocks for q8_0 / q4_0 weights ~1.5e-2; a wrong layout is ~1)
    relative = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert relative < {"f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2, "q4_0": 3e-2}[gguf_type]
    agree = (got.argmax(-1) == want.argmax(-1)).mean()  # random tiny models have near-ties
    assert agree >= (0.9 if gguf_type in ("f16", "bf16") else 0.8)


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi3", "gpt2"])
def test_quantized_files_equal_llama_quantize(tmp_path, model_type, gguf_type):
    """Same tensor types and bytes as llama.cpp's quantizer run on our F32 file (untied head:
    llama; tied, token_embd as head: gemma2; fused qkv: phi3; position embeddings: gpt2)."""
    from gguf import GGUFReader

    from loraforge.infer.export_gguf import write_gguf

    tok = bpe_tokenizer()
    model = arch_model(model_type, tok)
    source = write_gguf(copy.deepcopy(model), tok, tmp_path / "f32.gguf", "f32")
    ours = write_gguf(model, tok, tmp_path / "ours.gguf", gguf_type)
    reply = llamacpp({"op": "quantize", "src": str(source), "dst": str(tmp_path / "theirs.gguf"), "ftype": gguf_type},
                     tmp_path)
    assert reply["status"] == 0
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(tmp_path / "theirs.gguf").tensors}
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)


@pytest.mark.slow
def test_real_tokenizer_runs_in_llama_cpp(tmp_path, smollm2_gguf):
    """SmolLM2's real 49k-token BPE tokenizer (from the embedded GGUF): its tokenizer metadata
    copied from the source file (pre-tokenizer ``smollm``) or rebuilt from the Hugging Face
    tokenizer transformers makes of it (``gpt-2``) tokenizes like the Hugging Face tokenizer in
    llama.cpp, and a model over that vocabulary computes the same logits and greedy tokens."""
    from pathlib import Path

    from gguf import GGUFReader
    from helpers_infer import tiny_model
    from transformers import AutoTokenizer

    from loraforge.infer.export_gguf import write_gguf

    source = Path(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = tiny_model(tok)
    text = "The capital of France is Paris. What is the capital of Germany?"
    prompt = tok.encode(text, add_special_tokens=False)
    want, want_tokens = _reference(model, prompt)
    for copied in (True, False):
        path = write_gguf(copy.deepcopy(model), tok, tmp_path / f"copied-{copied}.gguf", "f32",
                          source_gguf=source if copied else None)
        assert GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == ("smollm" if copied else "gpt-2")
        reply = llamacpp({"op": "run", "gguf": str(path), "prompts": [prompt], "new_tokens": NEW, "text": text},
                         tmp_path)
        assert reply["text_ids"] == prompt, copied
        np.testing.assert_allclose(reply["arrays"]["logits_0"], want, rtol=0, atol=1e-4)
        assert reply["arrays"]["tokens_0"].tolist() == want_tokens
